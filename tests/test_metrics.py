"""Tests for mgrpo_jax.metrics: JSON lines, image grids, curves, progress bar, timers."""

import io
import json
import math
import os
import time

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mgrpo_jax import metrics as metrics_lib


def random_images(num, height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (num, height, width, 3), dtype=np.uint8)


def test_scalars_round_trip_with_nan_as_null(tmp_path):
  with metrics_lib.MetricWriter(str(tmp_path)) as writer:
    writer.write_scalars(1, {"reward/ocr": 0.25, "train/loss": np.float32(-1.5),
                             "count": jnp.asarray(3)})
    writer.write_scalars(2, {"reward/ocr": float("nan"), "train/loss": float("inf"),
                             "count": 4})
    # Flushed per write: readable before close.
    assert len(metrics_lib.read_metrics(writer.metrics_path)) == 2
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  for line in lines:  # strict JSON: no NaN / Infinity tokens
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c} in {line}"))
  assert metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl")) == [
      {"step": 1, "reward/ocr": 0.25, "train/loss": -1.5, "count": 3.0},
      {"step": 2, "reward/ocr": None, "train/loss": None, "count": 4.0},
  ]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))


def test_write_scalars_rejects_non_scalars_and_reserved_step(tmp_path):
  with metrics_lib.MetricWriter(str(tmp_path)) as writer:
    with pytest.raises(TypeError, match="'loss' must be a scalar"):
      writer.write_scalars(1, {"loss": np.zeros(3)})
    with pytest.raises(ValueError, match="'step' is reserved"):
      writer.write_scalars(1, {"step": 1.0})


def test_resume_appends_after_a_line_cut_by_a_crash(tmp_path):
  with metrics_lib.MetricWriter(str(tmp_path)) as writer:
    writer.write_scalars(1, {"a": 1.0})
    writer.write_scalars(2, {"a": 2.0})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "a": 3.')  # killed mid-write
  with metrics_lib.MetricWriter(str(tmp_path)) as writer:  # the resumed run logs step 2 again
    writer.write_scalars(2, {"a": 20.0})
    writer.write_scalars(3, {"a": 30.0})
  path = str(tmp_path / "metrics.jsonl")
  assert [r["a"] for r in metrics_lib.read_metrics(path)] == [1.0, 2.0, 20.0, 30.0]
  assert metrics_lib.read_metrics(path, latest_per_step=True) == [
      {"step": 1, "a": 1.0}, {"step": 2, "a": 20.0}, {"step": 3, "a": 30.0}]


def test_make_grid_layout_and_pixels():
  images = random_images(5, 40, 64)
  captions = ["a red cube", "a sign that reads 'hello world' " * 6, "", "x" * 200, "ok"]
  grid = metrics_lib.make_grid(images, captions, ncols=3, min_cell_width=64)
  assert grid.mode == "RGB"
  assert grid.width == 3 * 64
  band = grid.height // 2 - 40
  assert grid.height == 2 * (40 + band) and band > 10
  pixels = np.asarray(grid)
  for i in range(5):
    x, y = (i % 3) * 64, (i // 3) * (40 + band)
    np.testing.assert_array_equal(pixels[y:y + 40, x:x + 64], images[i])
  # Captions are drawn (dark pixels in the white band) and the empty sixth cell stays white.
  assert (pixels[40:40 + band, 0:64] < 128).any()
  assert (pixels[40 + band:, 128:] == 255).all()

  # Tiny samples are enlarged by an integer factor so captions stay legible.
  small = random_images(2, 16, 16)
  grid = metrics_lib.make_grid(small, None, ncols=2, min_cell_width=128)
  assert grid.size == (2 * 128, 128)
  np.testing.assert_array_equal(np.asarray(grid)[:128:8, :128:8], small[0])


def test_make_grid_rejects_bad_inputs():
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\] uint8, got float32"):
    metrics_lib.make_grid(np.zeros((2, 8, 8, 3), np.float32), ["a", "b"])
  with pytest.raises(ValueError, match="1 captions for 2 images"):
    metrics_lib.make_grid(random_images(2, 8, 8), ["a"])


