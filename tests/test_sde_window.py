"""SDE windows and Flow-GRPO-Fast's CFG-free settings: which steps are stochastic and trained."""

import json
import os

import numpy as np
import pytest

from mgrpo_jax import trainer as trainer_lib
from mgrpo_jax.config_utils import load_sibling
from mgrpo_jax.models import registry

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
    spec = trainer_lib.tree_spec_from_config(config)
    # A 3-step window inside [0, num_steps // 2) = [0, 5): steps 1, 2, 3 stochastic, rest ODE.
    np.testing.assert_array_equal(np.flatnonzero(spec.sde_steps), [1, 2, 3])
    assert sorted(set(spec.transition_step.tolist())) == [1, 2, 3]
    assert spec.num_leaves == leaves
    assert _config(name, "flat").tree.group_size == leaves


def test_branch_outside_the_window_is_an_error():
  config = _config("sd35m_pickscore_nocfg")
  config.tree.branch_steps = (1, 4)
  with pytest.raises(ValueError, match="branch step 4"):
    trainer_lib.tree_spec_from_config(config)


@pytest.mark.slow
def test_tiny_nocfg_run(tmp_path):
  """Two iterations of the tiny model with the CFG-free CPS window settings.

  About 60 s on an idle 2-core machine (compilation of sampling, training and evaluation).
  """
  config = _config("tiny_jpeg")
  nocfg = load_sibling(os.path.join(ROOT, "configs", "sd35m_pickscore_nocfg.py"),
                       "sd35m_pickscore_nocfg")
  nocfg.apply_nocfg(config)
  config.model = registry.default_tiny_model_config()
  config.sample.num_steps = config.sample.eval_num_steps = 6
  config.tree.branch_steps, config.tree.branch_factors = (1, 3), (2, 2)
  config.sample.batches_per_iteration = 1
  config.train.num_iterations = 2
  config.train.num_minibatches = 1
  config.log.eval_every = config.log.checkpoint_every = 2
  config.log.num_eval_prompts = 4
  config.log.progress = False
  config.mesh.data, config.mesh.tensor = 4, 2
  trainer_lib.train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2]
  trained = sorted(int(k.rsplit("/", 1)[1]) for k in lines[0]
                   if k.startswith("train/ratio_mean_per_step/"))
  assert trained == [1, 2, 3]  # only window steps are stored and trained
  assert abs(lines[0]["train/ratio_mean"] - 1.0) < 1e-4  # fresh samples: ratio 1
  assert np.isfinite(lines[-1]["train/loss"])
