"""The trainer's output is bit-identical to a fixture written by the code before the split.

Issue 12 splits `mgrpo_jax/trainer.py` into policy, step functions and a runtime without
changing behaviour. `fixtures/tiny_4_iterations.json` was written by the code BEFORE the split
(the commit it names): four iterations of `configs/tiny_jpeg.py` on the random tiny model, one
CPU device, fixed seed. It holds every `metrics.jsonl` value except the `time/*` keys, and a
sha256 of the bytes of every final trainable array (with its shape and dtype). The test reruns the
same run and asserts exact equality of both: any refactoring that changes one bit of a metric or
a weight fails it.

The run goes in a subprocess with a clean environment (one device: no XLA device-count flag), so
the result does not depend on the 8 simulated devices of the pytest process.

Bits are a property of the code, the XLA version and the host: with XLA's CPU defaults, YNNPACK
picks its kernels by the CPU it finds and the compiler vectorises for the widest ISA there, and
the thread pools are sized by the CPU count (on one core the second iteration already differs).
The first fixture, written on another host, failed on an AVX-512 Xeon in the last bits of the
first reward, and so did the commit that had passed CI on yet another host. The child therefore
runs with `PINNED_XLA_FLAGS` (no YNNPACK/XNNPACK, code for AVX2 at most) on exactly `PINNED_CPUS`
CPUs, which should make the bits the same on any x86-64 host with AVX2 and FMA (checked on one
host type only). The fixture records the jax/jaxlib/numpy versions it was written with; under
other versions (other XLA) the test is skipped, as bit equality then means nothing. To rewrite the
fixture (only when a change in behaviour is intended, and say so in the commit):

  python tests/test_trainer_fixture.py --write
"""

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "tiny_4_iterations.json")
NUM_ITERATIONS = 4
# XLA CPU settings that make the bits independent of which x86-64 host runs the test (see above).
PINNED_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_xnn_fusion_type= "
                    "--xla_cpu_use_xnnpack=false --xla_cpu_max_isa=AVX2")
PINNED_CPUS = 2  # XLA sizes its thread pools by the CPUs a process may run on


def run_config():
  """configs/tiny_jpeg.py shrunk to 4 iterations of the random tiny model (as test_grpo_guard)."""
  from tests import tiny_runs  # pylint: disable=import-outside-toplevel
  config = tiny_runs.tiny_run_config(iterations=NUM_ITERATIONS, eight_devices=False)
  config.seed = 0
  config.sample.sde_window = (-1, -1)
  config.tree.branch_steps = (0, 1)
  return config


def flat_config(config) -> dict:
  """{dotted key: JSON value} of the config, paths inside the repo made relative to it."""
  out = {}

  def walk(prefix, node):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, dict):
        walk(name + ".", value)
      else:
        if isinstance(value, str) and value.startswith(ROOT + os.sep):
          value = os.path.relpath(value, ROOT)
        out[name] = value

  walk("", json.loads(config.to_json_best_effort(sort_keys=True)))
  return out


def digest(workdir: str) -> dict:
  """Every non-timing metric of every logged step, and a hash of every final trainable array."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from mgrpo_jax import checkpoint  # pylint: disable=import-outside-toplevel
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f if line.strip()]
  metrics = [{k: v for k, v in line.items() if not k.startswith("time/")} for line in lines]
  step, state = checkpoint.load_numpy(workdir)
  params = {}
  for path, array in jax.tree_util.tree_flatten_with_path(state["trainable"])[0]:
    array = np.ascontiguousarray(array)
    params[jax.tree_util.keystr(path)] = {
        "shape": list(array.shape), "dtype": str(array.dtype),
        "sha256": hashlib.sha256(array.tobytes()).hexdigest()}
  return {"checkpoint_step": int(step), "metrics": metrics, "params": params}


def _child(workdir: str, out: str) -> None:
  """Runs the fixture's training job in this process and writes its digest to `out`."""
  from mgrpo_jax import trainer  # pylint: disable=import-outside-toplevel
  trainer.train_and_evaluate(run_config(), workdir)
  with open(out, "w") as f:
    json.dump(digest(workdir), f)


