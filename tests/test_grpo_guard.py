"""GRPO-Guard: RatioNorm and per-step reweighting against hand-computed values."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgrpo_jax import losses
from mgrpo_jax import train_step as train_step_lib
from mgrpo_jax import trainer as trainer_lib
from mgrpo_jax.config_utils import load_sibling
from tests import tiny_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two steps: transitions 0, 1 at step 0 (scale 2), 2, 3 at step 1 (scale 0.5), 4 is padding.
LOG_RATIO = np.array([0.1, 0.3, -0.2, 0.4, 0.0], np.float32)
STEPS = np.array([0, 0, 1, 1, 1], np.int32)
WEIGHTS = np.array([1, 1, 1, 1, 0], np.float32)
SCALE = np.array([2.0, 2.0, 0.5, 0.5, 0.5], np.float32)
# Step 0: mean 0.2 -> (-0.1, 0.1) * 2; step 1: mean of (-0.2, 0.4) = 0.1 (padding left out)
# -> (-0.3, 0.3) * 0.5; the padding row (0 - 0.1) * 0.5.
NORMED = np.array([-0.2, 0.2, -0.15, 0.15, -0.05], np.float32)


def test_ratio_norm_centres_each_step_and_scales():
  out = losses.ratio_norm_log_ratio(jnp.asarray(LOG_RATIO), jnp.asarray(SCALE),
                                    jnp.asarray(WEIGHTS), jnp.asarray(STEPS), 2)
  np.testing.assert_allclose(out, NORMED, atol=1e-6)
  # The shift carries no gradient: d out_i / d log_ratio_i = scale_i, nothing across rows.
  jac = jax.jacobian(lambda lr: losses.ratio_norm_log_ratio(
      lr, jnp.asarray(SCALE), jnp.asarray(WEIGHTS), jnp.asarray(STEPS), 2))(jnp.asarray(LOG_RATIO))
  np.testing.assert_allclose(jac, np.diag(SCALE), atol=1e-6)


@pytest.mark.parametrize("method,cps_logprob", [("sde", "flow_grpo"), ("cps", "exact"),
                                                ("cps", "flow_grpo")])
def test_ratio_norm_scale_gives_the_sources_noise_times_mean_shift(method, cps_logprob):
  """With the source's per-sample bias term added, scale * log-ratio = mean(eps * d).

  numpy reference: x_next = mean_old + s * eps; log-probs as Flow-GRPO defines them (Gaussian
  log-density averaged over elements, or CPS's -mean squared error).
  """
  rng = np.random.default_rng(0)
  s = 0.3
  mean_old = rng.normal(size=(64,))
  d = 0.01 * rng.normal(size=(64,))
  eps = rng.normal(size=(64,))
  x = mean_old + s * eps
  if method == "cps" and cps_logprob == "flow_grpo":
    logp = lambda m: -np.mean((x - m) ** 2)
    bias = np.mean(d**2)
  else:
    logp = lambda m: np.mean(-(x - m) ** 2 / (2 * s**2) - np.log(s) - 0.5 * np.log(2 * np.pi))
    bias = np.mean(d**2) / (2 * s**2)
  delta = logp(mean_old + d) - logp(mean_old)
  scale = float(losses.ratio_norm_scale(method, cps_logprob, jnp.array([s]))[0])
  np.testing.assert_allclose((delta + bias) * scale, np.mean(eps * d), rtol=1e-6)  # f32 scale


def test_ratio_norm_scale_is_zero_for_deterministic_steps():
  np.testing.assert_array_equal(
      losses.ratio_norm_scale("cps", "flow_grpo", jnp.array([0.0, 0.25])), [0.0, 2.0])


def test_step_reweight_weights():
  sigma, sigma_prev = jnp.array([1.0, 0.8]), jnp.array([0.8, 0.5])
  np.testing.assert_allclose(losses.step_reweight_weights("inv_dt", sigma, sigma_prev),
                             [5.0, 10.0 / 3.0], rtol=1e-6)
  np.testing.assert_allclose(losses.step_reweight_weights(True, sigma, sigma_prev),
                             [5.0, 10.0 / 3.0], rtol=1e-6)
  assert losses.step_reweight_weights("none", sigma, sigma_prev) is None
  assert losses.step_reweight_weights(False, sigma, sigma_prev) is None
  with pytest.raises(ValueError, match="step_reweight"):
    losses.step_reweight_weights("inv_sigma", sigma, sigma_prev)


def test_grpo_loss_with_ratio_norm_and_step_weights():
  old = np.zeros(5, np.float32)
  adv = np.array([1.0, -1.0, 2.0, 0.5, 3.0], np.float32)
  step_w = np.array([5.0, 5.0, 2.0, 2.0, 2.0], np.float32)
  # clip_range 0.1: ratio exp(0.2) = 1.2214 is clipped at 1.1; for A > 0 the clipped term wins.
  res = losses.grpo_loss(jnp.asarray(LOG_RATIO), jnp.asarray(old), jnp.asarray(adv),
                         clip_range=0.1, weights=jnp.asarray(WEIGHTS), steps=jnp.asarray(STEPS),
                         num_steps=2, ratio_norm_scale=jnp.asarray(SCALE),
                         step_weights=jnp.asarray(step_w))
  r = np.exp(NORMED)
  terms = np.maximum(-adv * r, -adv * np.clip(r, 0.9, 1.1))
  # By hand: r = (0.8187, 1.2214, 0.8607, 1.1618, -); terms = (-0.8187, 1.2214, -1.7214,
  # -0.55); weighted by (5, 5, 2, 2): -4.0937 + 6.1070 - 3.4428 - 1.1 = -2.5295, / 4 rows.
  expected = (terms * step_w * WEIGHTS).sum() / 4
  np.testing.assert_allclose(float(res.loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(res.loss), -2.5295 / 4, atol=2e-4)
  # Metrics: raw ratios before, normalised ratios after, per step.
  raw = np.exp(LOG_RATIO)
  np.testing.assert_allclose(res.metrics["ratio_sum_per_step"], [raw[0] + raw[1], raw[2] + raw[3]],
                             rtol=1e-6)
  np.testing.assert_allclose(res.metrics["ratio_norm_sum_per_step"], [r[0] + r[1], r[2] + r[3]],
                             rtol=1e-6)
  np.testing.assert_allclose(res.metrics["ratio_norm_sq_sum_per_step"],
                             [r[0] ** 2 + r[1] ** 2, r[2] ** 2 + r[3] ** 2], rtol=1e-6)
  # clipfrac counts the normalised ratio: |r - 1| > 0.1 for rows 0, 1, 2, 3 (0.18, 0.22, 0.14,
  # 0.16).
  np.testing.assert_allclose(float(res.metrics["clipfrac"]), 1.0, rtol=1e-6)


def test_grpo_loss_defaults_are_unchanged_by_the_new_arguments():
  args = (jnp.asarray(LOG_RATIO), jnp.zeros(5), jnp.ones(5))
  kw = dict(clip_range=0.5, weights=jnp.asarray(WEIGHTS), steps=jnp.asarray(STEPS), num_steps=2)
  a, b = losses.grpo_loss(*args, **kw), losses.grpo_loss(*args, **kw, ratio_norm_scale=None,
                                                         step_weights=None)
  assert float(a.loss) == float(b.loss)
  assert "ratio_norm_sum_per_step" not in a.metrics
  # By hand: ratios exp(0.1, 0.3, -0.2, 0.4) clipped to [0.5, 1.5] are unchanged; A = 1.
  np.testing.assert_allclose(float(a.loss), -np.exp(LOG_RATIO[:4]).sum() / 4, rtol=1e-6)
  with pytest.raises(ValueError, match="RatioNorm"):
    losses.grpo_loss(*args, clip_range=0.5, ratio_norm_scale=jnp.ones(5))


def test_epoch_metrics_report_ratio_before_and_after_normalisation():
  mb = lambda c, rs, rq, ns, nq: {
      "loss": np.float32(0), "count_per_step": np.array(c, np.float32),
      "ratio_sum_per_step": np.array(rs, np.float32),
      "ratio_sq_sum_per_step": np.array(rq, np.float32),
      "ratio_norm_sum_per_step": np.array(ns, np.float32),
      "ratio_norm_sq_sum_per_step": np.array(nq, np.float32)}
  # Step 0: raw ratios (1, 3) over two minibatches; normalised ratios (1, 1).
  out = train_step_lib.mean_metrics([mb([1, 0], [1, 0], [1, 0], [1, 0], [1, 0]),
                                     mb([1, 0], [3, 0], [9, 0], [1, 0], [1, 0])])
  assert out["train/ratio_mean_per_step/0"] == 2.0
  assert out["train/ratio_std_per_step/0"] == 1.0
  assert out["train/ratio_norm_mean_per_step/0"] == 1.0
  assert out["train/ratio_norm_std_per_step/0"] == 0.0
  assert "train/ratio_norm_mean_per_step/1" not in out  # no transitions at step 1


def test_guard_config_follows_the_source():
  config = load_sibling(os.path.join(ROOT, "configs", "sd35m_ocr_color_guard.py"),
                        "sd35m_ocr_color_guard").get_config()
  assert config.train.ratio_norm and config.train.step_reweight == "inv_dt"
  assert (config.train.clip_range, config.train.learning_rate, config.train.beta) == (2e-6, 1e-4,
                                                                                      0.0)
  assert config.advantage.std == "group"


@pytest.mark.slow
def test_tiny_guard_run(tmp_path):
  """Two iterations of the tiny model with RatioNorm and 1 / -dt reweighting (about 60 s idle)."""
  config = tiny_runs.tiny_run_config()
  config.train.ratio_norm = True
  config.train.step_reweight = "inv_dt"
  config.sample.sde_window = (-1, -1)
  config.tree.branch_steps = (0, 1)
  trainer_lib.train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2]
  for s in (0, 1, 2):  # the trained steps (all but the last of 4)
    # One update per iteration on fresh samples: every ratio is 1 before and after RatioNorm.
    assert abs(lines[0][f"train/ratio_mean_per_step/{s}"] - 1.0) < 1e-4
    assert abs(lines[0][f"train/ratio_norm_mean_per_step/{s}"] - 1.0) < 1e-4
    assert lines[0][f"train/ratio_norm_std_per_step/{s}"] < 1e-4
  assert "train/ratio_norm_mean_per_step/3" not in lines[0]
  assert np.isfinite(lines[-1]["train/loss"])
