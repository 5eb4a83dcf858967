"""One denoising step of a flow-matching sampler, with the log-prob of its Gaussian transition.

`step_with_logprob` serves both sampling (given a PRNG key it draws `prev_sample`) and
re-scoring during training (given the stored `prev_sample` it returns that sample's log-prob
under the current model's mean). Using one function for both is what makes the PPO ratio exactly
1 before the first update. Everything is computed in float32 whatever the model dtype.

Conventions: latents x [B, h, w, c]; sigma, sigma_prev broadcast against x's batch ([B] or []);
step i goes from sigma = sigmas[i] to sigma_prev = sigmas[i + 1] (< sigma), dt = sigma_prev - sigma.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

SDE_METHODS = ("sde", "cps")
CPS_LOGPROBS = ("flow_grpo", "exact")


class StepOutput(NamedTuple):
  """Result of one stochastic step.

  Attributes:
    prev_sample: [B, ...] float32, the latent at sigma_prev.
    log_prob: [B] float32, log-density of prev_sample averaged over the non-batch axes.
    mean: [B, ...] float32, the Gaussian transition mean.
    std: [B] float32, the step's noise coefficient *before* the sqrt(-dt) factor for `sde`
      (Flow-GRPO's `std_dev_t`; the transition std is `std * sqrt(-dt)`), the transition std for
      `cps`.
    transition_std: [B] float32, the actual standard deviation of prev_sample given x.
  """

  prev_sample: jax.Array
  log_prob: jax.Array
  mean: jax.Array
  std: jax.Array
  transition_std: jax.Array


def _expand(a: jax.Array, like: jax.Array) -> jax.Array:
  """[B] or [] -> broadcastable against [B, ...]."""
  a = jnp.asarray(a, jnp.float32)
  if a.ndim == 0:
    return a
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def _mean_over_nonbatch(a: jax.Array) -> jax.Array:
  return jnp.mean(a, axis=tuple(range(1, a.ndim)))


def ode_step(velocity: jax.Array, x: jax.Array, sigma: jax.Array,
             sigma_prev: jax.Array) -> jax.Array:
  """Deterministic Euler step of the probability-flow ODE: x + v * (sigma_prev - sigma)."""
  x = x.astype(jnp.float32)
  dt = _expand(sigma_prev, x) - _expand(sigma, x)
  return x + velocity.astype(jnp.float32) * dt


def transition_mean_std(method: str, velocity: jax.Array, x: jax.Array, sigma: jax.Array,
                        sigma_prev: jax.Array, *, noise_level: float | jax.Array,
                        sigma_max: float | jax.Array):
  """Mean and noise scales of the stochastic transition x_sigma -> x_sigma_prev.

  Args:
    method: "sde" (Flow-GRPO's SDE) or "cps" (coefficients-preserving sampling).
    velocity: [B, ...] predicted velocity v = eps - x0.
    x: [B, ...] latent at sigma.
    sigma, sigma_prev: [B] or [] noise levels (sigma_prev < sigma).
    noise_level: the SDE's `a` (Flow-GRPO's noise_level) or CPS's eta.
    sigma_max: the schedule's second sigma, used by `sde` in place of sigma where sigma = 1
      (the SDE's std is singular at sigma = 1).

  Returns:
    (mean [B, ...], std [B] as in StepOutput.std, transition_std [B]), all float32.
  """
  x = x.astype(jnp.float32)
  v = velocity.astype(jnp.float32)
  s = _expand(sigma, x)
  s_prev = _expand(sigma_prev, x)
  dt = s_prev - s
  if method == "sde":
    s_safe = jnp.where(s == 1.0, jnp.asarray(sigma_max, jnp.float32), s)
    std = noise_level * jnp.sqrt(s / (1.0 - s_safe))
    mean = (x * (1.0 + std**2 / (2.0 * s) * dt)
            + v * (1.0 + std**2 * (1.0 - s) / (2.0 * s)) * dt)
    transition_std = std * jnp.sqrt(-dt)
  elif method == "cps":
    std = s_prev * jnp.sin(jnp.asarray(noise_level, jnp.float32) * (jnp.pi / 2))
    x0 = x - s * v
    x1 = x + (1.0 - s) * v
    mean = x0 * (1.0 - s_prev) + x1 * jnp.sqrt(jnp.maximum(s_prev**2 - std**2, 0.0))
    transition_std = std
  else:
    raise ValueError(f"unknown stochastic step method {method!r}; expected one of {SDE_METHODS}")
  per_example = lambda a: jnp.broadcast_to(a, x.shape[:1] + (1,) * (x.ndim - 1)).reshape(x.shape[:1])
  return mean, per_example(std), per_example(transition_std)


def gaussian_log_prob(sample: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """log N(sample; mean, std^2) per element, averaged over non-batch axes.

  std [B]; where std == 0 the transition is deterministic and the log-prob is defined as 0 (it
  carries no gradient signal and would otherwise be infinite).
  """
  std_b = _expand(std, sample)
  safe = jnp.where(std_b > 0, std_b, 1.0)
  lp = (-((sample - mean) ** 2) / (2.0 * safe**2) - jnp.log(safe)
        - 0.5 * jnp.log(2.0 * jnp.pi))
  lp = jnp.where(std_b > 0, lp, 0.0)
  return _mean_over_nonbatch(lp)


def step_with_logprob(method: str, velocity: jax.Array, x: jax.Array, sigma: jax.Array,
                      sigma_prev: jax.Array, *, noise_level: float | jax.Array,
                      sigma_max: float | jax.Array, key: jax.Array | None = None,
                      prev_sample: jax.Array | None = None,
                      cps_logprob: str = "flow_grpo") -> StepOutput:
  """Stochastic step (sampling) or re-scoring of a stored transition.

  Exactly one of `key` (sample) or `prev_sample` (re-score) is given.

  Log-prob:
    - `sde`: exact Gaussian log-density with std `std * sqrt(-dt)` (as Flow-GRPO).
    - `cps` with cps_logprob="flow_grpo": `-(prev - mean)^2`, Flow-GRPO's CPS score, which drops
      the constants and the variance; this rescales the PPO ratio by 2*std^2 relative to the exact
      density, which the clip range was tuned for. "exact" gives the Gaussian log-density.
    Both are averaged over all non-batch axes.

  Args:
    method: "sde" or "cps".
    velocity: [B, ...] model velocity at (x, sigma).
    x: [B, ...] current latent.
    sigma, sigma_prev: [B] or [] noise levels of this step.
    noise_level: SDE noise scale / CPS eta.
    sigma_max: the schedule's second sigma (see transition_mean_std).
    key: PRNG key to draw prev_sample with.
    prev_sample: [B, ...] stored next latent to re-score (gradient is stopped through it).
    cps_logprob: "flow_grpo" or "exact", for method "cps".

  Returns:
    StepOutput, float32.
  """
  if (key is None) == (prev_sample is None):
    raise ValueError("step_with_logprob needs exactly one of `key` (sample) or `prev_sample` "
                     "(re-score)")
  if cps_logprob not in CPS_LOGPROBS:
    raise ValueError(f"cps_logprob must be one of {CPS_LOGPROBS}, got {cps_logprob!r}")
  x = x.astype(jnp.float32)
  mean, std, transition_std = transition_mean_std(
      method, velocity, x, sigma, sigma_prev, noise_level=noise_level, sigma_max=sigma_max)
  if prev_sample is None:
    eps = jax.random.normal(key, x.shape, jnp.float32)
    prev_sample = mean + _expand(transition_std, x) * eps
  prev_sample = jax.lax.stop_gradient(prev_sample.astype(jnp.float32))
  if method == "cps" and cps_logprob == "flow_grpo":
    log_prob = _mean_over_nonbatch(-((prev_sample - mean) ** 2))
  else:
    log_prob = gaussian_log_prob(prev_sample, mean, transition_std)
  return StepOutput(prev_sample, log_prob, mean, std, transition_std)
