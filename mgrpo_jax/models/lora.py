"""LoRA adapters injected into an NNX module by path pattern; the base stays frozen.

`apply_lora(model, targets, rank, alpha)` replaces every `nnx.Linear` whose dotted path matches one
of the regexes with a `LoRALinear` that keeps the same `kernel` / `bias` variables (so paths of
the base weights, and with them checkpoint loading, do not change) and adds

  lora_a: [in, rank]  ~ N(0, (1 / rank)^2)   (peft's "gaussian" init, as Flow-GRPO uses)
  lora_b: [rank, out] = 0

so that `y = x W + b + (alpha / rank) * (x A) B` equals the base model at initialisation. Adapter
weights are `nnx.LoRAParam`s, so `split_lora` separates them from the base with one filter: the
optimizer only ever sees the adapters, and the reference policy for the KL term is the same
graph with the adapters zeroed (no second copy of the base).
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class LoRALinear(nnx.Module):
  """A Linear layer with a low-rank update; owns the base layer's kernel and bias variables."""

  def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
    if rank <= 0:
      raise ValueError(f"LoRA rank must be positive, got {rank}")
    self.kernel = base.kernel
    self.bias = base.bias
    self.dtype = base.dtype
    self.in_features = base.in_features
    self.out_features = base.out_features
    self.rank = int(rank)
    self.scale = float(alpha) / float(rank)
    # The adapter inherits the base kernel's logical axes on its outer dimensions, so it shards
    # like the layer it adapts; the rank axis is small and replicated.
    axes = base.kernel.get_metadata().get("out_sharding") or (None, None)
    # Adapters are trained, so they live in float32 whatever the frozen base's dtype (bf16 for
    # real checkpoints); they are cast to the compute dtype in the forward pass.
    param_dtype = jnp.float32
    init_a = nnx.with_partitioning(nnx.initializers.normal(1.0 / rank), (axes[0], None))
    init_b = nnx.with_partitioning(nnx.initializers.zeros_init(), (None, axes[1]))
    self.lora_a = nnx.LoRAParam(init_a(rngs.params(), (self.in_features, rank), param_dtype))
    self.lora_b = nnx.LoRAParam(init_b(rngs.params(), (rank, self.out_features), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., in] -> [..., out] in the layer's compute dtype."""
    dtype = self.dtype or jnp.result_type(x, self.kernel[...])
    x = x.astype(dtype)
    y = jnp.dot(x, self.kernel[...].astype(dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    delta = jnp.dot(jnp.dot(x, self.lora_a[...].astype(dtype)), self.lora_b[...].astype(dtype))
    return y + (self.scale * delta).astype(dtype)


def _path_str(path) -> str:
  return ".".join(str(p) for p in path)


def _set_child(parent, key, value):
  if isinstance(key, int) or (isinstance(key, str) and key.isdigit() and
                              not hasattr(parent, key)):
    parent[int(key)] = value
  else:
    setattr(parent, key, value)


def apply_lora(model: nnx.Module, targets: Sequence[str], rank: int, alpha: float, *,
               rngs: nnx.Rngs) -> list[str]:
  """Wraps every `nnx.Linear` whose dotted path matches a regex in `targets` (re.search).

  Args:
    model: the module, modified in place.
    targets: regexes over dotted module paths, e.g. r"attn\\.(to_q|to_k)$".
    rank: adapter rank r.
    alpha: scale numerator (update scaled by alpha / r).
    rngs: for the `lora_a` init.

  Returns:
    The adapted paths, sorted.

  Raises:
    ValueError: if a pattern matches no Linear layer (the message lists candidates), or targets
      is empty.
  """
  if not targets:
    raise ValueError("lora.targets is empty: give at least one module-path regex")
  patterns = [re.compile(t) for t in targets]
  linears = [(path, m) for path, m in nnx.iter_modules(model)
             if isinstance(m, nnx.Linear) and path]
  used = [False] * len(patterns)
  chosen = []
  for path, module in linears:
    name = _path_str(path)
    hits = [i for i, p in enumerate(patterns) if p.search(name)]
    for i in hits:
      used[i] = True
    if hits:
      chosen.append((path, module))
  unused = [t for t, u in zip(targets, used) if not u]
  if unused:
    examples = ", ".join(_path_str(p) for p, _ in linears[:8])
    raise ValueError(f"lora.targets {unused} match no Linear layer of {type(model).__name__} "
                     f"(Linear paths look like: {examples}, ...)")
  for path, module in chosen:
    parent = model
    for key in path[:-1]:
      parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    _set_child(parent, path[-1], LoRALinear(module, rank, alpha, rngs=rngs))
  return sorted(_path_str(p) for p, _ in chosen)


def split_lora(model: nnx.Module):
  """-> (graphdef, adapter_state, base_state): adapters are `nnx.LoRAParam`, the rest is base."""
  return nnx.split(model, nnx.LoRAParam, ...)


def zero_adapters(adapter_state):
  """The adapters' state with every value zero: merged with the base, this is the base model."""
  return jax.tree.map(jnp.zeros_like, adapter_state)


def merge_lora(model: nnx.Module) -> None:
  """Folds every adapter into its kernel (W += scale * A B) and zeroes B, in place.

  For export: the merged model has the same outputs (up to rounding) with no adapter compute.
  """
  for _, module in nnx.iter_modules(model):
    if isinstance(module, LoRALinear):
      update = module.scale * (module.lora_a[...].astype(jnp.float32) @
                               module.lora_b[...].astype(jnp.float32))
      kernel = module.kernel[...]
      module.kernel[...] = (kernel.astype(jnp.float32) + update).astype(kernel.dtype)
      module.lora_b[...] = jnp.zeros_like(module.lora_b[...])