def run_in_subprocess(tmpdir: str) -> dict:
  """The digest of a fresh run on one CPU device (clean environment, no device-count flag)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = PINNED_XLA_FLAGS
  env["JAX_PLATFORMS"] = "cpu"
  workdir, out = os.path.join(tmpdir, "workdir"), os.path.join(tmpdir, "digest.json")
  res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", workdir, out],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
  with open(out) as f:
    return json.load(f)


def _same(a, b) -> bool:
  """Exact equality of JSON values, NaN equal to NaN."""
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  return type(a) is type(b) and a == b


def versions() -> dict:
  """The versions that decide the bits besides the code: jax, jaxlib (its XLA), numpy."""
  import jax, jaxlib, numpy  # pylint: disable=import-outside-toplevel,multiple-imports
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": numpy.__version__}


def host_supports_pinned_isa() -> bool:
  """Whether this host can run AVX2 + FMA code (the pinned ISA); Linux x86-64 only."""
  import platform  # pylint: disable=import-outside-toplevel
  if platform.machine() not in ("x86_64", "AMD64"):
    return False
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
  except OSError:
    return False
  return "avx2" in flags and "fma" in flags


@pytest.mark.slow
def test_four_iterations_bit_identical_to_fixture(tmp_path):
  with open(FIXTURE) as f:
    fixture = json.load(f)
  if fixture["versions"] != versions():
    pytest.skip(f"bit equality holds for the versions the fixture was written with "
                f"({fixture['versions']}), not these ({versions()})")
  if not host_supports_pinned_isa():
    pytest.skip("the pinned XLA flags need an x86-64 host with AVX2 and FMA")
  if len(os.sched_getaffinity(0)) < PINNED_CPUS:
    pytest.skip(f"the fixture's bits need {PINNED_CPUS} CPUs (thread counts change them)")
  assert fixture["xla_flags"] == PINNED_XLA_FLAGS, (
      f"the fixture was written under XLA_FLAGS={fixture['xla_flags']!r}, the test pins "
      f"{PINNED_XLA_FLAGS!r}: rewrite the fixture")
  # A changed config would make a mismatch meaningless: name what differs first. Keys added
  # since the fixture was written are allowed (new options whose defaults keep behaviour; the
  # comparison below catches the rest).
  config = flat_config(run_config())
  changed = {k: (v, config.get(k, "<missing>")) for k, v in fixture["config"].items()
             if k not in config or not _same(config[k], v)}
  assert not changed, f"the run's config differs from the fixture's {{key: (fixture, now)}}: " \
                      f"{changed}"
  got = run_in_subprocess(str(tmp_path))
  assert got["checkpoint_step"] == fixture["checkpoint_step"] == NUM_ITERATIONS
  want_metrics = fixture["metrics"]
  assert [m["step"] for m in got["metrics"]] == [m["step"] for m in want_metrics]
  for want, have in zip(want_metrics, got["metrics"]):
    assert set(have) == set(want), (f"step {want['step']}: keys added "
                                    f"{sorted(set(have) - set(want))}, removed "
                                    f"{sorted(set(want) - set(have))}")
    diff = {k: (want[k], have[k]) for k in want if not _same(want[k], have[k])}
    assert not diff, f"step {want['step']}: metrics differ {{key: (fixture, now)}}: {diff}"
  assert set(got["params"]) == set(fixture["params"])
  diff = sorted(k for k in fixture["params"] if got["params"][k] != fixture["params"][k])
  assert not diff, f"final trainable arrays differ from the fixture's: {diff}"


def _git_commit() -> str:
  res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                       check=True)
  dirty = subprocess.run(["git", "status", "--porcelain", "--", "mgrpo_jax", "configs"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
  return res.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def write_fixture() -> None:
  with tempfile.TemporaryDirectory() as tmpdir:
    result = run_in_subprocess(tmpdir)
  fixture = {
      "about": "4 iterations of configs/tiny_jpeg.py (random tiny model, 1 CPU device, seed 0, "
               "XLA_FLAGS=xla_flags), written by tests/test_trainer_fixture.py --write; "
               "metrics.jsonl without time/* keys, sha256 of each final trainable array's bytes",
      "written_by_commit": _git_commit(),
      "versions": versions(),
      "xla_flags": PINNED_XLA_FLAGS,
      "config": flat_config(run_config()),
      **result,
  }
  os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
  with open(FIXTURE, "w") as f:
    json.dump(fixture, f, indent=1, sort_keys=True)
    f.write("\n")
  print(f"wrote {FIXTURE} ({os.path.getsize(FIXTURE)} bytes, commit "
        f"{fixture['written_by_commit']})")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--write", action="store_true", help="rewrite the fixture")
  parser.add_argument("--child", nargs=2, metavar=("WORKDIR", "OUT"),
                      help="(internal) run the job and write its digest")
  args = parser.parse_args()
  if args.child:
    # Before jax starts: XLA reads the CPU count from the affinity.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:PINNED_CPUS])
    sys.path.insert(0, ROOT)
    _child(*args.child)
  elif args.write:
    sys.path.insert(0, ROOT)
    write_fixture()
  else:
    parser.error("give --write")
