"""The Multi-GRPO training loop: sample -> rewards (async) -> advantages -> PPO epochs.

The device side (generator, weights, optimizer, jitted functions) is a `Runtime`
(runtime.py, functions from train_step.py); rewards are a `RewardScorer` (rewards/scorer.py).
This host loop reads prompts, starts each batch's rewards while the device samples the next
batch, writes metrics, images and checkpoints, resumes from the workdir and stops cleanly on
SIGTERM. One iteration, top to bottom: `train_iteration`.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import ml_collections
import numpy as np

from mgrpo_jax import checkpoint as ckpt_lib
from mgrpo_jax import metrics as metrics_lib
from mgrpo_jax import runtime as runtime_lib
from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax import train_step as train_step_lib
from mgrpo_jax import workdir as workdir_lib
from mgrpo_jax.data import loader as loader_lib
from mgrpo_jax.data import prompts as prompts_lib
from mgrpo_jax.rewards import scorer as scorer_lib
from mgrpo_jax.text_cache import ConditioningCache

# Exit status of a run stopped by SIGTERM after writing its checkpoint (sysexits' EX_TEMPFAIL:
# "try again"), so schedulers can tell preemption from failure and requeue.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """Raised after a SIGTERM-triggered checkpoint; the run can be resumed from the workdir."""


class Trainer:
  """Owns the runtime, the state and the host-side helpers of one run."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, compile_ahead: bool = True):
    """Builds everything and resumes from the workdir's latest checkpoint, if any.
    `compile_ahead=False` leaves the iteration's functions to compile at their first call (for
    scripts and tests that build a Trainer to restore or render, not to train)."""
    self.config, self.workdir = config, workdir
    self.is_primary = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    self.mesh = sharding_lib.make_mesh(config.mesh)
    # Data: every process reads its own share of each global batch.
    records, _ = prompts_lib.load_dataset(config.data.dataset, config.data.split,
                                          config.reward.names, config.data.tfds_data_dir)
    self.eval_records = records
    if config.log.eval_dataset:
      self.eval_records, _ = prompts_lib.load_dataset(
          config.log.eval_dataset, config.log.eval_split or config.data.split,
          config.reward.names, config.data.tfds_data_dir)
    self.runtime = runtime_lib.build_runtime(config, self.mesh, "train")
    self.loader = loader_lib.PromptLoader(
        records, config.data.prompts_per_batch // jax.process_count(), seed=config.seed,
        shuffle=config.data.shuffle, shard_index=jax.process_index(),
        shard_count=jax.process_count())
    self.state = self.runtime.init_state(len(records))
    # Made by a jitted function: a typed key cannot be device_put onto a multi-process mesh.
    self.base_key = jax.jit(lambda: jax.random.key(config.seed),
                            out_shardings=sharding_lib.replicated(self.mesh))()
    # Every function of the first iteration traced on its shapes, then compiled with the
    # shardings of its inputs: shape and compiler errors before any sampling.
    first = self.runtime.fns_for_iteration(0).spec
    self.runtime.check_iteration(self.state, self.base_key, first)
    if compile_ahead:
      self.runtime.compile_iteration(self.state, self.base_key, first)
    self.text_cache = (None if config.sample.text_cache_size <= 0 else ConditioningCache(
        self.runtime, self.state.trainable, config.sample.text_cache_size))
    self.scorer = scorer_lib.RewardScorer(config.reward, self.mesh)

    # One writer per workdir, locked before anything below touches it (orbax deletes unfinished
    # saves when it opens the directory; the writer appends to metrics.jsonl).
    self._lock = workdir_lib.lock_for_run(workdir)
    try:
      self.checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.log.keep_checkpoints)
      self.writer = metrics_lib.MetricWriter(workdir, enabled=self.is_primary, config=config)
      self.start_iteration = self._restore()
      # The logs keep exactly the iterations of the restored state: what a killed run logged
      # after its last checkpoint goes, and is logged again when those iterations rerun.
      self.writer.drop_after(self.start_iteration)
      if self.is_primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
          f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    except BaseException:
      if self._lock is not None:
        self._lock.release()
      raise

  # -- checkpoints -----------------------------------------------------------------------------------
  def _restore(self) -> int:
    """Restores the latest checkpoint into self.state and the loader; -> its iteration (or 0)."""
    step = self.checkpointer.latest_step()
    if step is None:
      return 0
    # Resuming (or extending) may change only the fields of workdir_lib.RESUMABLE_FIELDS.
    workdir_lib.check_resume(self.checkpointer.read_metadata(step), self.config,
                             workdir_lib.config_hash(self.config), step, self.workdir)
    # "rng": checkpoints written before the run's key left the state still restore.
    restored, data_state, _ = self.checkpointer.restore(step, self.state.to_checkpoint(),
                                                        retired=("rng",))
    self.state = train_step_lib.TrainState.from_checkpoint(restored)
    self.loader.set_state(data_state)
    logging.warning("resuming from the checkpoint of iteration %d in %s", step, self.workdir)
    return int(step)

  def save(self, iteration: int, force: bool = False):
    self.checkpointer.save(iteration, self.state.to_checkpoint(), self.loader.get_state(),
                           metadata=workdir_lib.checkpoint_metadata(self.config), force=force)

  # -- one iteration -------------------------------------------------------------------------------
  def sample_and_score(self, iteration: int, timer) -> list[train_step_lib.SampledBatch]:
    """Samples every batch of the iteration; rewards of batch b run while b + 1 samples."""
    cfg, runtime, fns = self.config, self.runtime, self.runtime.fns_for_iteration(iteration)
    batches, pending = [], []
    for b in range(cfg.sample.batches_per_iteration):
      data = next(self.loader)
      prompts = list(data["prompts"])
      with timer("sample"):
        fold = (iteration, train_step_lib.FOLD_SAMPLE, b)
        if self.text_cache is None:
          neg = runtime.tokens([cfg.sample.negative_prompt] * len(prompts))
          out, cond, neg_cond, images = fns.sample(self.state.trainable, runtime.frozen,
                                                   runtime.tokens(prompts), neg, self.base_key,
                                                   *fold)
        else:
          cond, neg_cond = self.text_cache(self.state.trainable, prompts,
                                           cfg.sample.negative_prompt)
          out, images = fns.sample_from_cond(self.state.trainable, runtime.frozen, cond,
                                             neg_cond, self.base_key, *fold)
        local_images = sharding_lib.local_rows(images)  # waits for this batch only
      pending.append(self.scorer.submit(images, local_images, prompts, data["metadata"]))
      batches.append(train_step_lib.SampledBatch(out, cond, neg_cond,
                                                  np.asarray(data["index"], np.int32)))
    with timer("reward_wait"):
      for batch, scores in zip(batches, pending):
        batch.rewards = scores.result()  # raises RewardError naming the reward and prompt
    return batches

  def train_iteration(self, iteration: int, timer) -> dict[str, float]:
    cfg = self.config
    fns = self.runtime.fns_for_iteration(iteration)
    batches = self.sample_and_score(iteration, timer)
    with timer("advantages"):
      adv, summary = self.iteration_advantages(fns, batches)
    state = self.state.replace(prompt_stats=None)  # not the train step's: kept out of donation
    with timer("train"):
      state, train_metrics = self.runtime.train_epochs(fns, state, batches, adv, self.base_key,
                                                       iteration)
    self.state = state.replace(prompt_stats=self.state.prompt_stats)

    return train_step_lib.iteration_metrics(train_metrics, summary, cfg.reward.names, fns.spec)

  def iteration_advantages(self, fns: runtime_lib.IterationFns,
                           batches: list[train_step_lib.SampledBatch]):
    """Advantages of every batch of an iteration, normalised over all of them together.

    Every process stacks its own rows of the B batches along axis 1, so the global reward array
    is [P, B, L, K] with row p = prompt p of each batch whatever the process count (joining the
    batches along the rows would order them (process, batch) on several hosts).

    Returns:
      (Advantages with transitions / keep [B, P, M] and nodes [B, P, N], summary scalars).
    """
    stack = lambda xs: sharding_lib.global_batch(np.stack(xs, axis=1), self.mesh)
    adv, stats, summary = fns.advantage(stack([b.rewards for b in batches]),
                                        stack([b.prompt_index for b in batches]),
                                        self.state.prompt_stats)
    if stats is not None:
      self.state = self.state.replace(prompt_stats=stats)
    return adv, summary

  # -- evaluation ----------------------------------------------------------------------------------
  def render(self, prompts: list[str], seed: int) -> np.ndarray:
    """ODE samples (eval_num_steps, CFG) of `prompts` from the EMA weights when kept (as in
    Flow-GRPO), else the trained ones: uint8 [n, H, W, 3] (see `Runtime.render`)."""
    weights = self.state.ema if self.state.ema is not None else self.state.trainable
    return self.runtime.render(weights, prompts, seed)

  def evaluate(self, iteration: int) -> dict[str, float]:
    """Renders the first log.num_eval_prompts evaluation prompts (ODE, fixed noise), writes
    their grid and returns the mean of every reward on them as {"eval/<reward>": value}."""
    n = max(1, self.config.log.num_eval_prompts)
    records = [self.eval_records[i % len(self.eval_records)] for i in range(n)]
    prompts = [r.prompt for r in records]
    images = self.render(prompts, self.config.seed + 12345)
    self.writer.write_images(iteration, "eval", images, prompts)
    scores = self.scorer.score(images, prompts, [dict(r.metadata) for r in records])
    evaluation = {f"eval/{name}": float(np.mean(scores[name])) for name in self.config.reward.names}
    if self.is_primary:
      print(f"eval {iteration} | " + " ".join(f"{k[len('eval/'):]}={v:.3f}"
                                              for k, v in evaluation.items()), flush=True)
    return evaluation

  # -- the run ---------------------------------------------------------------------------------------
  def run(self) -> dict[str, float]:
    """Trains from the restored iteration to train.num_iterations; -> the last metrics."""
    cfg = self.config
    total, timer, metrics = cfg.train.num_iterations, metrics_lib.Timer(), {}
    bar = metrics_lib.ProgressBar(total=total, initial=self.start_iteration,
                                  enabled=self.is_primary and cfg.log.progress)
    if self.start_iteration == 0 and cfg.log.eval_at_start and total > 0:
      # The baseline: the initial model on the evaluation prompts, logged as step 0.
      self.writer.write_scalars(0, self.evaluate(0))
    with workdir_lib.SigtermWatch() as sigterm:
      for iteration in range(self.start_iteration, total):
        timer.reset()
        t0 = time.perf_counter()
        if iteration == cfg.log.profile_iteration:
          # A trace of one whole iteration: every phase (sample, rewards, train) shows up in it.
          with jax.profiler.trace(os.path.join(self.workdir, "profile")):
            metrics = self.train_iteration(iteration, timer)
        else:
          metrics = self.train_iteration(iteration, timer)
        metrics.update({f"time/{k}": v for k, v in timer.totals().items()})
        metrics["time/iteration"] = time.perf_counter() - t0
        done = iteration + 1
        if done % cfg.log.eval_every == 0 or done == total:
          t_eval = time.perf_counter()
          metrics.update(self.evaluate(done))
          metrics["time/eval"] = time.perf_counter() - t_eval
        self.writer.write_scalars(done, metrics)
        bar.update(1, metrics)  # a bar on a terminal, else one line (rewards, KL, phases, ETA)
        if sigterm.requested():
          self.save(done, force=True)
          self.checkpointer.wait()
          bar.close()
          raise Preempted(f"preempted after iteration {done}; checkpoint written to "
                          f"{self.workdir}")
        if done % cfg.log.checkpoint_every == 0 or done == total:
          self.save(done, force=done == total)
    self.checkpointer.wait()
    bar.close()
    if self.is_primary and os.path.exists(os.path.join(self.workdir, "metrics.jsonl")):
      metrics_lib.plot_curves(os.path.join(self.workdir, "metrics.jsonl"),
                              os.path.join(self.workdir, "reward_curves.png"))
    return metrics

  def close(self):
    self.scorer.close()
    self.checkpointer.close()
    self.writer.close()
    if self._lock is not None:
      self._lock.release()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs (or resumes) a training job in `workdir`; returns the last iteration's metrics."""
  trainer = Trainer(config, workdir)
  try:
    return trainer.run()
  finally:
    trainer.close()
