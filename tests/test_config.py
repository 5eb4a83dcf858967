"""Config files, variants, the locked schema and the CLI's error messages."""

import os
import subprocess
import sys

import pytest

from mgrpo_jax import advantages as adv_lib
from mgrpo_jax.config_utils import load_sibling
from mgrpo_jax.sampling.tree import tree_spec_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_ocr_color.py")


def tiny(arg=None):
  return load_sibling(TINY, "tiny_ocr_color").get_config(arg)


def test_variant_derives_from_base():
  full, small = tiny(), tiny("runlocal")
  assert small.sample.num_steps < full.sample.num_steps
  assert small.reward.names == full.reward.names
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    tiny("huge")


def test_locked_config_rejects_unknown_field():
  config = tiny()
  config.lock()
  with pytest.raises(AttributeError, match="learning_rat"):
    config.train.learning_rat = 1.0


def test_tree_spec_from_config_matches_leaves():
  config = tiny()
  spec = tree_spec_from_config(config)
  assert spec.num_leaves == 4 and spec.branch_steps == (0, 2)
  config.tree.mode = "flat"
  assert tree_spec_from_config(config).num_leaves == config.tree.group_size
  config.tree.mode = "forest"
  with pytest.raises(ValueError, match="tree.mode"):
    tree_spec_from_config(config)


def test_reward_names_and_weights_must_pair():
  config = tiny()
  config.reward.weights = (1.0,)
  with pytest.raises(ValueError, match="same length"):
    adv_lib.AdvantageConfig.from_config(config)


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "mgrpo_jax.train", *args], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=120)


def test_cli_unknown_override_is_a_clear_error(tmp_path):
  res = _cli(f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.learning_rat=1e-4")
  assert res.returncode != 0
  assert "learning_rat" in res.stderr


def test_cli_missing_config_file_is_named(tmp_path):
  res = _cli(f"--config={tmp_path}/nope.py", f"--workdir={tmp_path}")
  assert res.returncode != 0
  assert "nope.py" in res.stderr


@pytest.mark.parametrize("name", ["sd35m_ocr_color", "sd35m_pickscore"])
def test_sd35m_configs_have_the_papers_settings(name):
  module = load_sibling(os.path.join(ROOT, "configs", f"{name}.py"), name)
  config = module.get_config()
  assert config.sample.num_steps == 10 and config.sample.eval_num_steps == 40
  assert config.sample.guidance_scale == 4.5 and config.sample.noise_level == 0.7
  assert tree_spec_from_config(config).num_leaves == 24
  assert config.data.prompts_per_batch * config.sample.batches_per_iteration == 48
  assert (config.lora.rank, config.lora.alpha) == (32, 64.0)
  assert config.train.beta == (0.04 if name == "sd35m_ocr_color" else 0.01)
  flat = module.get_config("flat")
  assert tree_spec_from_config(flat).num_leaves == 24
  # The weights are the user's: an unset path is a clear error, not a download.
  from mgrpo_jax.models import registry
  with pytest.raises(ValueError, match="config.model.path is empty"):
    registry.get_generator(config.model)


def test_flux_pickscore_config_has_flow_grpos_flux_settings():
  module = load_sibling(os.path.join(ROOT, "configs", "flux_pickscore.py"), "flux_pickscore")
  config = module.get_config()
  assert config.model.name == "flux" and config.model.guidance == 3.5
  assert config.sample.num_steps == 6 and config.sample.eval_num_steps == 28
  assert config.sample.guidance_scale == 1.0 and config.sample.noise_level == 0.9
  # Flow-GRPO clears its per-prompt tracker every epoch: its groups are our leaf groups, not a
  # run-long history. LoRA r=64 / alpha=128 including the feed-forward layers (train_flux.py).
  assert config.train.beta == 0.0 and not config.advantage.per_prompt_history
  assert config.lora.rank == 64 and config.lora.alpha == 128.0
  assert any("proj_in" in t for t in config.lora.targets)
  # Two optimizer updates per iteration, as Flow-GRPO's accumulation over half an epoch makes.
  updates = (config.sample.batches_per_iteration * config.train.num_minibatches
             // config.train.grad_accum_steps)
  assert updates == 2
  spec = tree_spec_from_config(config)
  assert spec.num_leaves == 24 and max(config.tree.branch_steps) < 6
  assert config.data.prompts_per_batch * config.sample.batches_per_iteration == 48
  assert tree_spec_from_config(module.get_config("flat")).num_leaves == 24
  from mgrpo_jax.models import registry
  with pytest.raises(ValueError, match="config.model.path is empty"):
    registry.get_generator(config.model)


def test_variants_combine_and_unknown_ones_are_named():
  module = load_sibling(os.path.join(ROOT, "configs", "sd35m_ocr_color.py"), "sd35m_ocr_color")
  both = module.get_config("flat,pickscore")
  assert both.tree.mode == "flat" and both.reward.names == ("ocr", "text_color", "pickscore")
  assert module.get_config("mixing").advantage.mode == "reward_mixing"
  with pytest.raises(ValueError, match="unknown variant 'flatt'.*known"):
    module.get_config("flatt")
