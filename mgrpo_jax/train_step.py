"""The device functions of one iteration, as pure functions to jit (shapes static per TreeSpec).

  make_encode_fn(policy)              -> (trainable, frozen, tokens) -> conditioning [B, ...]
  make_sample_fn(policy, spec, ...)   -> (trainable, frozen, tokens, neg_tokens, key, *fold)
                                         -> (Rollout, cond, neg_cond, images uint8 [P, L, H, W, 3])
  make_sample_from_cond_fn(...)       -> the same from precomputed conditionings (text cache)
  make_advantage_fn(spec, cfg)        -> (rewards [P, B, L, K], prompt_index [P, B], stats)
                                         -> (Advantages [B, P, ...], stats, summary scalars)
  make_minibatch_fn(n)                -> (Transitions [P, M, ...], key, *fold)
                                         -> (Transitions [n, P, m, ...], normalizer [n])
  make_batch_minibatches_fn(n)        -> the same from (Rollout, advantages [B, P, M],
                                         keep [B, P, M], b, key, *fold): batch b's transitions
  take_minibatch                      -> (Transitions [n, ...], normalizer [n], j) -> row j
  make_train_step(policy, tx, ...)    -> (TrainState, Minibatch, frozen) -> (TrainState, metrics)
  mean_metrics(per-minibatch metrics) -> the epoch's "train/*" scalars (host side)
The state and the batches are typed pytrees (`TrainState`, `Transitions`, `Minibatch`). Random
functions take the run's base key and fold the iteration's path into it (`*fold`, integers)
inside the jitted function, as big_vision folds the step in its update: the host passes plain
integers and never holds per-iteration keys. The train step itself is deterministic.
`runtime.py` jits these with their shardings for training, sampling, evaluation and the benches.
Nothing here reads files, holds state or knows about processes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mgrpo_jax import advantages as adv_lib
from mgrpo_jax import losses
from mgrpo_jax.policy import Policy
from mgrpo_jax.sampling import rollout as rollout_lib
from mgrpo_jax.sampling import steps as steps_lib
from mgrpo_jax.sampling.tree import TreeSpec


@flax.struct.dataclass
class TrainState:
  """What the optimizer updates and the checkpoint keeps.

  Attributes:
    trainable: the trained weights (nnx.State; LoRA adapters or all weights).
    opt_state: the optax state of `trainable`.
    step: int32 [], minibatch updates done (optimizer updates x grad_accum_steps).
    ema: an exponential moving average of `trainable` (None unless train.ema_decay > 0).
    prompt_stats: per-prompt reward history [num_prompts, ...] (None unless
      advantage.per_prompt_history); updated by the advantage function, not the train step.
  """

  trainable: Any
  opt_state: Any
  step: jax.Array
  ema: Any = None
  prompt_stats: Any = None

  def to_checkpoint(self) -> dict[str, Any]:
    """{field: value} of the fields that are set: the checkpoint's tree."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None}

  @classmethod
  def from_checkpoint(cls, tree: dict[str, Any]) -> "TrainState":
    return cls(**tree)


@flax.struct.dataclass
class Transitions:
  """Stored transitions with their advantages, [P, M, ...] per prompt (minibatches [P, m, ...]).

  Attributes:
    latents, next_latents: float [P, M, h, w, c], the transition x_t -> x_{t-1}.
    log_probs: float32 [P, M], the sampler's log-prob of the transition when it was sampled.
    steps: int32 [P, M], the denoising step of each transition.
    advantages: float32 [P, M].
    keep: float32 [P, M], 1 for transitions that train (0: padding, pruned or dropped groups).
  """

  latents: jax.Array
  next_latents: jax.Array
  log_probs: jax.Array
  steps: jax.Array
  advantages: jax.Array
  keep: jax.Array

  @classmethod
  def from_rollout(cls, rollout, advantages, keep) -> "Transitions":
    return cls(rollout.latents, rollout.next_latents, rollout.log_probs, rollout.steps,
               advantages, keep)


@flax.struct.dataclass
class Minibatch:
  """One update's input: P prompts x m transitions and the prompts' conditioning.

  Attributes:
    transitions: Transitions [P, m, ...].
    cond, neg_cond: conditioning pytrees [P, ...] (neg_cond None without CFG).
    normalizer: float32 [], the divisor of the loss's weighted means (None: the minibatch's
      `keep` sum; see `make_minibatch_fn`).
  """

  transitions: Transitions
  cond: Any
  neg_cond: Any = None
  normalizer: Any = None


