"""bench/accelerator.py: the merged table's ratios, and a tiny end-to-end run on CPU."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
  spec = importlib.util.spec_from_file_location("bench_accelerator",
                                                os.path.join(ROOT, "bench", "accelerator.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while being defined
  spec.loader.exec_module(module)
  return module


def test_merge_table_ratios(tmp_path, capsys):
  """Ratios are torch ms / ours ms of the same work; rollouts compare with torch's flat loop."""
  bench = _bench()
  jax_rows = {"header": {"device": "gpu: H100", "model": "sd35m"}, "jax": {
      "_meta": {"params": 1},
      "forward/jax[auto]=cudnn": {"ms": 80.0},
      "forward/jax[xla]": {"ms": 200.0},
      "train/jax[auto]=cudnn": {"error": "XlaRuntimeError: out of memory"},
      "rollout_flat/jax[auto]=cudnn": {"ms": 1000.0, "nfe": 240},
      "rollout_tree/jax[auto]=cudnn": {"ms": 600.0, "nfe": 162}}}
  torch_rows = {"header": {"device": "gpu: H100"}, "torch": {
      "forward/torch": {"ms": 160.0}, "train/torch": {"ms": 170.0},
      "rollout_flat/torch": {"ms": 2000.0, "nfe": 240}}}
  paths = []
  for i, rows in enumerate((jax_rows, torch_rows)):
    paths.append(str(tmp_path / f"{i}.json"))
    with open(paths[-1], "w") as f:
      json.dump(rows, f)
  merged = bench.main(["--merge", *paths, "--json", str(tmp_path / "all.json")])
  out = capsys.readouterr().out
  lines = {tuple(line.split()[:2]): line.split() for line in out.splitlines()}
  assert lines[("forward", "jax[auto]=cudnn")][-1] == "2.00"      # 160 / 80
  assert lines[("forward", "jax[xla]")][-1] == "0.80"             # 160 / 200
  assert lines[("train", "jax[auto]=cudnn")][2:] == ["FAILED", "170.0", "-"]
  assert lines[("rollout_flat", "jax[auto]=cudnn")][-1] == "2.00"  # 2000 / 1000
  assert lines[("rollout_tree", "jax[auto]=cudnn")][-1] == "3.33"  # 2000 / 600
  # tree / torch flat = 0.3 against the goal (162 / 240) / 1.5 = 0.45
  assert "0.300 (goal <= tree NFE / flat NFE / 1.5 = 0.450)" in out
  assert "out of memory" in out
  assert json.load(open(tmp_path / "all.json"))["torch"]["train/torch"]["ms"] == 170.0
  assert merged["jax"]["forward/jax[xla]"]["ms"] == 200.0


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path):
  """Every part at tiny size: our rows for two attention choices and (if installed) torch's."""
  bench = _bench()
  out = tmp_path / "rows.json"
  results = bench.main(["--tiny", "--attention", "auto,xla", "--compare-parts", "forward",
                        "--steps", "5", "--warmup", "1", "--repeats", "1", "--json", str(out)])
  jx = results["jax"]
  for row in ("forward/jax[auto]=xla", "forward/jax[xla]", "train/jax[auto]=xla",
              "rollout_flat/jax[auto]=xla", "rollout_tree/jax[auto]=xla"):
    assert jx[row]["ms"] > 0, row
  assert "train/jax[xla]" not in jx  # only the forward compares implementations here
  # 24 leaves x 5 steps flat; the tree evaluates 3 roots at steps 0 and 1 (branching x2 at 1),
  # 6 nodes at steps 2 and 3 (branching x4 at 3) and 24 at step 4.
  assert jx["rollout_flat/jax[auto]=xla"]["nfe"] == 24 * 5
  assert jx["rollout_tree/jax[auto]=xla"]["nfe"] == 3 + 3 + 6 + 6 + 24
  saved = json.load(open(out))
  assert saved["header"]["model"] == "sd35m (tiny)"
  if importlib.util.find_spec("diffusers") is None:
    assert "_skipped" in results["torch"]
  else:
    th = results["torch"]
    assert all(th[k]["ms"] > 0 for k in ("forward/torch", "train/torch", "rollout_flat/torch"))
    # Both frameworks built the same architecture.
    assert th["_meta"]["params"] == jx["_meta"]["params"]
