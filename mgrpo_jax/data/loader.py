"""Deterministic, sharded, resumable prompt batches built on grain.

The prompt order is one infinite index stream, `grain.MapDataset.range(n).shuffle(seed).repeat()`
(a fresh permutation per epoch, all of them a function of the seed). Global batch b is the
stream's elements [b * G, (b + 1) * G) for G = batch_size * shard_count, and shard i takes the
i-th contiguous slice of it. So:

  * the global batch does not depend on how many processes read it;
  * the whole position is one integer (`{"batch": b}`), saved in checkpoints as JSON;
  * a batch may span an epoch boundary when the dataset is not a multiple of G (no prompt is
    dropped or repeated within an epoch).

Prompts are the unit of sharding: every sample of a prompt (its whole tree) is produced on the
shard that read the prompt.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np

from mgrpo_jax.data.prompts import PromptRecord


class PromptLoader:
  """Iterator over this shard's prompt batches.

  Each `next()` returns {'prompts': list[str] (batch_size), 'metadata': list[dict],
  'index': int32 [batch_size] indices into `records`}.
  """

  def __init__(self, records: Sequence[PromptRecord], batch_size: int, seed: int,
               shuffle: bool = True, shard_index: int = 0, shard_count: int = 1):
    if not records:
      raise ValueError("PromptLoader: no prompt records")
    if batch_size <= 0:
      raise ValueError(f"PromptLoader: batch_size={batch_size}, expected > 0")
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"PromptLoader: shard_index={shard_index} not in [0, {shard_count})")
    self.records = list(records)
    self.batch_size = int(batch_size)
    self.shard_index = int(shard_index)
    self.shard_count = int(shard_count)
    ds = grain.MapDataset.range(len(self.records))
    if shuffle:
      ds = ds.shuffle(seed=int(seed))
    self._stream = ds.repeat()
    self._batch = 0

  @property
  def global_batch_size(self) -> int:
    return self.batch_size * self.shard_count

  def indices(self, batch: int) -> np.ndarray:
    """This shard's record indices of global batch `batch`: int32 [batch_size]."""
    start = batch * self.global_batch_size + self.shard_index * self.batch_size
    return np.asarray([self._stream[start + i] for i in range(self.batch_size)], np.int32)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    index = self.indices(self._batch)
    self._batch += 1
    picked = [self.records[i] for i in index]
    return {"prompts": [r.prompt for r in picked], "metadata": [dict(r.metadata) for r in picked],
            "index": index}

  def get_state(self) -> dict[str, int]:
    """JSON-serialisable position: the next global batch."""
    return {"batch": self._batch}

  def set_state(self, state: dict[str, Any]) -> None:
    if "batch" not in state or int(state["batch"]) < 0:
      raise ValueError(f"PromptLoader.set_state: expected {{'batch': int >= 0}}, got {state!r}")
    self._batch = int(state["batch"])
