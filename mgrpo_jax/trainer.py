"""The Multi-GRPO training loop: sample -> decode -> rewards (async) -> advantages -> PPO epochs.

Device work is three functions from `train_step.py`, each jitted here with explicit shardings
(the model states, Policy and optimizer come from `policy.py`):
  sample_fn(params, tokens, neg_tokens, key)  -> rollout, conditioning, uint8 images
  advantage_fn(rewards, prompt_index, stats)  -> advantages, new per-prompt stats
  train_step(state, batch, rng, frozen)       -> new state, metrics
The host loop around them reads prompts, scores images in a thread pool while the device
samples the next batch, writes metrics, images and checkpoints, and resumes from the workdir.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from mgrpo_jax import advantages as adv_lib
from mgrpo_jax import checkpoint as ckpt_lib
from mgrpo_jax import export
from mgrpo_jax import metrics as metrics_lib
from mgrpo_jax import policy as policy_lib
from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax import train_step as train_step_lib
from mgrpo_jax import workdir as workdir_lib
from mgrpo_jax.data import loader as loader_lib
from mgrpo_jax.data import prompts as prompts_lib
from mgrpo_jax.models import registry
from mgrpo_jax.rewards import scorer as scorer_lib
from mgrpo_jax.sampling import rollout as rollout_lib
from mgrpo_jax.sampling import schedule
from mgrpo_jax.sampling.tree import TreeSpec, tree_spec_from_config

# Exit status of a run stopped by SIGTERM after writing its checkpoint (sysexits' EX_TEMPFAIL:
# "try again"), so schedulers can tell preemption from failure and requeue.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """Raised after a SIGTERM-triggered checkpoint; the run can be resumed from the workdir."""


class TextCache:
  """Host cache of prompt conditionings (this process's rows), so repeated prompts skip the text
  encoders. Valid only while the encoders are frozen (the trainer checks that).

  Attributes:
    hits, misses: prompt lookups served from / added to the cache.
  """

  def __init__(self, max_prompts: int):
    self.max_prompts = max_prompts
    self._entries = collections.OrderedDict()
    self.hits = self.misses = 0

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


def config_hash(config) -> str:
  return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]


class Trainer:
  """Owns the jitted functions, the state and the host-side helpers of one run."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, inference: bool = False,
               step: int | None = None):
    """Builds everything and resumes from the workdir's latest checkpoint, if any.

    Args:
      config: the run's config.
      workdir: checkpoints, metrics and images go here.
      inference: only restore and render (mgrpo-sample, mgrpo-eval): writes nothing to the
        workdir and accepts a checkpoint made with other sampling settings (the state must
        still match).
      step: the checkpoint to restore (default the latest).
    """
    self.config = config
    self.workdir = workdir
    self.inference = inference
    self.is_primary = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    self.mesh = sharding_lib.make_mesh(config.mesh)
    self.spec = tree_spec_from_config(config)
    self.sampler = rollout_lib.sampler_from_config(config)
    self.adv_cfg = adv_lib.AdvantageConfig.from_config(config)
    self.adv_cfg.check_tree(self.spec)

    P = config.data.prompts_per_batch
    multiple = sharding_lib.batch_size_multiple(self.mesh)
    if P % multiple:
      raise ValueError(f"data.prompts_per_batch={P} must be divisible by the data x fsdp mesh "
                       f"size {multiple} (each prompt's tree stays on one shard)")
    if P % jax.process_count():
      raise ValueError(f"data.prompts_per_batch={P} must be divisible by the process count "
                       f"{jax.process_count()}")

    # Data: every process reads its own share of each global batch.
    self.records, _ = prompts_lib.load_dataset(
        config.data.dataset, config.data.split, config.reward.names, config.data.tfds_data_dir)
    self.eval_records = self.records
    if config.log.eval_dataset:
      self.eval_records, _ = prompts_lib.load_dataset(
          config.log.eval_dataset, config.log.eval_split or config.data.split,
          config.reward.names, config.data.tfds_data_dir)
    self.loader = loader_lib.PromptLoader(
        self.records, batch_size=P // jax.process_count(), seed=config.seed,
        shuffle=config.data.shuffle, shard_index=jax.process_index(),
        shard_count=jax.process_count())

    # Model and optimizer state, created sharded.
    self.generator = registry.get_generator(config.model)
    self.sigmas = schedule.generator_sigmas(self.generator, config, config.sample.num_steps)
    graphdef, trainable, self.frozen = policy_lib.build_model_states(self.generator, config,
                                                                     self.mesh)
    trainable = export.init_from_config(trainable, config)  # lora.init_from, if set
    self.policy = policy_lib.Policy(graphdef, bool(config.lora.enabled))
    self.tx = policy_lib.make_optimizer(config)
    opt_state = policy_lib.init_opt_state(self.tx, trainable, self.mesh)
    replicated = sharding_lib.replicated(self.mesh)
    self.state = {"trainable": trainable, "opt_state": opt_state,
                  "step": jax.device_put(jnp.zeros([], jnp.int32), replicated)}
    if config.train.ema_decay > 0:
      self.state["ema"] = jax.tree.map(jnp.copy, trainable)
    if config.advantage.per_prompt_history:
      k = 1 if self.adv_cfg.mode == "reward_mixing" else len(self.adv_cfg.weights)
      self.state["prompt_stats"] = jax.device_put(
          adv_lib.init_prompt_stats(len(self.records), k), replicated)
    self.state_shardings = jax.tree.map(lambda a: a.sharding, self.state)

    # Jitted functions, traced and run inside the mesh context so the models' activation
    # sharding hints apply.
    on_mesh = functools.partial(sharding_lib.with_mesh, mesh=self.mesh)
    self.text_cache = None
    if config.sample.text_cache_size > 0:
      adapted = [".".join(str(k) for k in path)
                 for path, _ in nnx.to_flat_state(self.state["trainable"])]
      if not config.lora.enabled or any(p.startswith("text_encoder") for p in adapted):
        raise ValueError("sample.text_cache_size > 0 needs frozen text encoders: LoRA enabled "
                         "and no lora.targets inside text_encoder*")
      self.text_cache = TextCache(int(config.sample.text_cache_size))
      self.encode_fn = on_mesh(jax.jit(train_step_lib.make_encode_fn(self.policy)))
    eval_spec = TreeSpec(config.sample.eval_num_steps, 1, (), (),
                         (False,) * config.sample.eval_num_steps)
    self.eval_fn = on_mesh(jax.jit(train_step_lib.make_sample_fn(
        self.policy, eval_spec, self.sampler,
        schedule.generator_sigmas(self.generator, config, config.sample.eval_num_steps),
        self.generator.latent_shape)))
    self.minibatch_fn = on_mesh(jax.jit(train_step_lib.make_minibatch_fn(
        config.train.num_minibatches)))
    # The functions that depend on the rollout shape, one set per SDE window: a moving window
    # (sample.sde_window_mode) switches between them each iteration (`_use_window`). Every
    # position's spec is built here, so a branch step outside some position is an error now.
    self.window_mode = config.sample.sde_window_mode
    if self.window_mode not in schedule.WINDOW_MODES:
      raise ValueError(f"sample.sde_window_mode must be one of {schedule.WINDOW_MODES}, got "
                       f"{self.window_mode!r}")
    self._window_fns = {}
    if self.window_mode != "fixed":
      for window in schedule.window_positions(
          size=config.sample.sde_window_size, window_range=tuple(config.sample.sde_window_range),
          num_steps=config.sample.num_steps):
        try:
          tree_spec_from_config(config, window)
        except ValueError as e:
          raise ValueError(f"moving SDE window position {window}: {e}") from e
      self.window = None
      self._use_window(0)
    else:
      self.window = tuple(config.sample.sde_window)
      self._set_spec_fns(self.spec)

    # Learned rewards run on the device next to the policy; the rest on the host thread pool.
    self.scorer = scorer_lib.RewardScorer(config.reward, self.mesh)
    # One writer per workdir, locked before anything below touches it (orbax deletes unfinished
    # saves when it opens the directory; the writer appends to metrics.jsonl).
    self._lock = None if inference else workdir_lib.lock_for_run(workdir)
    try:
      self.checkpointer = ckpt_lib.Checkpointer(
          workdir, max_to_keep=config.log.keep_checkpoints, read_only=inference)
      self.writer = metrics_lib.MetricWriter(workdir, enabled=self.is_primary and not inference,
                                             config=config)
      self.start_iteration = 0
      self._maybe_restore(step)
      # The logs keep exactly the iterations of the restored state: what a killed run logged
      # after its last checkpoint goes, and is logged again when those iterations rerun.
      self.writer.drop_after(self.start_iteration)
      if self.is_primary and not inference:
        with open(os.path.join(workdir, "config.json"), "w") as f:
          f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    except BaseException:
      if self._lock is not None:
        self._lock.release()
      raise

  def _checkpoint_state(self):
    # Every array in a multi-host checkpoint must be a global array: the key is replicated.
    rng = jax.device_put(jax.random.key_data(jax.random.key(self.config.seed)),
                         sharding_lib.replicated(self.mesh))
    return {**self.state, "rng": rng}

  def _maybe_restore(self, step: int | None = None):
    if step is not None and step not in self.checkpointer.all_steps():
      raise FileNotFoundError(f"no checkpoint of iteration {step} in {self.workdir}; saved: "
                              f"{self.checkpointer.all_steps()}")
    step = self.checkpointer.latest_step() if step is None else step
    if step is None:
      return
    if not self.inference:
      # Resuming (or extending) may change only the fields of workdir_lib.RESUMABLE_FIELDS.
      workdir_lib.check_resume(self.checkpointer.read_metadata(step), self.config,
                               config_hash(self.config), step, self.workdir)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
        self._checkpoint_state())
    restored, data_state, _ = self.checkpointer.restore(step, abstract)
    restored.pop("rng")
    self.state = restored
    self.loader.set_state(data_state)
    self.start_iteration = int(step)
    if not self.inference:
      logging.warning("resuming from the checkpoint of iteration %d in %s", step, self.workdir)

  def save(self, iteration: int, force: bool = False):
    self.checkpointer.save(iteration, self._checkpoint_state(), self.loader.get_state(),
                           metadata={"config_hash": config_hash(self.config),
                                     "config": workdir_lib.config_record(self.config)},
                           force=force)

  # -- one iteration -------------------------------------------------------------------------------
  def _tokens(self, prompts):
    tokens = self.generator.tokenize(list(prompts))
    return sharding_lib.global_batch(tokens, self.mesh)

  def _set_spec_fns(self, spec: TreeSpec):
    """Jits the sampling, training and advantage functions of one rollout shape."""
    config, on_mesh = self.config, functools.partial(sharding_lib.with_mesh, mesh=self.mesh)
    self.spec = spec
    self.sample_fn = on_mesh(jax.jit(train_step_lib.make_sample_fn(
        self.policy, spec, self.sampler, self.sigmas, self.generator.latent_shape)))
    if self.text_cache is not None:
      self.sample_from_cond_fn = on_mesh(jax.jit(train_step_lib.make_sample_from_cond_fn(
          self.policy, spec, self.sampler, self.sigmas, self.generator.latent_shape)))
    train_step = train_step_lib.make_train_step(self.policy, self.tx, spec, self.sampler,
                                                self.sigmas, config.train)
    train_state_sh = {k: v for k, v in self.state_shardings.items() if k != "prompt_stats"}
    self.train_step = on_mesh(jax.jit(train_step, donate_argnums=(0,),
                                      out_shardings=(train_state_sh, None)))
    self.advantage_fn = on_mesh(jax.jit(train_step_lib.make_advantage_fn(spec, self.adv_cfg)))

  def _use_window(self, iteration: int):
    """Moving SDE windows: selects the iteration's window and its (cached) jitted functions."""
    if self.window_mode == "fixed":
      return
    cfg = self.config.sample
    window = schedule.moving_window(
        iteration, mode=self.window_mode, size=cfg.sde_window_size,
        window_range=tuple(cfg.sde_window_range), num_steps=cfg.num_steps, seed=self.config.seed,
        every=cfg.sde_window_every)
    if window == self.window:
      return
    if window not in self._window_fns:
      self._set_spec_fns(tree_spec_from_config(self.config, window))
      self._window_fns[window] = (self.spec, self.sample_fn, getattr(
          self, "sample_from_cond_fn", None), self.train_step, self.advantage_fn)
    (self.spec, self.sample_fn, self.sample_from_cond_fn, self.train_step,
     self.advantage_fn) = self._window_fns[window]
    self.window = window

  def sample_and_score(self, iteration: int, timer):
    """Samples every batch of the iteration; rewards of batch b run while b + 1 samples."""
    cfg = self.config
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), iteration), 0)
    L = self.spec.num_leaves
    batches, pending = [], []
    for b in range(cfg.sample.batches_per_iteration):
      data = next(self.loader)
      prompts = list(data["prompts"])
      with timer("sample"):
        sample_key = jax.random.fold_in(key, b)
        if self.text_cache is None:
          tokens = self._tokens(prompts)
          neg = self._tokens([cfg.sample.negative_prompt] * len(prompts))
          out, cond, neg_cond, images = self.sample_fn(
              self.state["trainable"], self.frozen, tokens, neg, sample_key)
        else:
          cond, neg_cond = self._cached_conditioning(prompts)
          out, images = self.sample_from_cond_fn(self.state["trainable"], self.frozen, cond,
                                                 neg_cond, sample_key)
        # Device rewards are queued behind this batch's sampling before the host waits for it.
        device = {name: r(images, prompts) for name, r in self.scorer.device.items()}
        local_images = sharding_lib.local_rows(images)  # waits for this batch only
      flat_images = local_images.reshape((-1,) + local_images.shape[2:])
      flat_prompts = [p for p in prompts for _ in range(L)]
      if self.scorer.host is not None:
        pending.append(self.scorer.host.submit(
            flat_images, flat_prompts, [m for m in data["metadata"] for _ in range(L)]))
      batches.append({"rollout": out, "cond": cond, "neg_cond": neg_cond, "data": data,
                      "images": local_images, "device_scores": device,
                      "flat_prompts": flat_prompts})
    with timer("reward_wait"):
      for b, batch in enumerate(batches):
        # Host rewards raise RewardError naming the reward and prompt.
        scores = pending[b].result() if self.scorer.host is not None else {}
        scores.update(self.scorer.device_scores(batch.pop("device_scores"),
                                                batch["flat_prompts"]))
        per_reward = np.stack([np.asarray(scores[n], np.float32) for n in cfg.reward.names], -1)
        batch["rewards"] = per_reward.reshape(-1, L, len(cfg.reward.names))
    return batches

  def _cached_conditioning(self, prompts):
    """Conditioning of this process's prompts (and the negative prompt) through the cache."""
    n = len(prompts)

    def encode(missing):
      # Every process encodes a full local batch (a collective), padded with its last prompt.
      padded = list(missing) + [missing[-1]] * (n - len(missing))
      cond = self.encode_fn(self.state["trainable"], self.frozen, self._tokens(padded))
      return jax.tree.map(sharding_lib.local_rows, cond)

    def lookup(batch):
      missing = [p for p in dict.fromkeys(batch) if p not in self.text_cache._entries]  # pylint: disable=protected-access
      need = bool(missing)
      if jax.process_count() > 1:
        need = bool(np.any(multihost_utils.process_allgather(np.array(need))))
      if need and not missing:  # another process encodes: take part with a dummy batch
        encode(list(batch[:1]))
      return self.text_cache.conditioning(batch, encode)

    cond = sharding_lib.global_batch(lookup(list(prompts)), self.mesh)
    neg_cond = None
    if self.sampler.guidance_scale != 1.0:
      neg = lookup([self.config.sample.negative_prompt])
      neg_cond = sharding_lib.global_batch(
          jax.tree.map(lambda a: np.repeat(a, n, axis=0), neg), self.mesh)
    return cond, neg_cond

  def train_iteration(self, iteration: int, timer) -> dict[str, float]:
    cfg = self.config
    self._use_window(iteration)
    batches = self.sample_and_score(iteration, timer)
    with timer("advantages"):
      adv, summary = self.iteration_advantages(batches)
    train_metrics = []
    train_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), iteration), 1)
    trainable_state = {k: v for k, v in self.state.items() if k != "prompt_stats"}
    with timer("train"):
      for epoch in range(cfg.train.inner_epochs):
        for b, batch in enumerate(batches):
          mbs, normalizer = self.minibatch_fn(self.training_data(batch, adv, b),
                                              jax.random.fold_in(train_key, epoch * 1000 + b))
          for j in range(cfg.train.num_minibatches):
            mb = jax.tree.map(lambda a: a[j], mbs)
            mb["cond"], mb["neg_cond"] = batch["cond"], batch["neg_cond"]
            mb["normalizer"] = normalizer[j]
            trainable_state, metrics = self.train_step(
                trainable_state, mb, jax.random.fold_in(train_key, j), self.frozen)
            train_metrics.append(metrics)
      jax.block_until_ready(trainable_state)
    self.state.update(trainable_state)

    out = train_step_lib.mean_metrics(train_metrics)
    summary = jax.device_get(summary)
    for k, name in enumerate(cfg.reward.names):  # over the global batch, on every process
      out[f"reward/{name}"] = float(summary.pop(f"reward/{k}"))
      out[f"reward/{name}_std"] = float(summary.pop(f"reward/{k}_std"))
    out.update({k: float(v) for k, v in summary.items()})
    out.update({
        "nfe/per_prompt": float(self.spec.nfe),
        "nfe/independent_per_prompt": float(self.spec.nfe_independent),
        "samples/leaves_per_prompt": float(self.spec.num_leaves),
    })
    return out

  def iteration_advantages(self, batches):
    """Advantages of every batch of an iteration, normalised over all of them together.

    Every process stacks its own rows of the B batches along axis 1, so the global reward array
    is [P, B, L, K] with row p = prompt p of each batch whatever the process count (joining the
    batches along the rows would order them (process, batch) on several hosts).

    Returns:
      (Advantages with transitions / keep [B, P, M] and nodes [B, P, N], summary scalars).
    """
    rewards = sharding_lib.global_batch(np.stack([b["rewards"] for b in batches], axis=1),
                                        self.mesh)
    index = sharding_lib.global_batch(
        np.stack([np.asarray(b["data"]["index"], np.int32) for b in batches], axis=1), self.mesh)
    adv, stats, summary = self.advantage_fn(rewards, index, self.state.get("prompt_stats"))
    if stats is not None:
      self.state["prompt_stats"] = stats
    return adv, summary

  @staticmethod
  def training_data(batch, adv, b: int) -> dict[str, jax.Array]:
    """The stored transitions of batch `b` with their advantages: {name: [P, M, ...]}."""
    r = batch["rollout"]
    return {"latents": r.latents, "next_latents": r.next_latents, "log_probs": r.log_probs,
            "steps": r.steps, "advantages": adv.transitions[b], "keep": adv.keep[b]}

  def render(self, prompts: list[str], seed: int) -> np.ndarray:
    """ODE samples (eval_num_steps, CFG) of `prompts` with noise from `seed`: uint8 [n, H, W, 3].

    The batch is padded to a multiple of the data-parallel size with the last prompt; each
    image depends only on its prompt, its row and the seed.
    """
    n = len(prompts)
    if n == 0:
      raise ValueError("render: no prompts given")
    multiple = sharding_lib.batch_size_multiple(self.mesh) * jax.process_count()
    padded = list(prompts) + [prompts[-1]] * (-n % multiple)
    rows = len(padded) // jax.process_count()
    local = padded[jax.process_index() * rows:(jax.process_index() + 1) * rows]
    tokens = self._tokens(local)
    neg = self._tokens([self.config.sample.negative_prompt] * len(local))
    # Evaluation images come from the EMA weights when they are kept (as in Flow-GRPO).
    weights = self.state.get("ema", self.state["trainable"])
    _, _, _, images = self.eval_fn(weights, self.frozen, tokens, neg,
                                   jax.random.key(seed))
    if jax.process_count() > 1:
      images = multihost_utils.process_allgather(images, tiled=True)
    return np.asarray(images)[:n, 0]

  def evaluate(self, iteration: int) -> dict[str, float]:
    """Renders the first log.num_eval_prompts evaluation prompts (ODE, fixed noise), writes
    their grid and returns the mean of every reward on them as {"eval/<reward>": value}."""
    n = max(1, self.config.log.num_eval_prompts)
    records = [self.eval_records[i % len(self.eval_records)] for i in range(n)]
    prompts = [r.prompt for r in records]
    images = self.render(prompts, self.config.seed + 12345)
    self.writer.write_images(iteration, "eval", images, prompts)
    scores = self.scorer.score(images, prompts, [dict(r.metadata) for r in records])
    return {f"eval/{name}": float(np.mean(scores[name])) for name in self.config.reward.names}

  def _log_evaluation(self, iteration: int, metrics: dict[str, float]) -> None:
    if self.is_primary:
      print(f"eval {iteration} | " + " ".join(f"{k[len('eval/'):]}={v:.3f}"
                                              for k, v in metrics.items()), flush=True)

  def _preemption_requested(self) -> bool:
    """True on every process once any process got SIGTERM (all stop at the same iteration)."""
    flag = self._sigterm
    if jax.process_count() > 1:
      flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
    return flag

  def run(self) -> dict[str, float]:
    cfg = self.config
    timer = metrics_lib.Timer()
    total = cfg.train.num_iterations
    bar = metrics_lib.ProgressBar(total=total, initial=self.start_iteration,
                                  enabled=self.is_primary and cfg.log.progress)
    metrics = {}
    self._sigterm = False
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
      def on_sigterm(signum, frame):
        del signum, frame
        logging.warning("SIGTERM: finishing this iteration, then checkpointing and exiting")
        self._sigterm = True
      previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
      return self._run(timer, bar, total, metrics)
    finally:
      if previous_handler is not None:
        signal.signal(signal.SIGTERM, previous_handler)

  def _run(self, timer, bar, total, metrics):
    cfg = self.config
    if self.start_iteration == 0 and cfg.log.eval_at_start and total > 0:
      # The baseline: the initial model on the evaluation prompts, logged as step 0.
      evaluation = self.evaluate(0)
      self.writer.write_scalars(0, evaluation)
      self._log_evaluation(0, evaluation)
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
      evaluation = {}
      if done % cfg.log.eval_every == 0 or done == total:
        t_eval = time.perf_counter()
        evaluation = self.evaluate(done)
        metrics.update(evaluation)
        metrics["time/eval"] = time.perf_counter() - t_eval
      self.writer.write_scalars(done, metrics)
      bar.update(1, metrics)  # a bar on a terminal, else one line (rewards, KL, phases, ETA)
      if evaluation:
        self._log_evaluation(done, evaluation)
      if self._preemption_requested():
        self.save(done, force=True)
        self.checkpointer.wait()
        bar.close()
        raise Preempted(f"preempted after iteration {done}; checkpoint written to {self.workdir}")
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
