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
              normalizer: jax.Array | float | None = None) -> LossOutput:
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

  Returns:
    LossOutput(loss scalar, metrics): policy_loss, kl, approx_kl (Flow-GRPO's
    0.5 * mean((logp - logp_old)^2)), clipfrac, ratio_mean, ratio_sq_mean (mean of ratio^2, so
    that the std over several minibatches can be formed exactly), ratio_std and, with `steps`,
    per-step sums ratio_sum_per_step / ratio_sq_sum_per_step and weights count_per_step [T],
    from which `per_step_ratio_stats` forms per-step means and stds.
  """
  weights = jnp.ones_like(advantages) if weights is None else weights
  ratio = jnp.exp(log_prob - old_log_prob)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  wmean = lambda x: _weighted_mean(x, weights, normalizer)
  policy_loss = wmean(jnp.maximum(unclipped, clipped))
  loss = policy_loss
  metrics = {"policy_loss": policy_loss}
  if beta > 0.0:
    if mean is None or ref_mean is None or kl_std is None:
      raise ValueError("beta > 0 needs mean, ref_mean and kl_std")
    kl = wmean(gaussian_mean_kl(mean, ref_mean, kl_std))
    loss = loss + beta * kl
    metrics["kl"] = kl
  ratio_sg = jax.lax.stop_gradient(ratio)
  delta = jax.lax.stop_gradient(log_prob - old_log_prob)
  ratio_mean, ratio_sq_mean = wmean(ratio_sg), wmean(ratio_sg**2)
  metrics.update(
      loss=loss,
      approx_kl=wmean(0.5 * delta**2),
      clipfrac=wmean((jnp.abs(ratio_sg - 1.0) > clip_range).astype(jnp.float32)),
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
  return LossOutput(loss, metrics)


def per_step_ratio_stats(count, ratio_sum, ratio_sq_sum):
  """Per-step ratio mean and std [T] from summed `count_per_step` / `ratio_*sum_per_step`.

  Steps without transitions get mean and std 0.
  """
  c = jnp.maximum(count, 1e-12)
  mean = jnp.where(count > 0, ratio_sum / c, 0.0)
  var = jnp.where(count > 0, ratio_sq_sum / c - mean**2, 0.0)
  return mean, jnp.sqrt(jnp.maximum(var, 0.0))
