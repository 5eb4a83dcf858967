"""GRPO loss against hand-computed PPO-clip and KL values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgrpo_jax import losses


def test_ppo_clip_by_hand():
  ratio = np.array([1.5, 1.5, 0.5, 0.5], np.float32)
  adv = np.array([1.0, -1.0, 1.0, -1.0], np.float32)
  out = losses.grpo_loss(jnp.log(ratio), jnp.zeros(4), adv, clip_range=0.2)
  # max(-A r, -A clip(r)): -1.2, 1.5, -0.5, 0.8 -> mean 0.15.
  np.testing.assert_allclose(out.loss, 0.15, rtol=1e-6)
  np.testing.assert_allclose(out.metrics["clipfrac"], 1.0)
  np.testing.assert_allclose(out.metrics["approx_kl"], 0.5 * np.mean(np.log(ratio) ** 2), rtol=1e-6)
  np.testing.assert_allclose(out.metrics["ratio_mean"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(out.metrics["ratio_std"], 0.5, rtol=1e-6)


def test_gradient_inside_clip_range():
  # Inside the clip range the loss is -mean(A r); d/dlogp = -A r / B.
  adv = jnp.array([2.0, -1.0])
  logp = jnp.log(jnp.array([1.05, 0.97]))
  g = jax.grad(lambda lp: losses.grpo_loss(lp, jnp.zeros(2), adv, clip_range=0.1).loss)(logp)
  np.testing.assert_allclose(g, [-2.0 * 1.05 / 2, 1.0 * 0.97 / 2], rtol=1e-6)


def test_kl_term_by_hand():
  mean = jnp.full((2, 3, 3, 1), 0.3)
  ref = jnp.full((2, 3, 3, 1), 0.2)
  std = jnp.array([0.5, 0.25])
  out = losses.grpo_loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), clip_range=0.2, mean=mean,
                         ref_mean=ref, kl_std=std, beta=0.04)
  kl = np.mean([0.01 / (2 * 0.25), 0.01 / (2 * 0.0625)])
  np.testing.assert_allclose(out.metrics["kl"], kl, rtol=1e-5)
  np.testing.assert_allclose(out.loss, 0.04 * kl, rtol=1e-5)


def test_weights_and_per_step_ratios():
  logp = jnp.log(jnp.array([2.0, 1.0, 3.0, 1.0]))
  out = losses.grpo_loss(logp, jnp.zeros(4), jnp.ones(4), clip_range=10.0,
                         weights=jnp.array([1.0, 1.0, 0.0, 1.0]), steps=jnp.array([0, 0, 1, 2]),
                         num_steps=4)
  # Dropped transition 2 does not count: loss = -mean(2, 1, 1).
  np.testing.assert_allclose(out.loss, -4.0 / 3, rtol=1e-6)
  np.testing.assert_allclose(out.metrics["ratio_mean_per_step"], [1.5, 0.0, 1.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(out.metrics["ratio_std_per_step"], [0.5, 0.0, 0.0, 0.0], atol=1e-6)


def test_kl_needs_means():
  with pytest.raises(ValueError, match="beta > 0"):
    losses.grpo_loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), clip_range=0.2, beta=0.1)
