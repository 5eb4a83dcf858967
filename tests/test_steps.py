"""Schedule and stochastic steps against hand-written formulas in float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgrpo_jax.sampling import schedule, steps


def test_sigmas_shift_one_is_linear_in_unshifted_time():
  # With shift 1 the schedule is linspace(1, 1/1000, T) then 0.
  np.testing.assert_allclose(schedule.flow_match_sigmas(4, shift=1.0),
                             [1.0, 0.667, 0.334, 0.001, 0.0], rtol=1e-6)


def test_sigmas_shift_three_by_hand():
  # sigma_min = 3*0.001/(1+2*0.001) = 0.0029940...; linspace(1, sigma_min, 3) = 1, 0.50150, 0.0029940;
  # shifted: 1, 3*0.5015/(1+2*0.5015) = 0.751123..., 3*0.002994/(1+2*0.002994) = 0.0089284...
  expected = [1.0, 0.7511230, 0.0089285, 0.0]
  np.testing.assert_allclose(schedule.flow_match_sigmas(3, shift=3.0), expected, rtol=2e-5)


def test_sde_mask_default_and_window():
  np.testing.assert_array_equal(schedule.sde_step_mask(4, None), [1, 1, 1, 0])
  np.testing.assert_array_equal(schedule.sde_step_mask(5, (1, 3)), [0, 1, 1, 0, 0])
  with pytest.raises(ValueError, match="window"):
    schedule.sde_step_mask(4, (3, 6))


def _np_gauss_logprob(x, mean, std):
  lp = -((x - mean) ** 2) / (2 * std**2) - np.log(std) - 0.5 * np.log(2 * np.pi)
  return lp.reshape(lp.shape[0], -1).mean(1)


@pytest.mark.parametrize("sigma,sigma_prev", [(0.8, 0.6), (1.0, 0.9)])
def test_sde_step_matches_float64_gaussian(sigma, sigma_prev):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
  v = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
  sigma_max, a = 0.95, 0.7
  out = jax.jit(lambda k: steps.step_with_logprob(
      "sde", v, x, jnp.full([3], sigma), jnp.full([3], sigma_prev), noise_level=a,
      sigma_max=sigma_max, key=k))(jax.random.key(1))
  # Independent float64 computation of Flow-GRPO's SDE transition.
  x64, v64 = x.astype(np.float64), v.astype(np.float64)
  s_for_std = sigma_max if sigma == 1.0 else sigma
  std_t = a * np.sqrt(sigma / (1 - s_for_std))
  dt = sigma_prev - sigma
  mean = x64 * (1 + std_t**2 / (2 * sigma) * dt) + v64 * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
  prev = np.asarray(out.prev_sample, np.float64)
  np.testing.assert_allclose(out.mean, mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.std, np.full(3, std_t), rtol=1e-6)
  np.testing.assert_allclose(out.log_prob, _np_gauss_logprob(prev, mean, std_t * np.sqrt(-dt)),
                             rtol=1e-5)
  # Re-scoring the stored transition gives back the sampling-time log-prob.
  again = steps.step_with_logprob("sde", v, x, jnp.full([3], sigma), jnp.full([3], sigma_prev),
                                  noise_level=a, sigma_max=sigma_max, prev_sample=out.prev_sample)
  np.testing.assert_allclose(again.log_prob, out.log_prob, rtol=1e-6)  # eager vs jit rounding


def test_sde_noise_has_the_transition_std():
  x = np.zeros((1, 64, 64, 4), np.float32)
  v = np.zeros_like(x)
  out = steps.step_with_logprob("sde", v, x, 0.5, 0.4, noise_level=0.7, sigma_max=0.9,
                                key=jax.random.key(0))
  expected = 0.7 * np.sqrt(0.5 / 0.5) * np.sqrt(0.1)
  assert abs(float(np.std(out.prev_sample)) - expected) / expected < 0.02


def test_cps_step_by_hand():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 3, 3, 2)).astype(np.float32)
  v = rng.standard_normal((2, 3, 3, 2)).astype(np.float32)
  sigma, sigma_prev, eta = 0.7, 0.5, 0.6
  out = steps.step_with_logprob("cps", v, x, sigma, sigma_prev, noise_level=eta, sigma_max=0.9,
                                key=jax.random.key(3))
  std = sigma_prev * np.sin(eta * np.pi / 2)
  x64, v64 = x.astype(np.float64), v.astype(np.float64)
  x0 = x64 - sigma * v64
  x1 = x64 + (1 - sigma) * v64
  mean = x0 * (1 - sigma_prev) + x1 * np.sqrt(sigma_prev**2 - std**2)
  np.testing.assert_allclose(out.mean, mean, rtol=1e-5, atol=1e-6)
  prev = np.asarray(out.prev_sample, np.float64)
  # Flow-GRPO's CPS score: -mean((prev - mean)^2), no constants, no variance.
  np.testing.assert_allclose(out.log_prob, -((prev - mean) ** 2).reshape(2, -1).mean(1), rtol=1e-5)
  exact = steps.step_with_logprob("cps", v, x, sigma, sigma_prev, noise_level=eta, sigma_max=0.9,
                                  prev_sample=out.prev_sample, cps_logprob="exact")
  np.testing.assert_allclose(exact.log_prob, _np_gauss_logprob(prev, mean, std), rtol=1e-5)


def test_cps_last_step_is_deterministic_with_zero_exact_logprob():
  x = np.ones((1, 2, 2, 1), np.float32)
  v = np.full_like(x, 0.5)
  out = steps.step_with_logprob("cps", v, x, 0.1, 0.0, noise_level=0.5, sigma_max=0.9,
                                key=jax.random.key(0), cps_logprob="exact")
  np.testing.assert_allclose(out.prev_sample, x - 0.1 * v, rtol=1e-6)  # x0 prediction
  np.testing.assert_array_equal(out.log_prob, [0.0])


def test_ode_step():
  x = np.ones((1, 2, 2, 1), np.float32)
  v = np.full_like(x, 2.0)
  np.testing.assert_allclose(steps.ode_step(v, x, 0.5, 0.3), x + 2.0 * (0.3 - 0.5), rtol=1e-6)


def test_step_needs_exactly_one_of_key_and_sample():
  x = np.zeros((1, 2, 2, 1), np.float32)
  with pytest.raises(ValueError, match="exactly one"):
    steps.step_with_logprob("sde", x, x, 0.5, 0.4, noise_level=0.7, sigma_max=0.9)
  with pytest.raises(ValueError, match="unknown stochastic step method"):
    steps.step_with_logprob("ddim", x, x, 0.5, 0.4, noise_level=0.7, sigma_max=0.9,
                            key=jax.random.key(0))


def test_sigmas_equal_diffusers_scheduler():
  pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  for steps_, shift in ((10, 3.0), (40, 3.0), (4, 1.0)):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps_)
    np.testing.assert_allclose(schedule.flow_match_sigmas(steps_, shift), ref.sigmas.numpy(),
                               rtol=1e-6, atol=1e-7)
