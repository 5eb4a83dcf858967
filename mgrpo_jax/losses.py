"""GRPO policy loss on flow-matching transitions: PPO-clip plus a KL term to the reference policy.

Per transition i with advantage A_i and ratio r_i = exp(logp_new - logp_old):
  policy_i = max(-A_i r_i, -A_i clip(r_i, 1 - eps, 1 + eps))
  kl_i     = mean over latent elements of (mean_new - mean_ref)^2 / (2 std^2)
where, as in Flow-GRPO, `std` is the step's noise coefficient *before* the sqrt(-dt) factor
("flow_grpo", the default); "exact" divides by the transition variance instead, which is the
true KL between the two Gaussian transitions (per element).
loss = weighted mean_i policy_i + beta * weighted mean_i kl_i, weights from `keep`.

Weighted means divide by `normalizer` when it is given instead of by the minibatch's weight sum.
The trainer passes (weight sum of the whole batch) / (number of minibatches), so that minibatches
holding different numbers of real transitions (padding for trees whose transition count does not
split evenly) still weigh every real transition exactly once per epoch: the mean of the
minibatch losses is the batch's weighted mean loss.

GRPO-Guard (arXiv 2510.22319; Flow-GRPO's scripts/train_sd3_GRPO_Guard.py with `rationorm`)
adds two optional pieces, both off by default:
  RatioNorm: the SDE log-ratio log r = mean(2 e d - d^2) / (2 s^2) (e = x_next - mean_old,
    d = mean_new - mean_old, s the transition std) has mean -mean(d^2) / (2 s^2) < 0 under
    sampling, a negative bias that grows as s shrinks, and a spread ~ |d| / s that differs
    between steps. The source adds the bias back per sample (it stores mean_old) and multiplies
    by s, so the normalised log-ratio is mean(eps d) with eps the sampling noise: centred, with
    a spread that no longer depends on s. This library does not store mean_old, so the shift is
    estimated per denoising step from the minibatch: each step's weighted mean log-ratio
    (without gradient) is subtracted before scaling (`ratio_norm_log_ratio`). Before any update
    d = 0 and both agree exactly.
  Step reweighting: the source divides each step's policy loss by -dt = sigma_i - sigma_{i+1}
    (`step_weights`, from `step_reweight_weights`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

KL_MODES = ("flow_grpo", "exact")


class LossOutput(NamedTuple):
  loss: jax.Array
  metrics: dict[str, jax.Array]


def _weighted_mean(x: jax.Array, weights: jax.Array, normalizer=None) -> jax.Array:
  denom = weights.sum() if normalizer is None else normalizer
  return (x * weights).sum() / jnp.maximum(denom, 1e-12)


def gaussian_mean_kl(mean: jax.Array, ref_mean: jax.Array, std: jax.Array) -> jax.Array:
  """Per-example KL between N(mean, std^2) and N(ref_mean, std^2), averaged over elements.

  Args:
    mean, ref_mean: [B, ...] transition means of the policy and the reference.
    std: [B] the divisor's std (see module docstring).

  Returns:
    [B] float32.
  """
  sq = jnp.mean((mean - ref_mean) ** 2, axis=tuple(range(1, mean.ndim)))
  return sq / (2.0 * std**2)


def grpo_loss(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array, *,
              clip_range: float, mean: jax.Array | None = None,
              ref_mean: jax.Array | None = None, kl_std: jax.Array | None = None,
              beta: float = 0.0, weights: jax.Array | None = None,
              steps: jax.Array | None = None, num_steps: int | None = None,
              normalizer: jax.Array | float | None = None,
              ratio_norm_scale: jax.Array | None = None,
              step_weights: jax.Array | None = None) -> LossOutput:
  """PPO-clip GRPO loss with an optional KL penalty.

  Args:
    log_prob: [B] log-prob of the stored transitions under the current policy.
    old_log_prob: [B] log-prob at sampling time.
    advantages: [B] (already clipped).
    clip_range: PPO's eps.
    mean, ref_mean: [B, ...] transition means under the policy and the reference (for KL).
    kl_std: [B] the std that divides the squared mean difference (see module docstring).
    beta: KL weight; 0 skips the KL term (mean/ref_mean may then be None).
    weights: [B] per-transition loss weights (1 train, 0 drop); default all ones.
    steps: [B] int step index of each transition, for per-step ratio statistics.
    num_steps: T, needed with `steps`.
    normalizer: scalar divisor of every weighted mean (default: the sum of `weights`); see the
      module docstring.
    ratio_norm_scale: [B] GRPO-Guard's RatioNorm scale (`ratio_norm_scale`); given, the PPO ratio
      is exp(ratio_norm_log_ratio(...)) and needs `steps`. None (default): the plain ratio.
    step_weights: [B] per-transition factors on the policy term (GRPO-Guard's step
      reweighting); None = 1.

  Returns:
    LossOutput(loss scalar, metrics): policy_loss, kl, approx_kl (Flow-GRPO's
    0.5 * mean((logp - logp_old)^2)), clipfrac, ratio_mean, ratio_sq_mean (mean of ratio^2, so
    that the std over several minibatches can be formed exactly), ratio_std and, with `steps`,
    per-step sums ratio_sum_per_step / ratio_sq_sum_per_step and weights count_per_step [T],
    from which `per_step_ratio_stats` forms per-step means and stds. With RatioNorm the
    ratio statistics describe the raw ratio (before normalisation), clipfrac the normalised
    ratio that is clipped, and ratio_norm_sum_per_step / ratio_norm_sq_sum_per_step the
    normalised ratio per step.
  """
  weights = jnp.ones_like(advantages) if weights is None else weights
  raw_ratio = jnp.exp(log_prob - old_log_prob)
  ratio = raw_ratio
  if ratio_norm_scale is not None:
    if steps is None or num_steps is None:
      raise ValueError("ratio_norm_scale (RatioNorm) needs steps and num_steps")
    ratio = jnp.exp(ratio_norm_log_ratio(log_prob - old_log_prob, ratio_norm_scale, weights,
                                         steps, num_steps))
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  wmean = lambda x: _weighted_mean(x, weights, normalizer)
  policy_terms = jnp.maximum(unclipped, clipped)
  if step_weights is not None:
    policy_terms = policy_terms * step_weights
  policy_loss = wmean(policy_terms)
  loss = policy_loss
  metrics = {"policy_loss": policy_loss}
  if beta > 0.0:
    if mean is None or ref_mean is None or kl_std is None:
      raise ValueError("beta > 0 needs mean, ref_mean and kl_std")
    kl = wmean(gaussian_mean_kl(mean, ref_mean, kl_std))
    loss = loss + beta * kl
    metrics["kl"] = kl
  ratio_sg = jax.lax.stop_gradient(raw_ratio)
  delta = jax.lax.stop_gradient(log_prob - old_log_prob)
  ratio_mean, ratio_sq_mean = wmean(ratio_sg), wmean(ratio_sg**2)
  clipped_ratio = jax.lax.stop_gradient(ratio)
  metrics.update(
      loss=loss,
      approx_kl=wmean(0.5 * delta**2),
      clipfrac=wmean((jnp.abs(clipped_ratio - 1.0) > clip_range).astype(jnp.float32)),
      ratio_mean=ratio_mean,
      ratio_sq_mean=ratio_sq_mean,
      ratio_std=jnp.sqrt(jnp.maximum(ratio_sq_mean - ratio_mean**2, 0.0)),
  )
  if steps is not None:
    if num_steps is None:
      raise ValueError("per-step ratio statistics need num_steps")
    # Sums, not means: a minibatch may hold few transitions of a step; the host adds the sums
    # of all minibatches of an epoch before dividing (`per_step_ratio_stats`).
    metrics["count_per_step"] = jax.ops.segment_sum(weights, steps, num_steps)
    metrics["ratio_sum_per_step"] = jax.ops.segment_sum(ratio_sg * weights, steps, num_steps)
    metrics["ratio_sq_sum_per_step"] = jax.ops.segment_sum(ratio_sg**2 * weights, steps,
                                                           num_steps)
    if ratio_norm_scale is not None:
      metrics["ratio_norm_sum_per_step"] = jax.ops.segment_sum(clipped_ratio * weights, steps,
                                                               num_steps)
      metrics["ratio_norm_sq_sum_per_step"] = jax.ops.segment_sum(
          clipped_ratio**2 * weights, steps, num_steps)
  return LossOutput(loss, metrics)


STEP_REWEIGHTS = ("none", "inv_dt")


def ratio_norm_scale(method: str, cps_logprob: str, transition_std: jax.Array) -> jax.Array:
  """[B] factor that turns a step's log-ratio into RatioNorm's mean(eps * d) units.

  Gaussian log-densities ("sde", and "cps" with cps_logprob "exact") differ by
  mean(2 e d - d^2) / (2 s^2): the factor is s, the transition std (the source's
  `sqrt_dt * std_dev_t`). Flow-GRPO's CPS score -mean((x - mean)^2) differs by mean(2 e d - d^2):
  the factor is 1 / (2 s). Steps with s = 0 (deterministic) get 0.
  """
  s = jnp.asarray(transition_std, jnp.float32)
  if method == "cps" and cps_logprob == "flow_grpo":
    return jnp.where(s > 0, 0.5 / jnp.where(s > 0, s, 1.0), 0.0)
  return s


def ratio_norm_log_ratio(log_ratio: jax.Array, scale: jax.Array, weights: jax.Array,
                         steps: jax.Array, num_steps: int) -> jax.Array:
  """RatioNorm: per denoising step, centre the log-ratio and rescale it.

  Args:
    log_ratio: [B] log p_new - log p_old of each transition.
    scale: [B] `ratio_norm_scale` of each transition.
    weights: [B] loss weights; padding rows (0) do not enter the per-step means.
    steps: [B] int step index; num_steps: T.

  Returns:
    [B] (log_ratio - m[step]) * scale, where m[t] is the weighted mean of step t's log-ratios in
    this batch, taken without gradient (it estimates the source's per-sample bias
    -mean(d^2) / (2 s^2), see the module docstring).
  """
  lr = jax.lax.stop_gradient(log_ratio)
  count = jax.ops.segment_sum(weights, steps, num_steps)
  total = jax.ops.segment_sum(lr * weights, steps, num_steps)
  shift = jnp.where(count > 0, total / jnp.maximum(count, 1e-12), 0.0)
  return (log_ratio - shift[steps]) * scale


def step_reweight_weights(mode, sigma: jax.Array, sigma_prev: jax.Array) -> jax.Array | None:
  """GRPO-Guard's per-step policy-loss weights [B], or None for no reweighting.

  Args:
    mode: False / "none" (off) or True / "inv_dt": 1 / (sigma_i - sigma_{i+1}), the source's
      division of each step's policy loss by sqrt(-dt)^2.
    sigma, sigma_prev: [B] the step's sigmas.
  """
  if mode is True:
    mode = "inv_dt"
  elif mode is False:
    mode = "none"
  if mode not in STEP_REWEIGHTS:
    raise ValueError(f"train.step_reweight must be a bool or one of {STEP_REWEIGHTS}, "
                     f"got {mode!r}")
  if mode == "none":
    return None
  return 1.0 / (jnp.asarray(sigma, jnp.float32) - jnp.asarray(sigma_prev, jnp.float32))


def per_step_ratio_stats(count, ratio_sum, ratio_sq_sum):
  """Per-step ratio mean and std [T] from summed `count_per_step` / `ratio_*sum_per_step`.

  Steps without transitions get mean and std 0.
  """
  c = jnp.maximum(count, 1e-12)
  mean = jnp.where(count > 0, ratio_sum / c, 0.0)
  var = jnp.where(count > 0, ratio_sq_sum / c - mean**2, 0.0)
  return mean, jnp.sqrt(jnp.maximum(var, 0.0))
