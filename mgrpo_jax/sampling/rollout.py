"""Flat and tree rollouts: batched denoising over all live nodes with per-step log-probs.

The live latents of a batch of prompts are one array [P, n, h, w, c] (prompt-major, so a data-
sharded prompt axis keeps each prompt's whole tree on one shard). Between branch steps the
denoising is a `lax.scan` over steps; at a branch step the model runs once on the parents, and
latents and velocities are `jnp.repeat`-ed k times before each copy draws its own noise. No
Python recursion and no per-node model calls: the number of model evaluations is the tree's true
count (`TreeSpec.nfe`).

Noise for step s is `normal(fold_in(key, s), [P * n_s, h, w, c])` and the initial noise uses
`fold_in(key, num_steps)`, so a tree whose branch factors are all 1 reproduces the flat rollout
with the same key exactly, and values do not depend on how the batch is sharded.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mgrpo_jax.sampling import steps as steps_lib
from mgrpo_jax.sampling.tree import TreeSpec

# velocity_fn(x [B, h, w, c], sigma [B], cond pytree [B, ...]) -> v [B, h, w, c]
VelocityFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Static sampler settings (hashable).

  Attributes:
    method: "sde" or "cps" for the stochastic steps.
    noise_level: SDE noise scale a / CPS eta.
    guidance_scale: classifier-free guidance weight; 1.0 disables CFG (one model call per step).
    cps_logprob: "flow_grpo" or "exact" (see steps.step_with_logprob).
    same_latent: a prompt's roots share one initial noise.
  """

  method: str = "sde"
  noise_level: float = 0.7
  guidance_scale: float = 4.5
  cps_logprob: str = "flow_grpo"
  same_latent: bool = False

  def __post_init__(self):
    if self.method not in steps_lib.SDE_METHODS:
      raise ValueError(f"sampler method {self.method!r} unknown; expected {steps_lib.SDE_METHODS}")
    if self.noise_level <= 0:
      raise ValueError(f"noise_level must be > 0 for stochastic steps, got {self.noise_level}")
    if self.method == "cps" and self.noise_level >= 1:
      raise ValueError(f"cps needs noise_level (eta) < 1, got {self.noise_level}")


def sampler_from_config(config) -> SamplerConfig:
  """The `config.sample` group of a run's ConfigDict as a SamplerConfig."""
  return SamplerConfig(
      method=config.sample.method, noise_level=float(config.sample.noise_level),
      guidance_scale=float(config.sample.guidance_scale), cps_logprob=config.sample.cps_logprob,
      same_latent=bool(config.sample.same_latent))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rollout:
  """Everything training needs from one batch of rollouts (P prompts, M stored transitions each).

  Attributes:
    latents: [P, M, h, w, c] float32, latent before each stored transition.
    next_latents: [P, M, h, w, c] float32, latent after it (the sampled prev_sample).
    log_probs: [P, M] float32, sampling-time log-prob of each transition.
    steps: [P, M] int32, step index of each transition (same for every prompt).
    nodes: [P, M] int32, global node id (TreeSpec numbering) owning each transition.
    final_latents: [P, L, h, w, c] float32, the leaves' clean latents, to decode.
  """

  latents: jax.Array
  next_latents: jax.Array
  log_probs: jax.Array
  steps: jax.Array
  nodes: jax.Array
  final_latents: jax.Array


def repeat_cond(cond: Any, n: int) -> Any:
  """Per-prompt conditioning [P, ...] -> per-node [P * n, ...] in prompt-major order."""
  return jax.tree.map(lambda a: jnp.repeat(a, n, axis=0), cond)


def guided_velocity(velocity_fn: VelocityFn, x: jax.Array, sigma: jax.Array, cond: Any,
                    neg_cond: Any | None, guidance_scale: float) -> jax.Array:
  """Classifier-free guided velocity v_u + w (v_c - v_u), in one batched model call.

  Args:
    velocity_fn: the model.
    x: [B, h, w, c]; sigma: [B]; cond, neg_cond: pytrees with leading axis B.
    guidance_scale: w; with w == 1 or no neg_cond the model runs once on cond.

  Returns:
    [B, h, w, c] float32.
  """
  if neg_cond is None or guidance_scale == 1.0:
    return velocity_fn(x, sigma, cond).astype(jnp.float32)
  both = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), neg_cond, cond)
  v = velocity_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([sigma, sigma], axis=0), both)
  v_uncond, v_cond = jnp.split(v.astype(jnp.float32), 2, axis=0)
  return v_uncond + guidance_scale * (v_cond - v_uncond)


def sampler_step(sampler: SamplerConfig, velocity: jax.Array, x: jax.Array, sigmas: jax.Array,
                 step: jax.Array, *, key: jax.Array | None = None,
                 prev_sample: jax.Array | None = None) -> steps_lib.StepOutput:
  """The sampler's stochastic step from x at `step`: sampling (`key`) or re-scoring (`prev_sample`).

  The rollout stores log-probs with it and the loss re-scores the stored transitions with it, so
  both come from one formula (method, noise level, CPS log-prob variant, sigma_max = sigmas[1]).

  Args:
    sampler: the sampling settings.
    velocity: [N, ...] model velocity at x (guided).
    x: [N, ...] latents at sigmas[step].
    sigmas: [T + 1] schedule.
    step: scalar or [N] int32 step indices.
    key / prev_sample: exactly one (see `steps.step_with_logprob`).
  """
  return steps_lib.step_with_logprob(
      sampler.method, velocity, x, sigmas[step], sigmas[step + 1],
      noise_level=sampler.noise_level, sigma_max=sigmas[1], key=key, prev_sample=prev_sample,
      cps_logprob=sampler.cps_logprob)


