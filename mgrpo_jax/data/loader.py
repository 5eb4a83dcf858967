"""Deterministic, sharded, resumable prompt batches built on grain.

The prompt order is one infinite index stream: epoch e is the permutation
`grain.MapDataset.range(n).shuffle(seed=epoch_seed(seed, e))` (the identity without shuffling),
and the epochs follow each other. Global batch b is the stream's elements [b * G, (b + 1) * G)
for G = batch_size * shard_count, and shard i takes the i-th contiguous slice of it. So:

  * the global batch does not depend on how many processes read it;
  * the whole position is one integer (`{"batch": b}`), saved in checkpoints as JSON;
  * a batch may span an epoch boundary (or several, when n < G): within an epoch no prompt is
    dropped or repeated.

Prompts are the unit of sharding: every sample of a prompt (its whole tree) is produced on the
shard that read the prompt.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import grain
import numpy as np

from mgrpo_jax.data.prompts import PromptRecord


def epoch_seed(seed: int, epoch: int) -> int:
  """The shuffle seed of one epoch, a hash of (seed, epoch) in [0, 2**32).

  grain's own per-epoch reseeding (`shuffle().repeat()`) uses seed + epoch, so run seed s + 1
  would replay run s's epochs one epoch early; hashing the pair keeps runs with nearby seeds
  unrelated.
  """
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint32)[0])


class PromptLoader:
  """Infinite iterator over this shard's prompt batches (see the module docstring).

  Each `next()` returns {'prompts': list[str] (batch_size), 'metadata': list[dict] (copies),
  'index': int32 [batch_size] indices into `records`}.
  """

  def __init__(self, records: Sequence[PromptRecord], batch_size: int, seed: int,
               shuffle: bool = True, shard_index: int = 0, shard_count: int = 1):
    """Builds the loader at the first batch.

    Args:
      records: the prompts (e.g. from `prompts.load_prompts`).
      batch_size: prompts per batch on this shard; the global batch is batch_size * shard_count.
      seed: non-negative; the same seed gives the same order on every process.
      shuffle: a fresh permutation per epoch, else file order.
      shard_index: this process's slice of each global batch, in [0, shard_count).
      shard_count: number of processes reading the same global batches.

    Raises:
      ValueError: no records, or a bad batch size, seed or shard.
    """
    if not records:
      raise ValueError("PromptLoader: no prompt records")
    if int(batch_size) <= 0:
      raise ValueError(f"PromptLoader: batch_size={batch_size}, expected > 0")
    if int(seed) < 0:
      raise ValueError(f"PromptLoader: seed={seed}, expected >= 0")
    if int(shard_count) <= 0:
      raise ValueError(f"PromptLoader: shard_count={shard_count}, expected > 0")
    if not 0 <= int(shard_index) < int(shard_count):
      raise ValueError(f"PromptLoader: shard_index={shard_index} not in [0, {shard_count})")
    self.records = list(records)
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.shard_index = int(shard_index)
    self.shard_count = int(shard_count)
    self._batch = 0
    self._epochs: dict[int, grain.MapDataset] = {}

  @property
  def global_batch_size(self) -> int:
    return self.batch_size * self.shard_count

  def _epoch(self, epoch: int) -> grain.MapDataset:
    """Epoch `epoch`'s order as a random-access dataset of record indices."""
    ds = self._epochs.get(epoch)
    if ds is None:
      ds = grain.MapDataset.range(len(self.records))
      if self.shuffle:
        ds = ds.shuffle(seed=epoch_seed(self.seed, epoch))
      # Consecutive batches touch the current epoch and perhaps the next: keep just those.
      self._epochs = {e: d for e, d in self._epochs.items() if e >= epoch - 1}
      self._epochs[epoch] = ds
    return ds

  def indices(self, batch: int) -> np.ndarray:
    """This shard's record indices of global batch `batch`: int32 [batch_size]."""
    n = len(self.records)
    start = batch * self.global_batch_size + self.shard_index * self.batch_size
    out = np.empty(self.batch_size, np.int32)
    for i in range(self.batch_size):
      epoch, position = divmod(start + i, n)
      out[i] = self._epoch(epoch)[position]
    return out

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    index = self.indices(self._batch)
    self._batch += 1
    picked = [self.records[i] for i in index]
    return {"prompts": [r.prompt for r in picked], "metadata": [dict(r.metadata) for r in picked],
            "index": index}

  def get_state(self) -> dict[str, int]:
    """JSON-serialisable position: the next global batch, and what it is a position in."""
    return {"batch": self._batch, "num_records": len(self.records),
            "global_batch_size": self.global_batch_size}

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes at a `get_state()` position; the following batches are those that came next.

    The shard count may differ from the saving run's as long as the global batch is the same.

    Raises:
      ValueError: a malformed state, or one saved by a loader over a different number of
        records or with a different global batch size (its batch number would mean other
        prompts here).
    """
    batch = state.get("batch") if isinstance(state, dict) else None
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 0:
      raise ValueError(f"PromptLoader.set_state: expected {{'batch': int >= 0, ...}}, got "
                       f"{state!r}")
    # States from before these fields were recorded carry only 'batch'.
    for key, mine in (("num_records", len(self.records)),
                      ("global_batch_size", self.global_batch_size)):
      if key in state and state[key] != mine:
        raise ValueError(f"PromptLoader.set_state: the state was saved with {key}="
                         f"{state[key]}, this loader has {key}={mine}")
    self._batch = int(batch)
