"""Host-side reward computation in a thread or process pool, overlapping device sampling.

`submit` starts scoring at once and returns a future; the trainer submits batch b, goes on
sampling batch b + 1 on the device, and collects the scores when it needs them. The result is
checked before anything trains on it: a reward that raises, returns the wrong shape, or returns
NaN / inf stops the run with a `RewardError` naming the reward and the prompt.

Two pools (`config.reward.pool`):

  "thread"   per-image rewards are split over threads of this process. OCR runs in onnxruntime,
             which releases the GIL, but RapidOCR's pre- and post-processing is Python and
             numpy that holds it, so threads stop scaling after a few cores.
  "process"  per-image rewards run in worker processes, each with its own rewards (and so its
             own OCR engine), built once when the worker starts and reused for every batch. A
             batch is cut into chunks (two per worker, so one slow chunk does not idle the
             others); each chunk goes to one worker with every per-image reward, so `ocr` and
             `text_color` share that worker's OCR cache and read each image once. Whole-batch
             rewards (remote servers, anything without `per_image`) are one call per batch
             either way and stay on a thread of this process.

Workers are forked from a forkserver, a fresh single-threaded process: the parent (JAX) is
multithreaded, so plain fork is unsafe. The server imports `mgrpo_jax.rewards` and the main
script once and every worker forks from it, where spawn would import both again in each worker.
Per-image rewards are rebuilt in the workers from their registered factory, which therefore has
to be importable there (a module-level class or function, not a lambda); the pool says so when
one is not.
"""

from __future__ import annotations

import concurrent.futures as cf
import concurrent.futures.process as cf_process
import multiprocessing
import os
import pickle
from typing import Any, Mapping, Sequence

import numpy as np

from mgrpo_jax.rewards import base as base_lib
from mgrpo_jax.rewards.base import check_batch, get_reward

POOLS = ("thread", "process")
# Chunks per worker process and batch: more than one, so that a chunk of slow images (OCR time
# grows with the number of text boxes) does not leave the other workers idle at the end.
CHUNKS_PER_PROCESS = 2


class RewardError(RuntimeError):
  """A reward failed or produced a non-finite value (the message names reward and prompt)."""


def resolve_num_workers(num_workers: int) -> int:
  """`config.reward.num_workers`: 0 -> the CPU cores this process may use, else itself.

  Raises:
    ValueError: negative or not an integer (names the config key).
  """
  if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)):
    raise ValueError(f"reward.num_workers must be an integer >= 0 (0 = one per CPU core), got "
                     f"{num_workers!r}")
  if num_workers < 0:
    raise ValueError(f"reward.num_workers must be >= 0 (0 = one per CPU core), got "
                     f"{num_workers}")
  if num_workers == 0:
    # The cores this process may run on (a container or taskset may allow fewer than exist).
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
  return int(num_workers)


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


# ---- worker processes ----------------------------------------------------------------------------
# The rewards of this worker process (name -> reward, or the exception building it raised).
_WORKER_REWARDS: dict[str, Any] = {}


def _init_worker(factories: Mapping[str, tuple[Any, dict]]) -> None:
  """Process-pool initializer: builds this worker's rewards once."""
  try:
    import cv2  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    # The pool is the parallelism: OpenCV's own threads (RapidOCR resizes with it) in every
    # worker would oversubscribe the cores.
    cv2.setNumThreads(1)
  except ImportError:
    pass
  for name, (factory, kwargs) in factories.items():
    try:
      _WORKER_REWARDS[name] = factory(**kwargs)
    except Exception as e:  # pylint: disable=broad-except
      # Raised on first use, as a RewardError naming the reward (an initializer that raises
      # would only mark the pool broken).
      _WORKER_REWARDS[name] = e


def _score_chunk_in_worker(names, images, prompts, metadata, offset) -> dict[str, np.ndarray]:
  """Every per-image reward in `names` on one chunk, in a worker -> {name: float32 [n]}."""
  out = {}
  for name in names:
    reward = _WORKER_REWARDS.get(name)
    if reward is None or isinstance(reward, Exception):
      raise RewardError(f"reward {name!r} could not be built in worker process {os.getpid()}: "
                        f"{type(reward).__name__}: {reward}")
    out[name] = _score_chunk(name, reward, images, prompts, metadata, offset)
  return out


def _start_method() -> str:
  return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _worker_factories(rewards: Mapping[str, Any],
                      spec: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[Any, dict]]:
  """name -> (registered factory, kwargs) of each per-image reward, checked to reach a worker.

  Raises:
    ValueError: a factory or its arguments cannot be sent to a worker process (names it).
  """
  factories = {}
  for name, reward in rewards.items():
    if not getattr(reward, "per_image", False):
      continue
    factory = base_lib.reward_factory(name)
    kwargs = dict(spec[name])
    try:
      pickle.dumps((factory, kwargs))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"reward {name!r} cannot run in a worker process (reward.pool='process'):"
                       f" its factory {factory!r} or arguments {kwargs!r} cannot be sent there "
                       f"({type(e).__name__}: {e}); register a module-level class or function, "
                       "or use reward.pool='thread'") from e
    factories[name] = (factory, kwargs)
  return factories