@dataclasses.dataclass
class SampledBatch:
  """One sampled batch of an iteration (P prompts, this process's p of them on the host).

  Attributes:
    rollout: the Rollout (global device arrays [P, ...]).
    cond, neg_cond: the prompts' conditioning (global, [P, ...]; neg_cond None without CFG).
    prompt_index: int32 [p], the prompts' rows in the dataset.
    rewards: float32 [p, L, K] in config order (set once the rewards are in).
  """

  rollout: Any
  cond: Any
  neg_cond: Any
  prompt_index: np.ndarray
  rewards: np.ndarray | None = None


# Folded into the run's key after the iteration: sampling and minibatch shuffling draw apart.
FOLD_SAMPLE, FOLD_SHUFFLE = 0, 1


def fold_key(key: jax.Array, *fold) -> jax.Array:
  """`key` with each integer of `fold` folded in, in order (traced or not: same bits)."""
  for data in fold:
    key = jax.random.fold_in(key, data)
  return key


def make_encode_fn(policy: Policy):
  """(trainable, frozen, tokens) -> conditioning pytree [B, ...]."""

  def encode_fn(trainable, frozen, tokens):
    return policy.module(trainable, frozen).encode_text(tokens)

  return encode_fn


def make_sample_from_cond_fn(policy: Policy, spec: TreeSpec, sampler, sigmas, latent_shape):
  """(trainable, frozen, cond, neg_cond, key, *fold) -> (Rollout, images uint8 [P, L, H, W, 3])."""

  def sample_from_cond_fn(trainable, frozen, cond, neg_cond, key, *fold):
    model = policy.module(trainable, frozen)
    out = rollout_lib.rollout(policy.velocity_fn(trainable, frozen), cond, neg_cond,
                              fold_key(key, *fold), spec, sigmas, latent_shape, sampler)
    P, L = out.final_latents.shape[:2]
    images = model.decode(out.final_latents.reshape((P * L,) + out.final_latents.shape[2:]))
    images = jnp.round(jnp.clip(images, 0.0, 1.0) * 255).astype(jnp.uint8)
    return out, images.reshape((P, L) + images.shape[1:])

  return sample_from_cond_fn


def make_sample_fn(policy: Policy, spec: TreeSpec, sampler, sigmas, latent_shape):
  """(trainable, frozen, tokens, neg_tokens, key, *fold) -> (Rollout, cond, neg_cond, images
  uint8 [P, L, H, W, 3]); the noise comes from `key` with `fold` folded in."""
  encode = make_encode_fn(policy)
  from_cond = make_sample_from_cond_fn(policy, spec, sampler, sigmas, latent_shape)

  def sample_fn(trainable, frozen, tokens, neg_tokens, key, *fold):
    cond = encode(trainable, frozen, tokens)
    use_cfg = sampler.guidance_scale != 1.0
    neg_cond = encode(trainable, frozen, neg_tokens) if use_cfg else None
    out, images = from_cond(trainable, frozen, cond, neg_cond, key, *fold)
    return out, cond, neg_cond, images

  return sample_fn


def make_advantage_fn(spec: TreeSpec, cfg: adv_lib.AdvantageConfig):
  """Builds fn(rewards [P, B, L, K], prompt_index [P, B], stats) -> (Advantages [B, P, ...],
  stats, summary): one iteration's B batches normalised together, summaries on device."""

  def advantage_fn(rewards, prompt_index, stats):
    """rewards [P, B, L, K], prompt_index [P, B] -> (Advantages [B, P, ...], stats, summary)."""
    P, B = prompt_index.shape
    rewards = jnp.swapaxes(rewards, 0, 1).reshape((B * P,) + rewards.shape[2:])
    prompt_index = jnp.swapaxes(prompt_index, 0, 1).reshape(-1)
    leaf_stats = None
    if stats is not None:
      stats, mean, std = adv_lib.update_prompt_stats(
          stats, prompt_index, adv_lib.stats_rewards(rewards, cfg))
      leaf_stats = (mean, std)
    adv = adv_lib.compute_advantages(rewards, spec, cfg, leaf_stats)
    # Summaries are reduced here, on device, so the host reads replicated scalars even when the
    # batch spans processes.
    summary = {"advantage/mean": adv.transitions.mean(), "advantage/std": adv.transitions.std(),
               "advantage/abs_max": jnp.abs(adv.transitions).max(initial=0.0),
               "advantage/kept_fraction": adv.keep.mean()}
    # The credit each tree level gets: mean |A| of its nodes (level 0 = the roots' steps).
    for j, (off, size) in enumerate(zip(spec.level_offsets, spec.level_sizes)):
      summary[f"advantage/abs_mean/level_{j}"] = jnp.abs(adv.nodes[:, off:off + size]).mean()
      # The share of the level's transitions that train (pruning, train_levels, zero groups).
      on_level = np.asarray(spec.node_level)[spec.transition_node] == j
      if on_level.any():
        summary[f"advantage/kept_fraction/level_{j}"] = adv.keep[:, on_level].mean()
    for k in range(rewards.shape[-1]):
      summary[f"reward/{k}"] = rewards[..., k].mean()
      summary[f"reward/{k}_std"] = rewards[..., k].std()
    per_batch = lambda a: a.reshape((B, P) + a.shape[1:])
    adv = adv_lib.Advantages(per_batch(adv.transitions), per_batch(adv.nodes),
                             per_batch(adv.values), per_batch(adv.keep))
    return adv, stats, summary

  return advantage_fn


