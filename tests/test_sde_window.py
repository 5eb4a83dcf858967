"""SDE windows and Flow-GRPO-Fast's CFG-free settings: which steps are stochastic and trained."""

import json
import os

import numpy as np
import pytest

from mgrpo_jax import trainer as trainer_lib
from mgrpo_jax.config_utils import load_sibling
from mgrpo_jax.sampling import schedule
from mgrpo_jax.sampling.tree import tree_spec_from_config
from tests import tiny_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, arg=None):
  return load_sibling(os.path.join(ROOT, "configs", f"{name}.py"), name).get_config(arg)


def test_nocfg_configs_carry_flow_grpo_fast_settings():
  for name, leaves in (("sd35m_pickscore_nocfg", 18), ("sd35m_ocr_color_nocfg", 24)):
    config = _config(name)
    assert config.sample.guidance_scale == 1.0
    assert (config.sample.method, config.sample.noise_level) == ("cps", 0.8)
    assert config.train.clip_range == 1e-5 and config.train.beta == 0.0
    assert config.advantage.std == "global"
    spec = tree_spec_from_config(config)
    # A 3-step window inside [0, num_steps // 2) = [0, 5): steps 1, 2, 3 stochastic, rest ODE.
    np.testing.assert_array_equal(np.flatnonzero(spec.sde_steps), [1, 2, 3])
    assert sorted(set(spec.transition_step.tolist())) == [1, 2, 3]
    assert spec.num_leaves == leaves
    flat = _config(name, "flat")
    assert flat.tree.group_size == leaves
    assert (flat.sample.sde_window_mode, flat.sample.sde_window_size,
            tuple(flat.sample.sde_window_range)) == ("random", 3, (0, 5))


def test_branch_outside_the_window_is_an_error():
  config = _config("sd35m_pickscore_nocfg")
  config.tree.branch_steps = (1, 4)
  with pytest.raises(ValueError, match="branch step 4"):
    tree_spec_from_config(config)


@pytest.mark.slow
def test_tiny_nocfg_run(tmp_path):
  """Two iterations of the tiny model with the CFG-free CPS window settings.

  About 60 s on an idle 2-core machine (compilation of sampling, training and evaluation).
  """
  config = tiny_runs.tiny_run_config(num_steps=6)
  nocfg = load_sibling(os.path.join(ROOT, "configs", "sd35m_pickscore_nocfg.py"),
                       "sd35m_pickscore_nocfg")
  nocfg.apply_nocfg(config)
  config.tree.branch_steps, config.tree.branch_factors = (1, 3), (2, 2)
  trainer_lib.train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2]
  trained = sorted(int(k.rsplit("/", 1)[1]) for k in lines[0]
                   if k.startswith("train/ratio_mean_per_step/"))
  assert trained == [1, 2, 3]  # only window steps are stored and trained
  assert abs(lines[0]["train/ratio_mean"] - 1.0) < 1e-4  # fresh samples: ratio 1
  assert np.isfinite(lines[-1]["train/loss"])


def test_sliding_window_moves_every_n_iterations_and_wraps():
  # Range [0, 5), size 3: positions start at 0, 1, 2; one step later every 2 iterations.
  starts = [schedule.moving_window(i, mode="sliding", size=3, window_range=(0, 5), num_steps=10,
                                   every=2)[0] for i in range(8)]
  assert starts == [0, 0, 1, 1, 2, 2, 0, 0]
  assert schedule.moving_window(3, mode="sliding", size=3, window_range=(0, 5),
                                num_steps=10, every=2) == (1, 4)


def test_random_window_is_seeded_per_iteration_and_stays_in_range():
  draw = lambda i, seed=0: schedule.moving_window(i, mode="random", size=3, window_range=(0, 5),
                                                  num_steps=10, seed=seed)
  windows = [draw(i) for i in range(200)]
  assert windows == [draw(i) for i in range(200)]  # a resumed run draws the same windows
  assert set(windows) == {(0, 3), (1, 4), (2, 5)}
  assert [draw(i, seed=1) for i in range(200)] != windows
  # (-1, -1) = all but the last step: [0, 9) holds 7 positions of size 3.
  assert schedule.window_positions(size=3, window_range=(-1, -1), num_steps=10) == [
      (s, s + 3) for s in range(7)]


@pytest.mark.parametrize("kw,match", [
    (dict(size=6), "sde_window_size=6"), (dict(window_range=(3, 2)), "sde_window_range"),
    (dict(mode="fixed"), "mode"), (dict(mode="sliding", every=0), "sde_window_every")])
def test_moving_window_bad_input_is_named(kw, match):
  args = dict(mode="random", size=3, window_range=(0, 5), num_steps=10)
  args.update(kw)
  with pytest.raises(ValueError, match=match):
    schedule.moving_window(0, **args)


def _tiny_window_config():
  config = tiny_runs.tiny_run_config()
  # Sliding window of 2 steps in [0, 3): (0, 2) at iteration 0, (1, 3) at iteration 1. The tree
  # branches at step 1, inside both positions.
  config.sample.sde_window_mode = "sliding"
  config.sample.sde_window_size = 2
  config.sample.sde_window_range = (0, 3)
  config.tree.num_roots, config.tree.branch_steps, config.tree.branch_factors = 2, (1,), (2,)
  return config


@pytest.mark.slow
def test_tiny_sliding_window_run(tmp_path):
  """Two iterations with a sliding window: each trains only its own window's steps."""
  config = _tiny_window_config()
  config.tree.branch_steps = (0,)  # step 0 is outside the second position (1, 3)
  with pytest.raises(ValueError, match=r"position \(1, 3\).*branch step 0"):
    trainer_lib.Trainer(config, str(tmp_path / "bad"))
  config = _tiny_window_config()
  trainer_lib.train_and_evaluate(config, str(tmp_path / "run"))
  lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  trained = [sorted(int(k.rsplit("/", 1)[1]) for k in l
                    if k.startswith("train/ratio_mean_per_step/")) for l in lines]
  assert trained == [[0, 1], [1, 2]]
  assert abs(lines[0]["train/ratio_mean"] - 1.0) < 1e-4
  assert all(np.isfinite(l["train/loss"]) for l in lines)
