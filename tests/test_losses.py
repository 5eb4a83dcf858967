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
  mean, std = losses.per_step_ratio_stats(out.metrics["count_per_step"],
                                          out.metrics["ratio_sum_per_step"],
                                          out.metrics["ratio_sq_sum_per_step"])
  np.testing.assert_allclose(mean, [1.5, 0.0, 1.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(std, [0.5, 0.0, 0.0, 0.0], atol=1e-6)
  # Over all kept transitions: ratios 2, 1, 1 -> mean 4/3, std sqrt(2/9).
  np.testing.assert_allclose(out.metrics["ratio_std"], np.sqrt(2.0 / 9.0), rtol=1e-5)


def test_normalizer_weighs_padded_minibatches_like_the_whole_batch():
  # 7 transitions split into minibatches of 4 and 3 real rows (one padded row, weight 0): with
  # normalizer = total weight / 2, the mean of the two minibatch losses is the batch mean.
  rng = np.random.default_rng(0)
  logp, old, adv = (jnp.asarray(rng.normal(size=7), jnp.float32) for _ in range(3))
  full = losses.grpo_loss(logp, old, adv, clip_range=0.3)
  parts = []
  for rows in ([0, 1, 2, 3], [4, 5, 6, 0]):
    w = jnp.array([1.0, 1.0, 1.0, 1.0 if rows[-1] else 0.0])
    rows = np.asarray(rows)
    parts.append(losses.grpo_loss(logp[rows], old[rows], adv[rows], clip_range=0.3, weights=w,
                                  normalizer=7 / 2))
  ratio = np.exp(np.asarray(logp) - np.asarray(old))
  ref = np.mean(np.maximum(-np.asarray(adv) * ratio,
                           -np.asarray(adv) * np.clip(ratio, 0.7, 1.3)))
  np.testing.assert_allclose(full.loss, ref, rtol=1e-5)
  np.testing.assert_allclose(np.mean([p.loss for p in parts]), ref, rtol=1e-5)
  for name in ("approx_kl", "clipfrac", "ratio_mean", "ratio_sq_mean"):
    np.testing.assert_allclose(np.mean([p.metrics[name] for p in parts]), full.metrics[name],
                               rtol=1e-5, err_msg=name)


def test_kl_needs_means():
  with pytest.raises(ValueError, match="beta > 0"):
    losses.grpo_loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), clip_range=0.2, beta=0.1)