def make_train_step(policy: Policy, tx, spec: TreeSpec, sampler, sigmas, train_cfg):
  """Builds train_step(state, batch, frozen) -> (state, metrics).

  state: TrainState (its `prompt_stats` is not read; pass it as None so it is not donated).
  batch: Minibatch of P prompts x m transitions each (see `Minibatch`, `Transitions`).
  The update is deterministic (the loss re-scores stored transitions), so it takes no key.
  """
  sigmas = jnp.asarray(sigmas)
  ema_decay = float(train_cfg.get("ema_decay", 0.0))
  ema_every = int(train_cfg.get("ema_every", 1))
  ema_warmup = bool(train_cfg.get("ema_warmup", False))
  accum = max(int(train_cfg.get("grad_accum_steps", 1)), 1)
  beta = float(train_cfg.beta)
  clip_range = float(train_cfg.clip_range)
  kl_mode = train_cfg.kl_mode
  if kl_mode not in losses.KL_MODES:
    raise ValueError(f"train.kl_mode must be one of {losses.KL_MODES}, got {kl_mode!r}")
  # GRPO-Guard (losses.py): RatioNorm and per-step reweighting of the policy loss.
  ratio_norm = bool(train_cfg.get("ratio_norm", False))
  step_reweight = train_cfg.get("step_reweight", "none")
  losses.step_reweight_weights(step_reweight, 1.0, 0.0)  # validates the mode before tracing

  def train_step(state: TrainState, batch: Minibatch, frozen):
    data = batch.transitions
    P, m = data.log_probs.shape
    flat = lambda a: a.reshape((P * m,) + a.shape[2:])
    x, x_next = flat(data.latents), flat(data.next_latents)
    step = flat(data.steps)
    sigma, sigma_prev = sigmas[step], sigmas[step + 1]
    per_transition = lambda c: None if c is None else rollout_lib.repeat_cond(c, m)
    cond, neg_cond = per_transition(batch.cond), per_transition(batch.neg_cond)

    def loss_fn(trainable):
      v = rollout_lib.guided_velocity(policy.velocity_fn(trainable, frozen), x, sigma, cond,
                                      neg_cond, sampler.guidance_scale)
      # The rollout's own step function re-scores the stored transition.
      out = rollout_lib.sampler_step(sampler, v, x, sigmas, step, prev_sample=x_next)
      ref_mean = None
      if beta > 0:
        v_ref = rollout_lib.guided_velocity(policy.velocity_fn(trainable, frozen, reference=True),
                                            x, sigma, cond, neg_cond, sampler.guidance_scale)
        ref_mean, _, _ = steps_lib.transition_mean_std(
            sampler.method, jax.lax.stop_gradient(v_ref), x, sigma, sigma_prev,
            noise_level=sampler.noise_level, sigma_max=sigmas[1])
      kl_std = out.std if kl_mode == "flow_grpo" else out.transition_std
      norm_scale = (losses.ratio_norm_scale(sampler.method, sampler.cps_logprob,
                                            out.transition_std) if ratio_norm else None)
      res = losses.grpo_loss(out.log_prob, flat(data.log_probs), flat(data.advantages),
                             clip_range=clip_range, mean=out.mean, ref_mean=ref_mean,
                             kl_std=kl_std, beta=beta, weights=flat(data.keep), steps=step,
                             num_steps=spec.num_steps, normalizer=batch.normalizer,
                             ratio_norm_scale=norm_scale,
                             step_weights=losses.step_reweight_weights(step_reweight, sigma,
                                                                       sigma_prev))
      return res.loss, res.metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.trainable)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    # The minibatch's weight in the epoch's metrics: its loss divisor (see `mean_metrics`).
    metrics["minibatch_weight"] = (batch.normalizer if batch.normalizer is not None
                                   else data.keep.sum()).astype(jnp.float32)
    new_state = state.replace(trainable=trainable, opt_state=opt_state, step=state.step + 1)
    if state.ema is not None:
      # EMA of the trained weights (Flow-GRPO evaluates with it), updated after every
      # `ema_every`-th optimizer update (with gradient accumulation an update is `accum`
      # minibatches). With warm-up the decay is Flow-GRPO's min((1 + u) / (10 + u), decay) for
      # u optimizer updates before this one (flow_grpo/ema.py, get_current_decay).
      updates_done = new_state.step // accum  # optimizer updates, this one included
      is_update = new_state.step % accum == 0
      decay = jnp.asarray(ema_decay, jnp.float32)
      if ema_warmup:
        u = (updates_done - 1).astype(jnp.float32)
        decay = jnp.minimum((1.0 + u) / (10.0 + u), decay)
      decay = jnp.where(is_update & (updates_done % ema_every == 0), decay, 1.0)
      new_state = new_state.replace(ema=jax.tree.map(
          lambda e, p: decay * e + (1.0 - decay) * p, state.ema, trainable))
    return new_state, metrics

  return train_step