def rollout(velocity_fn: VelocityFn, cond: Any, neg_cond: Any | None, key: jax.Array,
            spec: TreeSpec, sigmas: jax.Array | np.ndarray, latent_shape: tuple[int, int, int],
            sampler: SamplerConfig) -> Rollout:
  """Samples a tree (or flat group) of trajectories for every prompt.

  Call inside `jax.jit` with `spec`, `latent_shape` and `sampler` static.

  Args:
    velocity_fn: model velocity, see VelocityFn.
    cond: per-prompt conditioning, leaves [P, ...].
    neg_cond: unconditional (negative prompt) conditioning [P, ...] for CFG, or None.
    key: PRNG key of this batch.
    spec: tree shape; `TreeSpec(num_roots=G)` with no branches is Flow-GRPO's flat group.
    sigmas: [T + 1] schedule (schedule.flow_match_sigmas).
    latent_shape: (h, w, c).
    sampler: static sampler settings.

  Returns:
    Rollout with M = spec.num_transitions and L = spec.num_leaves.
  """
  num_prompts = jax.tree.leaves(cond)[0].shape[0]
  T = spec.num_steps
  sigmas = jnp.asarray(sigmas, jnp.float32)
  if sigmas.shape != (T + 1,):
    raise ValueError(f"sigmas must have shape ({T + 1},) for {T} steps, got {sigmas.shape}")
  sde_steps = jnp.asarray(spec.sde_steps)

  def velocity(x, step, n):
    """x [P, n, ...] at `step` -> guided velocity [P, n, ...]."""
    flat = x.reshape((num_prompts * n,) + x.shape[2:])
    sigma = jnp.broadcast_to(sigmas[step], (flat.shape[0],))
    node_cond = repeat_cond(cond, n)
    node_neg = None if neg_cond is None else repeat_cond(neg_cond, n)
    v = guided_velocity(velocity_fn, flat, sigma, node_cond, node_neg, sampler.guidance_scale)
    return v.reshape(x.shape)

  def transition(x, v, step):
    """One step from x [P, n, ...] with velocity v; SDE or ODE as the spec says."""
    n = x.shape[1]
    flat = lambda a: a.reshape((num_prompts * n,) + a.shape[2:])
    out = sampler_step(sampler, flat(v), flat(x), sigmas, step,
                       key=jax.random.fold_in(key, step))
    # Steps outside the SDE window are deterministic; inside a scan the choice is per step, so
    # both are computed from the one model call and selected (elementwise, cheap).
    is_sde = sde_steps[step]
    ode_next = steps_lib.ode_step(v, x, sigmas[step], sigmas[step + 1])
    x_next = jnp.where(is_sde, out.prev_sample.reshape(x.shape), ode_next)
    log_prob = jnp.where(is_sde, out.log_prob.reshape(num_prompts, n), 0.0)
    return x_next, log_prob

  def run_steps(x, start, stop):
    """lax.scan over steps [start, stop) at a fixed live count; returns per-step outputs."""
    n = x.shape[1]

    def body(x, step):
      x_next, log_prob = transition(x, velocity(x, step, n), step)
      return x_next, (x, x_next, log_prob)

    return jax.lax.scan(body, x, jnp.arange(start, stop))

  init = jax.random.normal(
      jax.random.fold_in(key, T),
      (num_prompts, 1 if sampler.same_latent else spec.num_roots) + tuple(latent_shape))
  x = jnp.broadcast_to(init, (num_prompts, spec.num_roots) + tuple(latent_shape))

  stored = {"latents": [], "next_latents": [], "log_probs": []}
  for (level, start, stop), keep_steps in zip(spec.segments, spec.stored_steps_per_segment):
    per_step = []  # (x, x_next, log_prob) stacked over the steps of this segment
    first = start
    if level > 0:
      # Branch: evaluate the model once per parent, then give each of the k copies its own noise.
      k = spec.branch_factors[level - 1]
      v = velocity(x, start, x.shape[1])
      x, v = jnp.repeat(x, k, axis=1), jnp.repeat(v, k, axis=1)
      x_next, log_prob = transition(x, v, start)
      per_step.append(jax.tree.map(lambda a: a[None], (x, x_next, log_prob)))
      x = x_next
      first = start + 1
    if stop > first:
      x, ys = run_steps(x, first, stop)
      per_step.append(ys)
    if not keep_steps:
      continue
    xs, x_nexts, log_probs = (jnp.concatenate(parts, axis=0) for parts in zip(*per_step))
    keep = np.asarray(keep_steps) - start  # static positions of the stored steps
    for name, a in (("latents", xs), ("next_latents", x_nexts), ("log_probs", log_probs)):
      a = a[keep]  # [S, P, n, ...] -> per prompt, (step, node) order
      a = jnp.swapaxes(a, 0, 1)
      stored[name].append(a.reshape((num_prompts, -1) + a.shape[3:]))

  h, w, c = latent_shape
  def cat(parts, tail):
    if parts:
      return jnp.concatenate(parts, axis=1)
    return jnp.zeros((num_prompts, 0) + tail, jnp.float32)

  broadcast = lambda a: jnp.broadcast_to(jnp.asarray(a, jnp.int32), (num_prompts, a.shape[0]))
  return Rollout(
      latents=cat(stored["latents"], (h, w, c)),
      next_latents=cat(stored["next_latents"], (h, w, c)),
      log_probs=cat(stored["log_probs"], ()),
      steps=broadcast(spec.transition_step),
      nodes=broadcast(spec.transition_node),
      final_latents=x,
  )
