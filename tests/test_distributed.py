"""Two processes (jax.distributed on localhost, 4 CPU devices each) equal one 8-device process."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mgrpo_jax import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_ocr_color.py")
DATASETS = os.path.join(os.path.dirname(ROOT), "shared", "datasets")

OVERRIDES = ("--config.reward.names=('jpeg_compressibility','jpeg_incompressibility')",
             "--config.reward.weights=(1.0,0.5)", "--config.data.prompts_per_batch=8",
             "--config.train.num_iterations=2", "--config.log.progress=False",
             # Adam's first step is lr * g / (|g| + eps): with eps 1e-8 an element whose gradient
             # is ~1e-8 turns float-sum rounding between 1 and 2 processes into 1e-3 * lr
             # differences; a larger eps keeps the update linear there, so the comparison below
             # tests the distributed bookkeeping, not Adam's conditioning.
             "--config.train.adam_eps=1e-4")


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              # Cross-process collectives on CPU go through gloo.
              JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "mgrpo_jax.train", f"--config={TINY}:runlocal",
          f"--workdir={workdir}", *OVERRIDES, *extra]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.skipif(not os.path.isdir(DATASETS) and "MGRPO_DATASETS" not in os.environ,
                    reason="../shared/datasets not present")
def test_two_processes_equal_one_process(tmp_path):
  single = str(tmp_path / "single")
  res = subprocess.run(_cmd(single), cwd=ROOT, env=_env(8), capture_output=True, text=True,
                       timeout=900)
  assert res.returncode == 0, res.stdout + res.stderr

  multi = str(tmp_path / "multi")
  port = _free_port()
  procs = [subprocess.Popen(
      _cmd(multi, f"--coordinator_address=localhost:{port}", "--num_processes=2",
           f"--process_id={i}"),
      cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out

  a_lines = [json.loads(l) for l in open(os.path.join(single, "metrics.jsonl"))]
  b_lines = [json.loads(l) for l in open(os.path.join(multi, "metrics.jsonl"))]
  assert [l["step"] for l in b_lines] == [1, 2]  # written once, by process 0
  # Iteration 1 starts from identical parameters and samples, so losses, rewards and the
  # updated parameters agree up to the order of cross-process float sums (params within 1e-4 of
  # one learning-rate step). From iteration 2 on, the JPEG reward (a byte count, a discrete
  # function of the pixels) turns those rounding differences into different rewards, so later
  # iterations are only checked to have run.
  a, b = a_lines[0], b_lines[0]
  for key in ("train/loss", "train/policy_loss", "train/kl", "train/grad_norm",
              "reward/jpeg_compressibility", "advantage/std"):
    np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-9, err_msg=key)
  step_a, state_a = ckpt_lib.load_numpy(single, step=1)
  step_b, state_b = ckpt_lib.load_numpy(multi, step=1)
  lr = 1e-3  # configs/tiny_ocr_color.py
  for x, y in zip(jax.tree.leaves(state_a["trainable"]), jax.tree.leaves(state_b["trainable"])):
    np.testing.assert_allclose(y, x, rtol=0, atol=1e-4 * lr)
  assert ckpt_lib.load_numpy(multi)[0] == ckpt_lib.load_numpy(single)[0] == 2


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.skipif(not os.path.isdir(DATASETS) and "MGRPO_DATASETS" not in os.environ,
                    reason="../shared/datasets not present")
def test_two_batches_per_iteration_get_their_own_advantages_on_two_processes(tmp_path):
  # With several sampling batches, every process joins its own rows of all batches; the global
  # advantage array must still give batch b's rollout rows batch b's advantages, as on one process.
  driver = [sys.executable, "-m", "tests.advantage_driver"]
  single = subprocess.run(driver + [str(tmp_path / "one.npz"), str(tmp_path / "w1")], cwd=ROOT,
                          env=_env(8), capture_output=True, text=True, timeout=900)
  assert single.returncode == 0, single.stdout + single.stderr
  port = _free_port()
  procs = [subprocess.Popen(
      driver + [str(tmp_path / "two.npz"), str(tmp_path / "w2"), f"localhost:{port}", "2", str(i)],
      cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  for b in range(2):
    # The same images (so the same rewards and stored log-probs) in the same rows...
    np.testing.assert_allclose(two[f"rewards_{b}"], one[f"rewards_{b}"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(two[f"log_probs_{b}"], one[f"log_probs_{b}"], rtol=1e-4, atol=1e-4)
    # ...get the same advantage for every transition.
    np.testing.assert_allclose(two[f"advantages_{b}"], one[f"advantages_{b}"], rtol=1e-5,
                               atol=1e-5, err_msg=f"batch {b}")
  # Batches differ (otherwise the check above could not see rows of the wrong batch).
  assert np.abs(one["advantages_0"] - one["advantages_1"]).max() > 1e-3