def test_write_images_saves_png_of_expected_size(tmp_path):
  images = random_images(4, 32, 48)
  with metrics_lib.MetricWriter(str(tmp_path)) as writer:
    path = writer.write_images(7, "eval", images, [f"prompt {i}" for i in range(4)], ncols=2)
  assert path == str(tmp_path / "images" / "eval_000007.png")
  with Image.open(path) as png:
    expected = metrics_lib.make_grid(images, [f"prompt {i}" for i in range(4)], ncols=2)
    assert png.size == expected.size
    assert png.width == 2 * 48 * 3  # 48 px enlarged x3 to reach the 128 px minimum cell
    np.testing.assert_array_equal(np.asarray(png), np.asarray(expected))


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "worker1"
  writer = metrics_lib.MetricWriter(str(workdir), enabled=False)
  writer.write_scalars(1, {"reward/a": 1.0})
  assert writer.write_images(1, "eval", random_images(1, 8, 8), ["p"]) is None
  writer.close()
  assert not workdir.exists()


def test_plot_curves_writes_png(tmp_path):
  with metrics_lib.MetricWriter(str(tmp_path)) as writer:
    for step in range(1, 6):
      writer.write_scalars(step, {"reward/ocr": step / 5, "reward/ocr_std": 0.1,
                                  "reward/color": math.nan if step == 3 else -step,
                                  "train/loss": 1.0 / step})
  out = str(tmp_path / "plots" / "reward_curves.png")
  assert metrics_lib.plot_curves(str(tmp_path / "metrics.jsonl"), out) == out
  with Image.open(out) as png:
    assert png.format == "PNG"
    # Two default subplots (reward/ocr with its std band, reward/color) side by side.
    assert png.width == 900 and png.height == 300
  one = metrics_lib.plot_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "loss.png"),
                                keys=["train/loss"])
  assert os.path.getsize(one) > 0
  with pytest.raises(ValueError, match=r"\['reward/missing'\] not in"):
    metrics_lib.plot_curves(str(tmp_path / "metrics.jsonl"), out, keys=["reward/missing"])


def test_progress_bar_needs_a_terminal_and_the_primary_process():
  class Terminal(io.StringIO):
    def isatty(self):
      return True

  out = Terminal()
  bar = metrics_lib.ProgressBar(total=10, initial=2, enabled=True, file=out)
  bar.update(1, {"reward/ocr": 0.5})
  bar.close()
  assert "3/10" in out.getvalue() and "reward/ocr=0.5" in out.getvalue()

  # Disabled (another process, log.progress=False): silent even on a terminal. Without a
  # terminal an enabled bar prints one line per iteration instead (tests/test_robustness.py).
  bar = metrics_lib.ProgressBar(total=10, enabled=False, file=Terminal())
  bar.update(1, {"reward/ocr": 0.5})
  bar.close()
  assert not bar.enabled and not bar.lines and bar._file.getvalue() == ""  # pylint: disable=protected-access
  bar = metrics_lib.ProgressBar(total=10, enabled=True, file=io.StringIO())
  assert not bar.enabled and bar.lines


def test_timer_accumulates_per_phase():
  timer = metrics_lib.Timer()
  with timer("sample"):
    time.sleep(0.02)
  with timer.timed("sample"):
    time.sleep(0.02)
  with pytest.raises(RuntimeError):
    with timer("train"):
      raise RuntimeError("the phase failed; its time still counts")
  totals = timer.totals()
  assert set(totals) == {"sample", "train"}
  assert 0.04 <= totals["sample"] < 1.0
  assert set(timer.scalars()) == {"time/sample", "time/train"}
  timer.reset()
  assert timer.totals() == {}

  totals = {}
  with metrics_lib.timed("io", totals):
    pass
  assert list(totals) == ["io"] and totals["io"] >= 0
