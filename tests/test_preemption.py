"""SIGTERM mid-run: the CLI finishes the iteration, checkpoints, exits 75, and resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mgrpo_jax import checkpoint as ckpt_lib
from mgrpo_jax import trainer as trainer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_ocr_color.py")
DATASETS = os.path.join(os.path.dirname(ROOT), "shared", "datasets")

OVERRIDES = ("--config.reward.names=('jpeg_compressibility',)", "--config.reward.weights=(1.0,)",
             "--config.train.num_iterations=4", "--config.log.progress=False")


def _start(workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one device, like a laptop
  return subprocess.Popen(
      [sys.executable, "-m", "mgrpo_jax.train", f"--config={TINY}:runlocal",
       f"--workdir={workdir}", *OVERRIDES],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _lines(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return [json.loads(l) for l in open(path) if l.endswith("\n")]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(DATASETS) and "MGRPO_DATASETS" not in os.environ,
                    reason="../shared/datasets not present")
def test_sigterm_checkpoints_exits_75_and_resumes_exactly(tmp_path):
  straight = str(tmp_path / "straight")
  proc = _start(straight)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out

  interrupted = str(tmp_path / "interrupted")
  proc = _start(interrupted)
  deadline = time.time() + 600
  while not _lines(interrupted) and time.time() < deadline:  # iteration 1 done
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == trainer_lib.PREEMPTED_EXIT_CODE, out
  assert "preempted" in out
  stopped_at, _ = ckpt_lib.load_numpy(interrupted)
  assert 1 <= stopped_at < 4  # it stopped early, at an iteration boundary, with a checkpoint
  assert [l["step"] for l in _lines(interrupted)] == list(range(1, stopped_at + 1))

  proc = _start(interrupted)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  step_a, a = ckpt_lib.load_numpy(straight)
  step_b, b = ckpt_lib.load_numpy(interrupted)
  assert step_a == step_b == 4
  for x, y in zip(jax.tree.leaves(a["trainable"]), jax.tree.leaves(b["trainable"])):
    np.testing.assert_array_equal(x, y)
  assert [l["step"] for l in _lines(interrupted)] == [1, 2, 3, 4]
