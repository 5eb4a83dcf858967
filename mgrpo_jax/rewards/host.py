"""Host-side reward computation in a thread pool, overlapping device sampling.

`submit` starts scoring at once and returns a future; the trainer submits batch b, goes on
sampling batch b + 1 on the device, and collects the scores when it needs them. Per-image rewards
are split over the pool's threads (OCR runs in onnxruntime, which releases the GIL). The result
is checked before anything trains on it: a reward that raises, returns the wrong shape, or
returns NaN / inf stops the run with a `RewardError` naming the reward and the prompt.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import Any, Mapping, Sequence

import numpy as np

from mgrpo_jax.rewards.base import check_batch, get_reward


class RewardError(RuntimeError):
  """A reward failed or produced a non-finite value (the message names reward and prompt)."""


def _score_chunk(name, reward, images, prompts, metadata, offset) -> np.ndarray:
  """Per-image reward on images[offset:offset + n] (given sliced) -> float32 [n]."""
  out = np.empty(len(images), np.float32)
  for j, (image, prompt, meta) in enumerate(zip(images, prompts, metadata)):
    try:
      out[j] = reward.score_one(image, prompt, meta)
    except Exception as e:  # pylint: disable=broad-except
      raise RewardError(f"reward {name!r} raised on image {offset + j} (prompt {prompt!r}): "
                        f"{type(e).__name__}: {e}") from e
  return out


def _score_batch(name, reward, images, prompts, metadata) -> np.ndarray:
  """Whole-batch reward -> float32 array as returned (its shape is checked by the caller)."""
  try:
    return np.asarray(reward(images, prompts, metadata), np.float32)
  except RewardError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise RewardError(f"reward {name!r} raised on a batch of {len(prompts)} images (first "
                      f"prompt {prompts[0]!r}): {type(e).__name__}: {e}") from e


class HostRewards:
  """Scores batches of images with several named rewards on a thread pool.

  Usage: `fut = host.submit(images, prompts, metadata)`, later `fut.result()` ->
  {name: float32 [N]}; `close()` (or a `with` block) stops the threads.

  Args:
    spec: reward name -> keyword arguments of its constructor (e.g. {"ocr": {}}).
    max_workers: threads scoring images.
  """

  def __init__(self, spec: Mapping[str, Mapping[str, Any]], max_workers: int = 4):
    if not spec:
      raise ValueError("no rewards configured (config.reward.names is empty)")
    self.rewards = {name: get_reward(name, **dict(kwargs)) for name, kwargs in spec.items()}
    self.max_workers = max(1, int(max_workers))
    self._pool = cf.ThreadPoolExecutor(self.max_workers, thread_name_prefix="reward")
    # Collecting waits on the pool's futures, so it runs on its own thread (no pool deadlock).
    self._collector = cf.ThreadPoolExecutor(1, thread_name_prefix="reward-collect")

  def submit(self, images: np.ndarray, prompts: Sequence[str],
             metadata: Sequence[dict]) -> cf.Future:
    """Starts scoring; `.result()` gives {name: float32 [N]} or raises RewardError.

    Args:
      images: uint8 [N, H, W, 3].
      prompts: N prompts.
      metadata: N metadata dicts.
    """
    # A copy: the caller may reuse its buffer for the next batch while this one is scored.
    images = np.array(images)
    prompts, metadata = list(prompts), list(metadata)
    check_batch(images, prompts, metadata)
    n = len(images)
    jobs = {}
    for name, reward in self.rewards.items():
      if getattr(reward, "per_image", False) and n > 1:
        bounds = np.linspace(0, n, min(n, self.max_workers) + 1).round().astype(int)
        jobs[name] = [self._pool.submit(_score_chunk, name, reward, images[a:b], prompts[a:b],
                                        metadata[a:b], a)
                      for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
      elif getattr(reward, "per_image", False):
        jobs[name] = [self._pool.submit(_score_chunk, name, reward, images, prompts, metadata, 0)]
      else:
        jobs[name] = [self._pool.submit(_score_batch, name, reward, images, prompts, metadata)]
    return self._collector.submit(self._collect, jobs, prompts)

  @staticmethod
  def _collect(jobs, prompts) -> dict[str, np.ndarray]:
    n = len(prompts)
    out = {}
    for name, futures in jobs.items():
      parts = [f.result() for f in futures]
      # One part (a batch reward's output) is checked as returned: it may be 0-d or [N, 1].
      values = parts[0] if len(parts) == 1 else np.concatenate(parts)
      if values.shape != (n,):
        raise RewardError(f"reward {name!r} returned shape {values.shape}, expected ({n},)")
      bad = np.flatnonzero(~np.isfinite(values))
      if bad.size:
        i = int(bad[0])
        raise RewardError(f"reward {name!r} returned {values[i]} for image {i} (prompt "
                          f"{prompts[i]!r}) and {bad.size - 1} more non-finite values; "
                          "refusing to train on them")
      out[name] = values
    return out

  def score(self, images, prompts, metadata) -> dict[str, np.ndarray]:
    """Synchronous `submit(...).result()`."""
    return self.submit(images, prompts, metadata).result()

  def close(self) -> None:
    self._collector.shutdown(wait=True)
    self._pool.shutdown(wait=True, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
