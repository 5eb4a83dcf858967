"""mgrpo_jax: Multi-GRPO for flow-matching text-to-image models in JAX / Flax NNX."""

from flax import nnx as _nnx

# Parameters carry logical axis names as metadata; they are placed on the mesh explicitly by
# `mgrpo_jax.sharding` (eval_shape, then jit with out_shardings), not eagerly at construction.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"


def __getattr__(name):
  # `load_pipeline` pulls in the models and the trainer: imported on first use, so that
  # `import mgrpo_jax` stays light.
  if name == "load_pipeline":
    from mgrpo_jax.pipeline import load_pipeline  # pylint: disable=import-outside-toplevel
    return load_pipeline
  raise AttributeError(f"module 'mgrpo_jax' has no attribute {name!r}")
