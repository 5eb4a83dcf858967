"""Every shipped SD3.5-M / FLUX experiment runs one real iteration at its shapes.

The tiny random SD3 and FLUX directories of tests/sd3_tiny.py stand in for the weights; the
config is the shipped one (tree shape, steps, minibatches, gradient accumulation, rewards, LoRA
targets, remat) with only what a small machine needs changed: 2 prompts per batch on 2 devices,
the tiny directories' resolution and float32, one iteration, a short evaluation.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = os.path.join(os.path.dirname(ROOT), "shared", "datasets")

# Every experiment in tree mode, and the Flow-GRPO baseline (`:flat`) of one: the flat variants
# only swap the tree for num_roots = G, the same code at simpler shapes, and every variant's
# shapes are planned abstractly in tests/test_plan.py.
EXPERIMENTS = [("sd35m_ocr_color", ""), ("sd35m_ocr_color", "flat"),
               ("sd35m_pickscore", ""), ("flux_pickscore", "")]

DRIVER = r'''
import json, os, sys
from mgrpo_jax import trainer as trainer_lib
from mgrpo_jax import plan as plan_lib
from mgrpo_jax.config_utils import load_sibling
from tests import sd3_tiny
root, sd3_dir, flux_dir, clip_dir, csv, out = sys.argv[1:7]
for item in sys.argv[7:]:
  name, variant = item.split(":")
  config = load_sibling(os.path.join(root, "configs", name + ".py"), name).get_config(
      variant or None)
  config.model.path = flux_dir if name.startswith("flux") else sd3_dir
  config.model.resolution = sd3_tiny.RESOLUTION
  config.model.max_sequence_length = sd3_tiny.T5_LENGTH
  config.model.dtype = config.model.param_dtype = "float32"
  if config.data.dataset == "ocr_color_10":
    config.data.dataset = csv
  config.reward.pickscore_path = clip_dir
  config.data.prompts_per_batch = 2
  config.train.num_iterations = 1
  config.sample.eval_num_steps = 2
  config.log.num_eval_prompts = 2
  config.log.progress = False
  plan = plan_lib.make_plan(config)
  plan.raise_if_problems()
  workdir = os.path.join(out, name + "_" + (variant or "tree"))
  metrics = trainer_lib.train_and_evaluate(config, workdir)
  json.dump({"plan": plan.facts, "metrics": metrics}, open(workdir + ".json", "w"))
'''


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(DATASETS) and "MGRPO_DATASETS" not in os.environ,
                    reason="../shared/datasets not present")
def test_every_shipped_experiment_runs_an_iteration(tmp_path):
  from tests import sd3_tiny  # pylint: disable=g-import-not-at-top
  sd3_dir, flux_dir, clip_dir = (str(tmp_path / n) for n in ("sd3", "flux", "clip"))
  sd3_tiny.write_tiny_sd3(sd3_dir)
  sd3_tiny.write_tiny_flux(flux_dir)
  sd3_tiny.write_tiny_clip(clip_dir)
  csv = os.path.join(DATASETS, "ocr_color_10", "test.csv")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  res = subprocess.run(
      [sys.executable, "-c", DRIVER, ROOT, sd3_dir, flux_dir, clip_dir, csv, str(tmp_path)]
      + [f"{n}:{v}" for n, v in EXPERIMENTS], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=1800)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
  for name, variant in EXPERIMENTS:
    run = tmp_path / f"{name}_{variant or 'tree'}"
    result = json.load(open(str(run) + ".json"))
    lines = [json.loads(l) for l in open(run / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [1], name
    metrics = lines[0]
    assert np.isfinite(metrics["train/loss"]), (name, variant)
    if metrics["advantage/kept_fraction"] > 0:
      # The first half of the minibatches is re-scored before any update (ratio exactly 1), the
      # second half after the first of the iteration's two updates (ratio 1 +- ~1e-3 here).
      assert abs(metrics["train/ratio_mean"] - 1.0) < 1e-2, (name, variant)
    else:  # random images: OCR and colour rewards all 0, every group dropped as in Flow-GRPO
      assert metrics["train/loss"] == 0.0, (name, variant)
    # Every stored transition was trained: minibatches of the shipped count, padded as needed.
    facts = result["plan"]
    assert facts["updates_per_iteration"] == 2
    if not variant:
      assert facts["transitions_per_prompt"] in (159, 63)  # 10-step SD3.5 / 6-step FLUX trees
      assert "advantage/abs_mean/level_2" in metrics
