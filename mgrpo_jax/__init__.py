"""mgrpo_jax: Multi-GRPO for flow-matching text-to-image models in JAX / Flax NNX."""

from flax import nnx as _nnx

# Parameters carry logical axis names as metadata; they are placed on the mesh explicitly by
# `mgrpo_jax.sharding` (eval_shape, then jit with out_shardings), not eagerly at construction.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
