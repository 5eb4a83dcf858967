"""The launch plan: every shipped config and variant resolves; problems are named before any work."""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from mgrpo_jax import plan as plan_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = os.path.join(os.path.dirname(ROOT), "shared", "datasets")
OCR_CSV = os.path.join(DATASETS, "ocr_color_10", "test.csv")
needs_data = pytest.mark.skipif(not os.path.isdir(DATASETS) and "MGRPO_DATASETS" not in os.environ,
                                reason="../shared/datasets not present")


def _module(path):
  spec = importlib.util.spec_from_file_location(f"plan_test_{os.path.basename(path)}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _experiments():
  """(file, variant) for every config file except base.py and every variant it names."""
  out = []
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    if os.path.basename(path) == "base.py":
      continue
    module = _module(path)
    out.append((path, None))
    out += [(path, v) for v in sorted(getattr(module, "VARIANTS", {}))]
  return out


def _user_overrides(config, tmp_path):
  """What a user passes on the command line: local paths for weights, data and reward models."""
  if config.data.dataset == "ocr_color_10" and config.data.split == "train":
    config.data.dataset = OCR_CSV  # only the test split ships in ../shared
  for key in ("pickscore_path", "clip_path", "aesthetic_path"):
    if not config.reward[key]:
      os.makedirs(tmp_path / key, exist_ok=True)
      config.reward[key] = str(tmp_path / key)
  return config


@needs_data
@pytest.mark.parametrize("path,variant", _experiments(),
                         ids=lambda x: os.path.basename(x) if isinstance(x, str) and x.endswith(
                             ".py") else str(x))
def test_every_shipped_config_and_variant_plans(path, variant, tmp_path):
  config = _user_overrides(_module(path).get_config(variant), tmp_path)
  # The published architectures are checked once each below; here the config-level checks, on
  # an 8-device slice for SD3.5 / FLUX and on one CPU for the tiny configs.
  devices = 8 if config.model.name in ("sd3", "flux") else 1
  plan = plan_lib.make_plan(config, num_devices=devices, check_model=False)
  assert plan.ok, plan.format()
  facts = plan.facts
  assert facts["updates_per_iteration"] >= 1
  # Each prompt's transitions split into num_minibatches parts (padding where they do not).
  m = -(-facts["transitions_per_prompt"] // config.train.num_minibatches)
  assert m * config.train.num_minibatches - facts["transitions_per_prompt"] == facts.get(
      "padding_rows", m * config.train.num_minibatches - facts["transitions_per_prompt"])


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("name,variant,expect", [
    # Hand-counted for 3 roots, x2 at step 1, x4 at step 3, 10 steps, the last not stored:
    # NFE 3 + 3 + 6 + 6 + 6 * 24 = 162 (the parents are evaluated at a branch step);
    # transitions 3 + 6 + 6 + 24 + 5 * 24 = 159; flat: 24 x 10 = 240 NFE, 24 x 9 = 216.
    ("sd35m_ocr_color", None, dict(nfe=162, nfe_flat=240, transitions_per_prompt=159)),
    ("sd35m_ocr_color", "flat", dict(nfe=240, nfe_flat=240, transitions_per_prompt=216)),
    # FLUX, 6 steps: NFE 3 + 3 + 6 + 6 + 2 * 24 = 66, transitions 3 + 6 + 6 + 24 + 24 = 63.
    ("flux_pickscore", None, dict(nfe=66, nfe_flat=144, transitions_per_prompt=63)),
])
def test_published_architectures_plan_without_weights(name, variant, expect, tmp_path):
  config = _user_overrides(_module(os.path.join(ROOT, "configs", f"{name}.py")).get_config(
      variant), tmp_path)
  plan = plan_lib.make_plan(config, num_devices=8)
  # Only the missing weights directory remains (planned on the published architecture).
  assert [p.split(":")[0] for p in plan.problems] == ["model.path"], plan.format()
  for key, value in expect.items():
    assert plan.facts[key] == value, key
  # 48 prompts x M transitions per iteration; 2 optimizer updates as in Flow-GRPO.
  assert plan.facts["transitions_per_iteration"] == 48 * expect["transitions_per_prompt"]
  assert plan.facts["updates_per_iteration"] == 2
  # SD3.5-M's MMDiT-X has 2.24 B parameters, FLUX.1-dev's transformer 11.9 B; the totals include
  # the text encoders and the VAE. LoRA: SD3.5-M r=32 on 24 blocks' attention (13 with a second
  # image attention), FLUX r=64 on attention and feed-forward layers.
  lo, hi = {"sd35m_ocr_color": (7.0e9, 8.5e9), "flux_pickscore": (16.5e9, 17.5e9)}[name]
  assert lo < plan.facts["parameters"] < hi
  assert plan.facts["trainable_parameters"] < 0.02 * plan.facts["parameters"]


@needs_data
@pytest.mark.parametrize("override,field", [
    ({"train.num_minibatches": 200}, "train.num_minibatches"),
    ({"train.grad_accum_steps": 5}, "train.grad_accum_steps"),
    ({"data.prompts_per_batch": 3}, "data.prompts_per_batch"),
    ({"mesh.data": 3}, "mesh"),
    ({"reward.names": ("ocr", "nonsense"), "reward.weights": (1.0, 1.0)}, "reward.names"),
    ({"reward.names": ("pickscore",), "reward.weights": (1.0,)}, "reward.pickscore_path"),
    ({"reward.weights": (1.0,)}, "reward.weights"),
    ({"tree.group_size": 7}, "tree.group_size"),
    ({"tree.branch_steps": (0, 99)}, "tree"),
    ({"log.eval_every": 0}, "log.eval_every"),
    ({"sample.eval_num_steps": 0}, "sample.eval_num_steps"),
    ({"data.dataset": "/nowhere/prompts.csv"}, "data.dataset"),
])
def test_problems_name_their_field(override, field):
  config = _module(os.path.join(ROOT, "configs", "tiny_jpeg.py")).get_config()
  config.reward.names, config.reward.weights = ("ocr", "text_color"), (1.0, 1.0)
  for key, value in override.items():
    group, name = key.split(".")
    config[group][name] = value
  plan = plan_lib.make_plan(config, num_devices=8, check_model=False)
  fields = [p.split(":")[0] for p in plan.problems]
  assert field in fields, plan.format()
  with pytest.raises(plan_lib.PlanError, match=field.replace(".", r"\.")):
    plan.raise_if_problems()


def test_unknown_colour_in_the_dataset_is_named(tmp_path):
  csv = tmp_path / "p.csv"
  csv.write_text('line_id,prompt,text,color,source\n0,"a sign reading ""HI""",HI,red,x\n'
                 '1,"a sign reading ""YO""",YO,mauve,x\n')
  config = _module(os.path.join(ROOT, "configs", "tiny_jpeg.py")).get_config()
  config.reward.names, config.reward.weights = ("ocr", "text_color"), (1.0, 1.0)
  config.data.dataset = str(csv)
  plan = plan_lib.make_plan(config, num_devices=8, check_model=False)
  assert any(p.startswith("data.dataset") and "mauve" in p for p in plan.problems), plan.format()


@needs_data
def test_cli_plan_prints_the_table_and_exits_nonzero_on_problems():
  cmd = [sys.executable, "-m", "mgrpo_jax.train", "--plan",
         f"--config={os.path.join(ROOT, 'configs', 'tiny_jpeg.py')}", "--plan_devices=1"]
  ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stdout + ok.stderr
  for row in ("NFE per prompt", "stored transitions", "optimizer updates", "mesh", "minibatch"):
    assert row in ok.stdout
  bad = subprocess.run(cmd + ["--config.train.num_minibatches=99"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and "train.num_minibatches" in bad.stdout
