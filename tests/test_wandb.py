"""Weights & Biases logging (log.wandb_project), offline: the run's files hold what we logged."""

import glob
import json
import os
import time

import numpy as np
import pytest

wandb = pytest.importorskip("wandb")

from mgrpo_jax import metrics as metrics_lib  # noqa: E402
from mgrpo_jax.config_utils import load_sibling  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_wandb_log(path):
  """The protobuf records of a .wandb file (LevelDB log format: 32 KiB blocks of records with
  a 7-byte header: crc32 4, length 2, type 1 = full / 2 first / 3 middle / 4 last)."""
  import struct
  from wandb.proto import wandb_internal_pb2
  raw = open(path, "rb").read()
  assert raw[:4] == b":W&B"
  offset, block, pending, records = 7, 32768, b"", []
  while offset + 7 <= len(raw):
    left = block - offset % block
    _, length, kind = struct.unpack("<IHB", raw[offset:offset + 7]) if left >= 7 else (0, 0, 0)
    if kind == 0:  # block trailer padding
      offset += left
      continue
    data = raw[offset + 7:offset + 7 + length]
    offset += 7 + length
    pending = data if kind in (1, 2) else pending + data
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      records.append(record)
  return records


def config_with_project(project):
  config = load_sibling(os.path.join(ROOT, "configs", "base.py"), "base").get_config()
  config.log.wandb_project = project
  return config


def test_scalars_images_and_config_go_to_wandb(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  config = config_with_project("mgrpo-test")
  workdir = str(tmp_path)
  writer = metrics_lib.MetricWriter(workdir, config=config)
  writer.write_scalars(1, {"reward/ocr": 0.5, "train/loss": float("inf")})
  writer.write_scalars(2, {"reward/ocr": 0.75, "train/loss": 1.5})
  images = np.full((2, 16, 16, 3), 200, np.uint8)
  writer.write_images(2, "eval", images, ["a red sign", "a blue sign"])
  writer.close()

  run_id = open(os.path.join(workdir, "wandb_run_id")).read().strip()
  runs = glob.glob(os.path.join(workdir, "wandb", f"offline-run-*-{run_id}"))
  assert len(runs) == 1, os.listdir(os.path.join(workdir, "wandb"))
  # W&B's service process writes the log; wait for the run's exit record.
  for _ in range(120):
    records = read_wandb_log(os.path.join(runs[0], f"run-{run_id}.wandb"))
    if any(r.WhichOneof("record_type") == "exit" for r in records):
      break
    time.sleep(0.5)
  history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json)
              for i in r.history.item} for r in records if r.WhichOneof("record_type") == "history"]
  assert [h["_step"] for h in history] == [1, 2]
  assert history[0]["reward/ocr"] == 0.5 and np.isnan(history[0]["train/loss"])  # inf -> NaN
  assert history[1]["reward/ocr"] == 0.75 and history[1]["train/loss"] == 1.5
  assert history[1]["eval/_type"] == "image-file"
  assert history[1]["eval/caption"] == "a red sign | a blue sign"
  # The PNG is the captioned grid that TensorBoard and images/ get.
  from PIL import Image
  media = Image.open(os.path.join(runs[0], "files", history[1]["eval/path"]))
  grid = Image.open(os.path.join(workdir, "images", "eval_000002.png"))
  np.testing.assert_array_equal(np.asarray(media.convert("RGB")), np.asarray(grid.convert("RGB")))
  run_config = {i.key: json.loads(i.value_json) for r in records
                if r.WhichOneof("record_type") == "run" for i in r.run.config.update}
  assert run_config["log"]["wandb_project"] == "mgrpo-test"
  assert run_config["tree"]["branch_factors"] == list(config.tree.branch_factors)

  # A resumed run continues the same W&B run id.
  writer = metrics_lib.MetricWriter(workdir, config=config)
  writer.write_scalars(3, {"reward/ocr": 1.0})
  writer.close()
  assert len(glob.glob(os.path.join(workdir, "wandb", f"offline-run-*-{run_id}"))) == 2


def test_wandb_off_by_default_and_on_other_processes(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  writer = metrics_lib.MetricWriter(str(tmp_path / "a"), config=config_with_project(""))
  writer.write_scalars(1, {"x": 1.0})
  writer.close()
  assert not os.path.exists(tmp_path / "a" / "wandb")
  # Process > 0: the writer is disabled and starts no W&B run.
  writer = metrics_lib.MetricWriter(str(tmp_path / "b"), enabled=False,
                                    config=config_with_project("mgrpo-test"))
  writer.write_scalars(1, {"x": 1.0})
  writer.close()
  assert not os.path.exists(tmp_path / "b")
