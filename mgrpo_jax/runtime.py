"""The device side of a job, built once from its config: `build_runtime(config, mesh, purpose)`.

Training, mgrpo-sample / mgrpo-eval (through `pipeline.load_pipeline`) and the benches build the
generator, the policy's weights and the jitted functions here, so they sample with the same
code:
  purpose "sample": generator, Policy, weights (trainable / frozen), sampler, sigmas and the
      jitted ODE sampler of any (steps, guidance) (`ode_sample_fn`). No optimizer state and, when
      the config's KL weight is 0, no reference copy of the weights.
  purpose "train": also the rollout tree, the advantage settings, the optimizer, the initial
      `TrainState` (`init_state`) and the jitted functions of one iteration for a rollout shape
      (`iteration_fns(spec)`, `fns_for_iteration(i)`: sample, advantages, train step; cached
      per shape, so a moving SDE window compiles each of its positions once), the minibatch
      split and the text encoder. Batch-size and rollout-shape errors are raised here;
      `check_iteration` (tracing) and `compile_iteration` (ahead-of-time compilation on the
      loop's shardings) raise shape and compiler errors before the trainer samples anything.
Every function is traced inside the mesh, so the models' activation sharding hints apply; the
train step also gets the state's output shardings and donates its input state. Nothing here
reads prompts, rewards or the workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mgrpo_jax import advantages as adv_lib
from mgrpo_jax import export
from mgrpo_jax import policy as policy_lib
from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax import train_step as train_step_lib
from mgrpo_jax.models import registry
from mgrpo_jax.sampling import rollout as rollout_lib
from mgrpo_jax.sampling import schedule
from mgrpo_jax.sampling.tree import TreeSpec, tree_spec_from_config

PURPOSES = ("train", "sample")


@dataclasses.dataclass(frozen=True)
class IterationFns:
  """The jitted functions of one rollout shape (see train_step.py for their signatures).

  Attributes:
    spec: the rollout tree they are built for.
    sample: (trainable, frozen, tokens, neg_tokens, key, *fold) -> (Rollout, cond, neg_cond,
      images uint8 [P, L, H, W, 3]).
    sample_from_cond: the same from cached conditionings (cond, neg_cond instead of tokens).
    advantage: (rewards [P, B, L, K], prompt_index [P, B], stats) -> (Advantages, stats, summary).
    train_step: (TrainState without prompt_stats, Minibatch, frozen) -> (TrainState, metrics);
      donates its state.
  """

  spec: TreeSpec
  sample: Callable
  sample_from_cond: Callable
  advantage: Callable
  train_step: Callable


class Runtime:
  """See the module docstring; build with `build_runtime`."""

  def __init__(self, config: ml_collections.ConfigDict, mesh, purpose: str):
    if purpose not in PURPOSES:
      raise ValueError(f"runtime purpose must be one of {PURPOSES}, got {purpose!r}")
    self.config, self.mesh, self.purpose = config, mesh, purpose
    if purpose == "train":  # before any weights are made
      P, multiple = config.data.prompts_per_batch, sharding_lib.batch_size_multiple(mesh)
      if P % multiple:
        raise ValueError(f"data.prompts_per_batch={P} must be divisible by the data x fsdp "
                         f"mesh size {multiple} (each prompt's tree stays on one shard)")
      if P % jax.process_count():
        raise ValueError(f"data.prompts_per_batch={P} must be divisible by the process count "
                         f"{jax.process_count()}")
    self.generator = registry.get_generator(config.model)
    self.sampler = rollout_lib.sampler_from_config(config)
    graphdef, trainable, self.frozen = policy_lib.build_model_states(self.generator, config, mesh)
    self.policy = policy_lib.Policy(graphdef, bool(config.lora.enabled))
    self.on_mesh = functools.partial(sharding_lib.with_mesh, mesh=mesh)
    self._ode_fns, self._iteration_fns = {}, {}
    if purpose == "sample":
      self.trainable = trainable
      return
    if config.sample.sde_window_mode not in schedule.WINDOW_MODES:
      raise ValueError(f"sample.sde_window_mode must be one of {schedule.WINDOW_MODES}, got "
                       f"{config.sample.sde_window_mode!r}")
    # A moving SDE window builds every position's rollout shape now, so a branch step outside
    # some position is an error before anything runs.
    if config.sample.sde_window_mode != "fixed":
      cfg = config.sample
      for window in schedule.window_positions(size=cfg.sde_window_size,
                                              window_range=tuple(cfg.sde_window_range),
                                              num_steps=cfg.num_steps):
        try:
          tree_spec_from_config(config, window)
        except ValueError as e:
          raise ValueError(f"moving SDE window position {window}: {e}") from e
    self.spec = tree_spec_from_config(config)
    self.adv_cfg = adv_lib.AdvantageConfig.from_config(config)
    self.adv_cfg.check_tree(self.spec)
    self.sigmas = schedule.generator_sigmas(self.generator, config, config.sample.num_steps)
    self.trainable = export.init_from_config(trainable, config)  # lora.init_from, if set
    self.tx = policy_lib.make_optimizer(config)
    # The minibatch split of one sampled batch, and one minibatch of a split (see
    # train_step.make_batch_minibatches_fn for why both are jitted).
    self.split_fn = self.on_mesh(jax.jit(train_step_lib.make_batch_minibatches_fn(
        config.train.num_minibatches)))
    self.take_fn = self.on_mesh(jax.jit(train_step_lib.take_minibatch))
    self.encode_fn = self.on_mesh(jax.jit(train_step_lib.make_encode_fn(self.policy)))
    self.state_shardings = None  # set by init_state

  def init_state(self, num_prompts: int) -> train_step_lib.TrainState:
    """The initial TrainState, every array in its sharding (`num_prompts`: rows of the
    per-prompt reward history, used with advantage.per_prompt_history)."""
    config, replicated = self.config, sharding_lib.replicated(self.mesh)
    ema = prompt_stats = None
    if config.train.ema_decay > 0:
      ema = jax.tree.map(jnp.copy, self.trainable)
    if config.advantage.per_prompt_history:
      k = 1 if self.adv_cfg.mode == "reward_mixing" else len(self.adv_cfg.weights)
      prompt_stats = jax.device_put(adv_lib.init_prompt_stats(num_prompts, k), replicated)
    state = train_step_lib.TrainState(
        trainable=self.trainable,
        opt_state=policy_lib.init_opt_state(self.tx, self.trainable, self.mesh),
        step=jax.device_put(jnp.zeros([], jnp.int32), replicated), ema=ema,
        prompt_stats=prompt_stats)
    self.state_shardings = jax.tree.map(lambda a: a.sharding, state)
    return state

  def iteration_fns(self, spec: TreeSpec | None = None) -> IterationFns:
    """The jitted sample / advantage / train-step functions of rollout shape `spec` (default
    the config's), built once per shape."""
    spec = self.spec if spec is None else spec
    if spec in self._iteration_fns:
      return self._iteration_fns[spec]
    if self.state_shardings is None:
      raise RuntimeError("Runtime.iteration_fns: call init_state first (the train step is "
                         "jitted with the state's shardings)")
    args = (self.policy, spec, self.sampler, self.sigmas, self.generator.latent_shape)
    train_step = train_step_lib.make_train_step(self.policy, self.tx, spec, self.sampler,
                                                self.sigmas, self.config.train)
    out_state = self.state_shardings.replace(prompt_stats=None)
    fns = IterationFns(
        spec=spec,
        sample=self.on_mesh(jax.jit(train_step_lib.make_sample_fn(*args))),
        sample_from_cond=self.on_mesh(jax.jit(train_step_lib.make_sample_from_cond_fn(*args))),
        advantage=self.on_mesh(jax.jit(train_step_lib.make_advantage_fn(spec, self.adv_cfg))),
        train_step=self.on_mesh(jax.jit(train_step, donate_argnums=(0,),
                                        out_shardings=(out_state, None))))
    self._iteration_fns[spec] = fns
    return fns

  def fns_for_iteration(self, iteration: int) -> IterationFns:
    """The jitted functions of an iteration's rollout shape: the config's, or with a moving SDE
    window (sample.sde_window_mode) the shape of that iteration's window."""
    cfg = self.config.sample
    if cfg.sde_window_mode == "fixed":
      return self.iteration_fns()
    window = schedule.moving_window(
        iteration, mode=cfg.sde_window_mode, size=cfg.sde_window_size,
        window_range=tuple(cfg.sde_window_range), num_steps=cfg.num_steps, seed=self.config.seed,
        every=cfg.sde_window_every)
    return self.iteration_fns(tree_spec_from_config(self.config, window))

  def train_epochs(self, fns: IterationFns, state: train_step_lib.TrainState, batches, adv,
                   key: jax.Array, iteration: int):
    """The PPO epochs of one iteration: for every epoch and batch, the batch's transitions with
    their advantages are shuffled (key folded with (iteration, FOLD_SHUFFLE, epoch * 1000 + b))
    and split into train.num_minibatches minibatches, each one train step.

    Args:
      fns: the iteration's functions; state: TrainState without prompt_stats (donated).
      batches: the iteration's SampledBatch list (rollout, cond, neg_cond).
      adv: Advantages with transitions / keep [B, P, M] (`make_advantage_fn`).

    Returns:
      (the updated TrainState, the list of every step's metrics).
    """
    metrics = []
    for epoch in range(self.config.train.inner_epochs):
      for b, batch in enumerate(batches):
        mbs, normalizer = self.split_fn(batch.rollout, adv.transitions, adv.keep, b, key,
                                        iteration, train_step_lib.FOLD_SHUFFLE, epoch * 1000 + b)
        for j in range(self.config.train.num_minibatches):
          transitions, normalizer_j = self.take_fn(mbs, normalizer, j)
          mb = train_step_lib.Minibatch(transitions, batch.cond, batch.neg_cond, normalizer_j)
          state, step_metrics = fns.train_step(state, mb, self.frozen)
          metrics.append(step_metrics)
    jax.block_until_ready(state)
    return state, metrics

  def check_iteration(self, state: train_step_lib.TrainState, key: jax.Array,
                      spec: TreeSpec | None = None) -> None:
    """Traces one iteration of rollout shape `spec` (default the config's) on abstract values,
    in the order the trainer calls its functions: sample (and, with the text cache, sampling
    from cached conditionings), advantages, the minibatch split and the train step. Nothing is
    computed or compiled (`jax.eval_shape`); a shape or dtype error in any function raises here,
    before the first batch is sampled, as a ShapeCheckError naming the function and the shape.

    Args:
      state: the initial TrainState (init_state); key: the run's base key.
    """
    fns = self.iteration_fns(spec)
    cfg = self.config
    P, B, K = cfg.data.prompts_per_batch, cfg.sample.batches_per_iteration, len(cfg.reward.names)
    prompts = [""] * (P // jax.process_count())
    # The jitted functions themselves (not their set_mesh wrappers), traced inside the mesh.
    shape_of = lambda fn, *args: jax.eval_shape(getattr(fn, "__wrapped__", fn), *args)
    spec = fns.spec
    what = lambda stage: (f"{stage} (rollout: {spec.num_steps} steps, {spec.num_roots} roots, "
                          f"branching at {spec.branch_steps} x {spec.branch_factors}, "
                          f"{spec.num_leaves} leaves; {P} prompts x {B} batches)")
    with jax.set_mesh(self.mesh):
      with _naming(what("sampling")):
        rollout, cond, neg_cond, _ = shape_of(
            fns.sample, state.trainable, self.frozen, self.tokens(prompts), self.tokens(prompts),
            key, 0, 0, 0)
      if cfg.sample.text_cache_size > 0:
        with _naming(what("sampling from cached conditionings")):
          shape_of(fns.sample_from_cond, state.trainable, self.frozen, cond, neg_cond, key,
                   0, 0, 0)
      with _naming(what("advantages")):
        rewards = jax.ShapeDtypeStruct((P, B, spec.num_leaves, K), jnp.float32)
        adv, _, _ = shape_of(fns.advantage, rewards, jax.ShapeDtypeStruct((P, B), jnp.int32),
                             state.prompt_stats)
      with _naming(what("minibatch split")):
        mbs, normalizer = shape_of(self.split_fn, rollout, adv.transitions, adv.keep, 0, key,
                                   0, 0, 0)
        transitions, normalizer = shape_of(self.take_fn, mbs, normalizer, 0)
      with _naming(what("train step")):
        batch = train_step_lib.Minibatch(transitions, cond, neg_cond, normalizer)
        shape_of(fns.train_step, state.replace(prompt_stats=None), batch, self.frozen)

  def compile_iteration(self, state: train_step_lib.TrainState, key: jax.Array,
                        spec: TreeSpec | None = None) -> dict[str, Any]:
    """Compiles the functions of one iteration of rollout shape `spec` ahead of time, in the
    order the trainer calls them, on the exact shapes and shardings of the arrays it will pass:
    concrete arrays where the trainer makes them (weights, state, tokens, key, rewards from the
    host), and each compiled function's own output shardings for what the next one receives.
    The executables land in jit's caches, so the run's first iteration calls them without
    compiling again (tests/test_recompile.py checks it), and a compiler error (a sharding XLA
    cannot partition, device memory) stops the run here, before any sampling. Call after
    `check_iteration`, whose tracing names shape errors better than a compiler does.

    Returns:
      {"sample" or "encode" and "sample_from_cond", "advantage", "split", "take", "train_step":
      jax.stages.Compiled}; the train step's memory estimate is logged when the backend gives
      one.
    """
    fns = self.iteration_fns(spec)
    cfg = self.config
    P, B, K = cfg.data.prompts_per_batch, cfg.sample.batches_per_iteration, len(cfg.reward.names)
    local = P // jax.process_count()
    tokens = self.tokens([""] * local)
    compile_ = lambda fn, *args: getattr(fn, "__wrapped__", fn).lower(*args).compile()
    out = {}
    with jax.set_mesh(self.mesh):
      if cfg.sample.text_cache_size > 0:
        # The text cache hands over host rows as global batches (sharding_lib.global_batch).
        out["encode"] = compile_(self.encode_fn, state.trainable, self.frozen, tokens)
        as_batch = lambda s: jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=sharding_lib.batch_sharding(self.mesh, len(s.shape)))
        cond = jax.tree.map(as_batch, out["encode"].out_info)
        neg_cond = cond if self.sampler.guidance_scale != 1.0 else None
        out["sample_from_cond"] = compile_(fns.sample_from_cond, state.trainable, self.frozen,
                                           cond, neg_cond, key, 0, 0, 0)
        rollout = _outputs(out["sample_from_cond"])[0]
      else:
        out["sample"] = compile_(fns.sample, state.trainable, self.frozen, tokens, tokens, key,
                                 0, 0, 0)
        rollout, cond, neg_cond, _ = _outputs(out["sample"])
      rewards = sharding_lib.global_batch(np.zeros((local, B, fns.spec.num_leaves, K),
                                                   np.float32), self.mesh)
      index = sharding_lib.global_batch(np.zeros((local, B), np.int32), self.mesh)
      out["advantage"] = compile_(fns.advantage, rewards, index, state.prompt_stats)
      adv = _outputs(out["advantage"])[0]
      out["split"] = compile_(self.split_fn, rollout, adv.transitions, adv.keep, 0, key, 0, 0, 0)
      out["take"] = compile_(self.take_fn, *_outputs(out["split"]), 0)
      transitions, normalizer = _outputs(out["take"])
      batch = train_step_lib.Minibatch(transitions, cond, neg_cond, normalizer)
      out["train_step"] = compile_(fns.train_step, state.replace(prompt_stats=None), batch,
                                   self.frozen)
    memory = out["train_step"].memory_analysis()
    if memory is not None:
      logging.info("train step compiled: %.1f MiB of arguments, %.1f MiB of outputs, %.1f MiB "
                   "of temporaries per device", memory.argument_size_in_bytes / 2**20,
                   memory.output_size_in_bytes / 2**20, memory.temp_size_in_bytes / 2**20)
    return out

  def ode_sample_fn(self, steps: int, guidance: float | None = None) -> Callable:
    """Jitted (trainable, frozen, tokens, neg_tokens, key) -> uint8 images [P, H, W, 3]: `steps`
    deterministic ODE steps with CFG scale `guidance` (default the config's), one image per
    prompt; built once per (steps, guidance)."""
    guidance = self.sampler.guidance_scale if guidance is None else float(guidance)
    if (steps, guidance) not in self._ode_fns:
      sampler = dataclasses.replace(self.sampler, guidance_scale=guidance)
      spec = TreeSpec(steps, 1, (), (), (False,) * steps)
      sigmas = schedule.generator_sigmas(self.generator, self.config, steps)
      sample = train_step_lib.make_sample_fn(self.policy, spec, sampler, sigmas,
                                             self.generator.latent_shape)
      self._ode_fns[steps, guidance] = self.on_mesh(jax.jit(
          lambda *args: sample(*args)[3][:, 0]))
    return self._ode_fns[steps, guidance]

  def render(self, trainable, prompts, seed: int, steps: int | None = None,
             guidance: float | None = None, negative_prompt: str | None = None) -> np.ndarray:
    """ODE samples of `prompts` (the same list on every process): uint8 [n, H, W, 3].

    Args:
      trainable: the weights to sample with (the trained state or its EMA).
      prompts: n prompts; steps, guidance, negative_prompt: override the config's.
      seed: the noise seed.

    `steps` defaults to sample.eval_num_steps, `guidance` to the config's CFG scale. The batch
    is padded with the last prompt to a multiple of the data-parallel size (times the process
    count); row i's noise depends only on (seed, i), so each image depends only on its prompt,
    its row and the seed.
    """
    n = len(prompts)
    if n == 0:
      raise ValueError("render: no prompts given")
    steps = int(self.config.sample.eval_num_steps if steps is None else steps)
    if steps < 1:
      raise ValueError(f"steps must be >= 1, got {steps}")
    negative = (self.config.sample.negative_prompt if negative_prompt is None
                else negative_prompt)
    # A mesh over several processes renders each process's share; a local mesh (a notebook's
    # pipeline on one host of many) renders everything itself.
    spans = not sharding_lib.replicated(self.mesh).is_fully_addressable
    processes, index = (jax.process_count(), jax.process_index()) if spans else (1, 0)
    padded = list(prompts) + [prompts[-1]] * (
        -n % (sharding_lib.batch_size_multiple(self.mesh) * processes))
    rows = len(padded) // processes
    local = padded[index * rows:(index + 1) * rows]
    images = self.ode_sample_fn(steps, guidance)(
        trainable, self.frozen, self.tokens(local), self.tokens([negative] * len(local)),
        jax.random.key(seed))
    if processes > 1:
      images = multihost_utils.process_allgather(images, tiled=True)
    return np.asarray(images)[:n]

  def tokens(self, prompts) -> Any:
    """Token pytree of this process's `prompts`, as a global batch sharded on the mesh."""
    return sharding_lib.global_batch(self.generator.tokenize(list(prompts)), self.mesh)


def _outputs(compiled) -> Any:
  """A compiled function's outputs as abstract values with their shardings: the arguments to
  compile the functions that take them with."""
  return jax.tree.map(lambda info, sharding: jax.ShapeDtypeStruct(info.shape, info.dtype,
                                                                  sharding=sharding),
                      compiled.out_info, compiled.output_shardings)


class ShapeCheckError(ValueError):
  """A jitted function of the run failed to trace on the run's shapes (Runtime.check_iteration)."""


@contextlib.contextmanager
def _naming(what: str):
  """Re-raises a tracing error of the block as a ShapeCheckError that says which function and
  which shapes it was traced for (jax's own message names only the primitive)."""
  try:
    yield
  except (TypeError, ValueError, IndexError) as e:
    raise ShapeCheckError(f"{what} does not trace: {type(e).__name__}: {e}") from e


def build_runtime(config: ml_collections.ConfigDict, mesh, purpose: str = "train") -> Runtime:
  """Builds the generator, weights and jitted functions of `config` on `mesh` (see the module
  docstring for what each purpose holds)."""
  return Runtime(config, mesh, purpose)
