"""The evaluation harness: aggregates by hand, and end to end on both benchmarks, 1 vs 8 devices."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mgrpo_jax import evaluate as eval_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_ocr_color.py")
DATASETS = os.path.join(os.path.dirname(ROOT), "shared", "datasets")


def test_aggregate_by_hand():
  scores = {"ocr": np.array([1.0, 0.5, 0.0, 0.8], np.float32),
            "text_color": np.array([1.0, 1.0, 0.3, 0.9], np.float32),
            "jpeg_compressibility": np.array([-1.0, -2.0, -3.0, -4.0], np.float32)}
  meta = [{"color": "red"}, {"color": "red"}, {"color": "blue"}, {"color": "blue"}]
  result = eval_lib.aggregate(scores, meta)
  red, blue, overall = result["per_color"]["red"], result["per_color"]["blue"], result["overall"]
  assert red["ocr_accuracy"] == pytest.approx(0.75) and red["color_accuracy"] == 1.0
  assert red["both"] == pytest.approx(0.75)
  assert blue["color_accuracy"] == 0.0 and blue["both"] == 0.0
  assert overall["ocr_accuracy"] == pytest.approx(2.3 / 4)
  assert overall["color_accuracy"] == 0.5
  assert overall["both"] == pytest.approx(1.5 / 4)
  assert overall["mean_jpeg_compressibility"] == pytest.approx(-2.5)
  table = eval_lib.markdown(result, "t")
  assert "| red | 0.7500 | 1.0000 | 0.7500 | -1.5000 | 2 |" in table
  assert "| overall |" in table


def _eval(workdir, out, devices, dataset, rewards):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  names = "(" + ",".join(f"'{r}'" for r in rewards) + ",)"
  weights = "(" + ",".join("1.0" for _ in rewards) + ",)"
  split = "test"
  cmd = [sys.executable, "-m", "mgrpo_jax.evaluate", f"--config={TINY}:runlocal",
         # No run in the workdir: --init evaluates the untrained model (refused without it).
         f"--checkpoint={workdir}", "--init", f"--out={out}", "--num_prompts=16",
         f"--split={split}",
         f"--config.data.dataset={dataset}", f"--config.reward.names={names}",
         f"--config.reward.weights={weights}", "--config.data.prompts_per_batch=8"]
  res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stdout + res.stderr
  return json.load(open(os.path.join(out, "eval.json")))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(DATASETS), reason="../shared/datasets not present")
@pytest.mark.parametrize("dataset,rewards", [
    ("ocr_color_10", ("ocr", "text_color", "jpeg_compressibility")),
    ("pickscore_25k", ("jpeg_compressibility",)),
])
def test_eval_end_to_end_same_on_one_and_eight_devices(tmp_path, dataset, rewards):
  one = _eval(tmp_path / "w1", tmp_path / "e1", 1, dataset, rewards)
  eight = _eval(tmp_path / "w8", tmp_path / "e8", 8, dataset, rewards)
  assert one["num_prompts"] == 16 and len(one["per_prompt"]) == 16
  for name, value in one["overall"].items():
    np.testing.assert_allclose(eight["overall"][name], value, rtol=1e-6, err_msg=name)
  assert os.path.exists(tmp_path / "e1" / "grid_0.png")
  table = open(tmp_path / "e1" / "eval.md").read()
  assert "| overall |" in table
  if dataset == "ocr_color_10":
    assert set(one["per_color"]) <= {"red", "orange", "yellow", "green", "blue", "purple",
                                     "pink", "brown", "black", "white"}
    assert "color_accuracy" in one["overall"]
