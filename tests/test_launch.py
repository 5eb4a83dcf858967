"""Launchers' dry runs print the commands they would run."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, env=None):
  return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=30,
                        env=dict(os.environ, **(env or {})))


def test_local_dry_run():
  res = run(["bash", "launch/local.sh", "--dry-run", "--devices", "8", "--",
             "--config", "configs/tiny_ocr_color.py", "--workdir", "/tmp/w"])
  assert res.returncode == 0, res.stderr
  assert res.stdout.split() == [
      "env", "XLA_FLAGS=--xla_force_host_platform_device_count=8", "JAX_PLATFORMS=cpu",
      "python", "-m", "mgrpo_jax.train", "--config", "configs/tiny_ocr_color.py",
      "--workdir", "/tmp/w"]


def test_tpu_vm_dry_run_creates_installs_and_runs_on_all_workers():
  res = run(["bash", "launch/tpu_vm.sh", "--dry-run", "--create", "--name", "grpo", "--zone",
             "us-central2-b", "--repo", "https://example.org/mgrpo_jax.git", "--",
             "--config", "configs/tiny_ocr_color.py", "--workdir", "gs://bucket/run"])
  assert res.returncode == 0, res.stderr
  lines = res.stdout.strip().splitlines()
  assert len(lines) == 3
  assert lines[0].startswith("gcloud compute tpus tpu-vm create grpo --zone us-central2-b")
  assert "--worker=all" in lines[1] and "pip\\ install\\ -q\\ -e\\ \\'.\\[tpu\\]\\'" in lines[1]
  assert "--worker=all" in lines[2] and "python\\ -m\\ mgrpo_jax.train" in lines[2]
  assert "gs://bucket/run" in lines[2]


def test_tpu_vm_requires_name_zone_repo():
  res = run(["bash", "launch/tpu_vm.sh", "--dry-run", "--name", "x", "--", "--workdir", "w"])
  assert res.returncode == 2 and "--repo" in res.stderr


def test_slurm_dry_run():
  res = run(["bash", "launch/gpu_slurm.sbatch", "--config", "c.py", "--workdir", "w"],
            env={"DRY_RUN": "1", "VENV": "/opt/venv"})
  assert res.returncode == 0, res.stderr
  assert res.stdout.split() == ["srun", "--kill-on-bad-exit=1", "/opt/venv/bin/python", "-m",
                                "mgrpo_jax.train", "--distributed", "--config", "c.py",
                                "--workdir", "w"]