def minibatch_layout(num_transitions: int, num_minibatches: int) -> tuple[np.ndarray, np.ndarray]:
  """Static split of M shuffled positions into `num_minibatches` rows of equal length.

  Position p goes to minibatch p % n, slot p // n, so minibatch sizes differ by at most one real
  transition; the slots past M are padding.

  Returns:
    (position int32 [n, m], valid bool [n, m]) with m = ceil(M / n); padded slots point at
    position 0 and are not valid.
  """
  n, M = num_minibatches, num_transitions
  if n < 1:
    raise ValueError(f"train.num_minibatches must be >= 1, got {n}")
  if n > M:
    raise ValueError(f"train.num_minibatches={n} is more than the {M} stored transitions per "
                     f"prompt: a minibatch would hold nothing but padding")
  m = -(-M // n)
  position = np.arange(n * m).reshape(m, n).T
  valid = position < M
  return np.where(valid, position, 0).astype(np.int32), valid


def make_minibatch_fn(num_minibatches: int):
  """Shuffles every prompt's transitions independently and splits them into minibatches.

  Any transition count M per prompt works: minibatches hold ceil(M / n) rows, the rows past M are
  padding with `keep` 0 (see `minibatch_layout`). Shuffling along the transition axis only keeps
  each prompt's rows on its data shard.
  Returns fn(data: Transitions [P, M, ...], key, *fold) -> (Transitions [n, P, m, ...],
  normalizer [n]): the shuffle's key is `key` with the integers `fold` folded in (inside the
  jitted function), and the normalizer of every minibatch is (sum of `keep` over the batch) / n,
  the divisor that makes the mean of the n minibatch losses the batch's weighted mean loss.
  """

  def fn(data: Transitions, key, *fold):
    key = fold_key(key, *fold)
    P, M = data.log_probs.shape
    position, valid = minibatch_layout(M, num_minibatches)
    n, m = position.shape
    perm = jax.vmap(lambda k: jax.random.permutation(k, M))(jax.random.split(key, P))
    rows = perm[:, position.reshape(-1)]  # [P, n * m] transition index of every slot

    def split(a):
      idx = rows.reshape(rows.shape + (1,) * (a.ndim - 2))
      a = jnp.take_along_axis(a, idx, axis=1)
      return jnp.swapaxes(a.reshape((P, n, m) + a.shape[2:]), 0, 1)

    out = jax.tree.map(split, data)
    out = out.replace(keep=out.keep * jnp.asarray(valid, out.keep.dtype)[:, None, :])
    normalizer = jnp.full([n], data.keep.sum() / n, jnp.float32)
    return out, normalizer

  return fn


def make_batch_minibatches_fn(num_minibatches: int):
  """`make_minibatch_fn` of one sampled batch, with the batch's advantages picked inside.

  Returns fn(rollout, advantages, keep, b, key, *fold) -> (Transitions [n, P, m, ...],
  normalizer [n]) for the transitions of `rollout` (one batch, [P, M, ...]) with
  advantages[b] and keep[b] (the iteration's [B, P, M] arrays, `make_advantage_fn`). Picking
  row b in here rather than on the host keeps every input of the iteration's functions an
  output of another jitted function, so their shardings are known when the run compiles ahead
  of time (`Runtime.compile_iteration`); the values are the same (a copy).
  """
  split = make_minibatch_fn(num_minibatches)

  def batch_minibatches(rollout, advantages, keep, b, key, *fold):
    return split(Transitions.from_rollout(rollout, advantages[b], keep[b]), key, *fold)

  return batch_minibatches


def take_minibatch(minibatches: Transitions, normalizer: jax.Array, j):
  """Row j of a split (`make_minibatch_fn`): (Transitions [P, m, ...], normalizer []).
  Jitted by the runtime for the reason given in `make_batch_minibatches_fn`."""
  return jax.tree.map(lambda a: a[j], minibatches), normalizer[j]


def mean_metrics(metrics_list) -> dict[str, float]:
  """Epoch metrics from a list of per-minibatch metric dicts (one device_get for all of them).

  Scalars are averaged over minibatches weighted by their loss divisors (`minibatch_weight`):
  every minibatch's weighted means divide by its batch's kept weight / num_minibatches, so this
  is the weighted mean over every kept transition of the epoch, and batches whose transitions
  were all dropped count for nothing. Per-step sums are added before dividing.
  """
  if not metrics_list:
    return {}
  host = jax.device_get(metrics_list)
  stacked = {name: np.stack([np.asarray(m[name], np.float64) for m in host]) for name in host[0]}
  weight = stacked.pop("minibatch_weight", np.ones(len(host)))
  total = weight.sum()
  average = lambda v: float((v * weight).sum() / total) if total > 0 else 0.0
  out = {}
  for name, values in stacked.items():
    if values.ndim == 1:
      out[f"train/{name}"] = average(values)
  if "ratio_sq_mean" in stacked:
    mean, sq = average(stacked["ratio_mean"]), average(stacked.pop("ratio_sq_mean"))
    out.pop("train/ratio_sq_mean")
    out["train/ratio_std"] = float(np.sqrt(max(sq - mean**2, 0.0)))
  if "count_per_step" in stacked:
    count = stacked["count_per_step"].sum(0)
    mean, std = losses.per_step_ratio_stats(count, stacked["ratio_sum_per_step"].sum(0),
                                            stacked["ratio_sq_sum_per_step"].sum(0))
    for s, c in enumerate(count):
      if c > 0:  # report each step that has transitions
        out[f"train/ratio_mean_per_step/{s}"] = float(mean[s])
        out[f"train/ratio_std_per_step/{s}"] = float(std[s])
    if "ratio_norm_sum_per_step" in stacked:  # GRPO-Guard's ratio after RatioNorm
      mean, std = losses.per_step_ratio_stats(count, stacked["ratio_norm_sum_per_step"].sum(0),
                                              stacked["ratio_norm_sq_sum_per_step"].sum(0))
      for s, c in enumerate(count):
        if c > 0:
          out[f"train/ratio_norm_mean_per_step/{s}"] = float(mean[s])
          out[f"train/ratio_norm_std_per_step/{s}"] = float(std[s])
  return out


def iteration_metrics(train_metrics, summary, reward_names, spec: TreeSpec) -> dict[str, float]:
  """An iteration's logged scalars: the epochs' `mean_metrics`, the advantage function's summary
  with reward k renamed reward/<name> (means and stds over the global batch) and the rollout's
  NFE and leaves per prompt."""
  out = mean_metrics(train_metrics)
  summary = jax.device_get(summary)
  for k, name in enumerate(reward_names):
    out[f"reward/{name}"] = float(summary.pop(f"reward/{k}"))
    out[f"reward/{name}_std"] = float(summary.pop(f"reward/{k}_std"))
  out.update({k: float(v) for k, v in summary.items()})
  out.update({"nfe/per_prompt": float(spec.nfe),
              "nfe/independent_per_prompt": float(spec.nfe_independent),
              "samples/leaves_per_prompt": float(spec.num_leaves)})
  return out
