"""Host cache of prompt conditionings, so repeated prompts skip the text encoders.

  cache = ConditioningCache(runtime, max_prompts)
  cond, neg_cond = cache(prompts, negative_prompt)   # global batches [P, ...], like encoding

Valid only while the text encoders are frozen (LoRA with no adapter inside text_encoder*; the
constructor checks). Each process caches its own rows; encoding a missing prompt is a
collective, so every process takes part whenever any of them misses.
"""

from __future__ import annotations

import collections

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from mgrpo_jax import sharding as sharding_lib


class TextCache:
  """Least-recently-used map prompt -> conditioning rows (numpy pytrees).

  Attributes:
    hits, misses: prompt lookups served from / added to the cache.
  """

  def __init__(self, max_prompts: int):
    self.max_prompts = max_prompts
    self._entries = collections.OrderedDict()
    self.hits = self.misses = 0

  def __contains__(self, prompt: str) -> bool:
    return prompt in self._entries

  def conditioning(self, prompts, encode):
    """prompts (this process's) -> numpy pytree [n, ...]; `encode(missing) -> numpy pytree`."""
    missing = [p for p in dict.fromkeys(prompts) if p not in self._entries]
    self.hits += len(prompts) - sum(p in missing for p in prompts)
    self.misses += sum(p in missing for p in prompts)
    if missing:
      fresh = encode(missing)
      for i, p in enumerate(missing):
        self._entries[p] = jax.tree.map(lambda a, i=i: a[i], fresh)
    rows = [self._entries[p] for p in prompts]
    for p in prompts:
      self._entries.move_to_end(p)
    while len(self._entries) > self.max_prompts:
      self._entries.popitem(last=False)
    return jax.tree.map(lambda *a: np.stack(a), *rows)


class ConditioningCache:
  """The conditioning of a batch's prompts (and CFG's negative prompt) through a TextCache.

  Args:
    runtime: a training `Runtime` (its encode function, tokenizer, mesh and sampler).
    trainable: the trained state, to check that no adapter sits in a text encoder.
    max_prompts: cache size.
  """

  def __init__(self, runtime, trainable, max_prompts: int):
    adapted = [".".join(str(k) for k in path) for path, _ in nnx.to_flat_state(trainable)]
    if not runtime.config.lora.enabled or any(p.startswith("text_encoder") for p in adapted):
      raise ValueError("sample.text_cache_size > 0 needs frozen text encoders: LoRA enabled "
                       "and no lora.targets inside text_encoder*")
    self.runtime = runtime
    self.cache = TextCache(int(max_prompts))

  @property
  def hits(self) -> int:
    return self.cache.hits

  @property
  def misses(self) -> int:
    return self.cache.misses

  def __call__(self, trainable, prompts, negative_prompt: str):
    """-> (cond, neg_cond) global batches [P, ...] (neg_cond None without CFG)."""
    runtime, n = self.runtime, len(prompts)

    def encode(missing):
      # Every process encodes a full local batch (a collective), padded with its last prompt.
      padded = list(missing) + [missing[-1]] * (n - len(missing))
      cond = runtime.encode_fn(trainable, runtime.frozen, runtime.tokens(padded))
      return jax.tree.map(sharding_lib.local_rows, cond)

    def lookup(batch):
      need = any(p not in self.cache for p in batch)
      if jax.process_count() > 1:
        need_any = bool(np.any(multihost_utils.process_allgather(np.array(need))))
        if need_any and not need:  # another process encodes: take part with a dummy batch
          encode(list(batch[:1]))
      return self.cache.conditioning(batch, encode)

    cond = sharding_lib.global_batch(lookup(list(prompts)), runtime.mesh)
    neg_cond = None
    if runtime.sampler.guidance_scale != 1.0:
      neg = lookup([negative_prompt])
      neg_cond = sharding_lib.global_batch(
          jax.tree.map(lambda a: np.repeat(a, n, axis=0), neg), runtime.mesh)
    return cond, neg_cond