class HostRewards:
  """Scores batches of images with several named rewards on a thread or process pool.

  Usage: `fut = host.submit(images, prompts, metadata)`, later `fut.result()` ->
  {name: float32 [N]}; `close()` (or a `with` block) stops the pool.

  Args:
    spec: reward name -> keyword arguments of its constructor (e.g. {"ocr": {}}).
    max_workers: threads or processes scoring images; 0 = one per CPU core this process may use.
    pool: "thread" or "process" (see the module docstring).
  """

  def __init__(self, spec: Mapping[str, Mapping[str, Any]], max_workers: int = 4,
               pool: str = "thread"):
    if not spec:
      raise ValueError("no rewards configured (config.reward.names is empty)")
    if pool not in POOLS:
      raise ValueError(f"reward.pool must be one of {POOLS}, got {pool!r}")
    self.max_workers = resolve_num_workers(max_workers)
    self.pool = pool
    # Built here in both modes: bad arguments fail now, and `per_image` decides the split. In
    # the process pool the workers build their own copies; these then only run whole-batch
    # rewards.
    self.rewards = {name: get_reward(name, **dict(kwargs)) for name, kwargs in spec.items()}
    self._factories = (_worker_factories(self.rewards, spec) if pool == "process" else {})
    num_batch = sum(name not in self._factories for name in self.rewards)
    self._pool = cf.ThreadPoolExecutor(self.max_workers if pool == "thread" else max(1, num_batch),
                                       thread_name_prefix="reward")
    self._processes: cf.ProcessPoolExecutor | None = None  # started on the first batch
    # Collecting waits on the pool's futures, so it runs on its own thread (no pool deadlock).
    self._collector = cf.ThreadPoolExecutor(1, thread_name_prefix="reward-collect")

  def _process_pool(self, restart: bool = False) -> cf.ProcessPoolExecutor:
    """The worker processes, started once and reused (restarted only after one died)."""
    if restart and self._processes is not None:
      self._processes.shutdown(wait=True, cancel_futures=True)
      self._processes = None
    if self._processes is None:
      context = multiprocessing.get_context(_start_method())
      if context.get_start_method() == "forkserver":
        # Imported once by the server, so forked workers find them loaded. '__main__' (the
        # default) is the main script, which workers need to resolve its functions; a module
        # run with `python -m` is not preloaded and each worker imports it once when it starts
        # (preloading it under its own name would run its body twice in a worker). Ignored if
        # this process's forkserver is already running.
        context.set_forkserver_preload(["__main__", "mgrpo_jax.rewards"])
      self._processes = cf.ProcessPoolExecutor(
          self.max_workers, mp_context=context, initializer=_init_worker,
          initargs=(self._factories,))
    return self._processes

  def _submit_chunk(self, *args) -> cf.Future:
    try:
      return self._process_pool().submit(_score_chunk_in_worker, *args)
    except cf_process.BrokenProcessPool:
      # A worker died on an earlier batch (that batch got its RewardError): start fresh ones.
      return self._process_pool(restart=True).submit(_score_chunk_in_worker, *args)

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
    # (reward names, future, first image, end image); a future gives one array, or in the
    # process pool {name: array} for every name of its chunk.
    jobs = []
    in_workers = tuple(name for name in self.rewards if name in self._factories)
    if in_workers:
      bounds = np.linspace(0, n, min(n, CHUNKS_PER_PROCESS * self.max_workers) + 1)
      bounds = bounds.round().astype(int)
      for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
          jobs.append((in_workers, self._submit_chunk(in_workers, images[a:b], prompts[a:b],
                                                      metadata[a:b], int(a)), a, b))
    for name, reward in self.rewards.items():
      if name in in_workers:
        continue
      if getattr(reward, "per_image", False) and n > 1:
        bounds = np.linspace(0, n, min(n, self.max_workers) + 1).round().astype(int)
        jobs.extend(((name,), self._pool.submit(_score_chunk, name, reward, images[a:b],
                                                prompts[a:b], metadata[a:b], a), a, b)
                    for a, b in zip(bounds[:-1], bounds[1:]) if b > a)
      elif getattr(reward, "per_image", False):
        jobs.append(((name,), self._pool.submit(_score_chunk, name, reward, images, prompts,
                                                metadata, 0), 0, n))
      else:
        jobs.append(((name,), self._pool.submit(_score_batch, name, reward, images, prompts,
                                                metadata), 0, n))
    return self._collector.submit(self._collect, jobs, prompts, tuple(self.rewards))

  @staticmethod
  def _collect(jobs, prompts, names) -> dict[str, np.ndarray]:
    n = len(prompts)
    parts = {name: [] for name in names}
    for job_names, future, a, b in jobs:
      try:
        result = future.result()
      except cf_process.BrokenProcessPool as e:
        raise RewardError(f"a reward worker process died while scoring {list(job_names)} on "
                          f"images {a}..{b - 1} (first prompt {prompts[a]!r}): {e}") from e
      for name in job_names:
        parts[name].append(result[name] if isinstance(result, dict) else result)
    out = {}
    for name in names:
      # One part (a batch reward's output) is checked as returned: it may be 0-d or [N, 1].
      values = parts[name][0] if len(parts[name]) == 1 else np.concatenate(parts[name])
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
    """Waits for running batches, then stops the threads and worker processes (joined)."""
    self._collector.shutdown(wait=True)
    self._pool.shutdown(wait=True, cancel_futures=True)
    if self._processes is not None:
      self._processes.shutdown(wait=True, cancel_futures=True)
      self._processes = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
