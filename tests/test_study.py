"""bench/study.py (issue 13): NFE matching, the credit-assignment score, run summaries by hand,
and `--quick` end to end: the shape of its outputs and resumability (never who wins)."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _study():
  spec = importlib.util.spec_from_file_location("bench_study",
                                                os.path.join(ROOT, "bench", "study.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def test_flat_methods_match_the_tree_nfe():
  study = _study()
  from mgrpo_jax.sampling import tree as tree_lib
  # x2 at step 1, x2 at step 3, 10 steps: step 0 on the root (1), step 1 on the root shared by
  # its 2 copies (1), step 2 on 2 nodes, step 3 on their 2 parents, steps 4-9 on 4 leaves (24).
  assert study.flat_group_size(study.testbed_config(1, "multi_grpo", 0, quick=False)) == (
      3, 1 + 1 + 2 + 2 + 24, 30)
  for testbed in (1, 3):
    for quick in (False, True):
      nfe = {m: tree_lib.tree_spec_from_config(study.testbed_config(testbed, m, 0, quick)).nfe
             for m in study.METHODS}
      assert len(set(nfe.values())) == 1, (testbed, quick, nfe)
  config = study.testbed_config(3, "reward_groups_only", 1, quick=False)
  assert (config.tree.mode, config.advantage.mode, config.seed) == ("flat", "reward_groups", 1)
  assert config.tree.group_size == 3
  with pytest.raises(ValueError, match="unknown method 'grpo'"):
    study.testbed_config(1, "grpo", 0, quick=False)


def test_ablation_configs():
  study = _study()
  from mgrpo_jax.sampling import tree as tree_lib
  late = study.testbed_config(4, "late_tree", 2, quick=False)
  # SDE window (0, 5): x2 at step 3, x2 at step 4. Steps 0-3 on the root (4), step 4 on the 2
  # copies (2), steps 5-9 on 4 leaves (20).
  assert tuple(late.tree.branch_steps) == (3, 4) and late.seed == 2
  assert tree_lib.tree_spec_from_config(late).nfe == 4 + 2 + 20
  assert (late.tree.mode, late.advantage.mode) == ("tree", "reward_groups")
  wide = study.testbed_config(4, "x2x3_tree", 0, quick=False)
  # x2 at step 1, x3 at step 3: steps 0-1 on the root (2), steps 2-3 on 2 nodes (4), steps 4-9
  # on 6 leaves (36); the reference x2/x2 tree has 2 + 4 + 24 = 30.
  assert tuple(wide.tree.branch_steps) == (1, 3) and tuple(wide.tree.branch_factors) == (2, 3)
  assert tree_lib.tree_spec_from_config(wide).nfe == 2 + 4 + 36
  glob = study.testbed_config(4, "global_std", 0, quick=False)
  assert glob.advantage.std == "global" and tuple(glob.tree.branch_steps) == (1, 3)
  with pytest.raises(ValueError, match="unknown ablation 'flat'"):
    study.testbed_config(4, "flat", 0, quick=False)


def test_credit_scores_by_hand():
  """One prompt, 4 early nodes with 4 leaves each. Leaves of node i: a_i + e_i, a_i - e_i, a_i,
  a_i: the tree methods see leaves 0 and 1 (mean a_i, the held-out mean exactly), the flat ones
  see leaf 0 only (a_i + e_i)."""
  study = _study()
  config = study.credit_config(0, quick=False)
  config.tree.branch_factors = (4, 4)
  config.reward.names = ("jpeg_incompressibility",)
  config.reward.weights = (1.0,)
  a = np.array([1.0, 2.0, 4.0, 0.5])
  e = np.array([3.0, -1.0, 0.0, 2.0])
  rewards = np.stack([a + e, a - e, a, a], axis=1).reshape(1, 16, 1)
  scores = study.credit_scores(rewards, config, tree_leaves=2)
  centred = a - a.mean()
  flat = a + e
  flat_adv = (flat - flat.mean()) / (flat.std() + config.advantage.eps)
  expected_flat = np.corrcoef(flat_adv, centred)[0, 1]
  for method in ("tree_only", "multi_grpo"):
    assert scores[method]["corr/jpeg_incompressibility"] == pytest.approx(1.0, abs=1e-6)
    # Per-group std: the 4 standardised values have variance std^2 / (std + eps)^2.
    assert scores[method]["adv_var"] == pytest.approx(
        (a.std() / (a.std() + config.advantage.eps))**2, rel=1e-5)
  for method in ("flow_grpo", "reward_groups_only"):
    assert scores[method]["corr/jpeg_incompressibility"] == pytest.approx(expected_flat,
                                                                        abs=1e-6)
    assert scores[method]["adv_var"] == pytest.approx(np.var(flat_adv), rel=1e-5)
    assert scores[method]["corr/combined"] == pytest.approx(expected_flat, abs=1e-6)
  with pytest.raises(ValueError, match="expected k1 \\* k2"):
    study.credit_scores(rewards[:, :12], config)


def test_summarise_metrics_by_hand():
  study = _study()
  records = [{"step": 0, "eval/r": 1.0}]
  for step, value in zip(range(1, 5), (1.0, 2.0, 4.0, 7.0)):
    records.append({"step": step, "reward/r": value, "nfe/per_prompt": 30.0,
                    "time/iteration": 10.0 * step})
  records[-1]["eval/r"] = 1.5
  got = study.summarise_metrics(records, ("r",), prompts_per_iteration=8)
  assert got["nfe_per_iteration"] == 240.0
  assert got["curve"]["nfe"] == [240.0, 480.0, 720.0, 960.0]
  assert got["train_gain"]["r"] == pytest.approx((4.0 + 7.0) / 2 - (1.0 + 2.0) / 2)
  assert got["eval"]["iteration"] == [0, 4] and got["eval"]["nfe"] == [0.0, 960.0]
  assert got["eval_gain"]["r"] == pytest.approx(0.5)
  assert got["seconds_per_iteration"] == pytest.approx(30.0)  # iterations 2-4
  with pytest.raises(ValueError, match="no training iteration"):
    study.summarise_metrics(records[:1], ("r",), 8)


@pytest.mark.slow
def test_quick_study_outputs_and_resume(tmp_path):
  study = _study()
  out = tmp_path / "study"
  # One CPU device (the study's prompts per batch are not a multiple of the tests' 8).
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  command = [sys.executable, os.path.join(ROOT, "bench", "study.py"), "--quick", "--out",
             str(out), "--workdir-root", str(tmp_path / "work")]
  first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=1800)
  assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
  methods = list(study.METHODS)
  for testbed, names in ((1, study.SCALE_REWARDS), (3, ("ocr", "text_color"))):
    for method in methods:
      record = json.loads((out / str(testbed) / method / "seed0.json").read_text())
      assert record["method"] == method and record["num_iterations"] == 2
      assert record["reward_names"] == list(names)
      assert record["curve"]["iteration"] == [1, 2]
      assert len(record["curve"]["nfe"]) == 2
      assert set(record["train_gain"]) == set(names) == set(record["eval_gain"])
      assert record["eval"]["iteration"] == [0, 2]
      assert record["nfe_per_prompt"] == 10  # tree x2@1 x2@3 at 5 steps = 2 flat trajectories
      if testbed == 3:
        assert set(record["heldout"]) == {"ocr_accuracy", "color_accuracy", "both"}
  for name in study.ABLATIONS:
    record = json.loads((out / "4" / name / "seed0.json").read_text())
    assert record["method"] == name and record["reward_names"] == list(study.SCALE_REWARDS)
  assert json.loads((out / "4" / "late_tree" / "seed0.json").read_text())["nfe_per_prompt"] == 9
  # x2@1, x3@3 at 5 steps: 2 + 2 * 2 + 6 * 1.
  assert json.loads((out / "4" / "x2x3_tree" / "seed0.json").read_text())["nfe_per_prompt"] == 12
  init = json.loads((out / "1" / "init" / "seed0.json").read_text())
  assert set(init["std"]) == set(study.SCALE_REWARDS) and "correlation" in init
  credit = json.loads((out / "2" / "credit" / "seed0.json").read_text())
  assert set(credit["methods"]) == set(methods)
  for row in credit["methods"].values():
    assert set(row) == {"corr/jpeg_incompressibility", "corr/blueness", "corr/combined",
                        "adv_var"}
  assert set(json.loads((out / "3" / "init.json").read_text())) == {
      "ocr_accuracy", "color_accuracy", "both"}
  for testbed in (1, 3, 4):
    assert (out / f"testbed{testbed}_curves.png").stat().st_size > 0
  report = (out / "study.md").read_text()
  for title in study.TESTBED_TITLES.values():
    assert f"## {title}" in report
  for method in methods:  # one row per method in each of the three tables
    assert report.count(f"| {method} |") == 3, method
  for label in (study.ABLATION_REFERENCE, *study.ABLATIONS):  # the ablation table
    assert report.count(f"| {label} |") == 1, label

  # Second invocation: every run is skipped, nothing retrains, the report is the same.
  start = time.perf_counter()
  second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
  elapsed = time.perf_counter() - start
  assert second.returncode == 0, second.stderr[-4000:]
  assert "[done]" not in second.stdout
  # 8 training runs, 2 ablations, testbed 1's init statistics, testbed 2's credit run,
  # testbed 3's init.
  assert second.stdout.count("[skip]") == 2 * len(methods) + len(study.ABLATIONS) + 3
  assert (out / "study.md").read_text() == report
  assert elapsed < 60, f"resuming a finished study took {elapsed:.0f} s"
