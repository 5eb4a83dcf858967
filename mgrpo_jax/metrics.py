"""Host-side logging: JSON-lines + TensorBoard scalars, captioned image grids, curves, progress.

Files written under a run's workdir (primary process only):
  metrics.jsonl             one JSON object per `write_scalars` call: {"step": s, "name": value}
  tb/                       TensorBoard event files (tensorboardX) with the same scalars and grids
  images/<name>_<step>.png  captioned sample grids
  reward_curves.png         `plot_curves` output (the trainer writes it at the end of a run)

metrics.jsonl is strict JSON (RFC 8259 has no NaN/Infinity): non-finite values are written as
null, while TensorBoard receives the actual value. `read_metrics` therefore yields None for them.

After a resume, `MetricWriter.drop_after(restored_step)` removes what the crashed run logged past
its last checkpoint, so both logs hold exactly one record per completed iteration.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import math
import os
import sys
import time
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tqdm
from PIL import Image, ImageDraw, ImageFont

# Caption band: text size in pixels, lines per caption and the margin around the text.
_FONT_SIZE = 12
_CAPTION_LINES = 2
_CAPTION_MARGIN = 3


# ---- scalars and images ----------------------------------------------------------------------
class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard, image grids to PNG and TB.

  Construct it on every process with `enabled=(jax.process_index() == 0)`: a disabled writer
  creates no file or directory, so multi-host runs have a single writer per workdir.
  """

  def __init__(self, workdir: str, enabled: bool = True, config=None):
    self.workdir = workdir
    self.enabled = enabled
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.image_dir = os.path.join(workdir, "images")
    self._file = None
    self._tb = None
    self._wandb = None
    if not enabled:
      return
    # Weights & Biases too when `config.log.wandb_project` is set (mgrpo_jax/wandb_writer.py).
    from mgrpo_jax import wandb_writer  # pylint: disable=g-import-not-at-top
    self._wandb = wandb_writer.from_config(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    _terminate_partial_line(self.metrics_path)
    self._file = open(self.metrics_path, "a", encoding="utf-8")
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends `{"step": step, **scalars}` as one line and flushes it; logs each to TensorBoard.

    Args:
      step: training step (x axis).
      scalars: name -> value convertible with float() (Python/numpy/jax scalars; this syncs
        jax values to the host, so call it only on logging steps). Non-finite values become
        null in the JSON line.
    """
    if not self.enabled:
      return
    record: dict[str, Any] = {"step": int(step)}
    for name, value in scalars.items():
      if name == "step":
        raise ValueError("write_scalars: 'step' is reserved for the step number; rename the "
                         "metric")
      try:
        value = float(value)
      except (TypeError, ValueError) as e:
        raise TypeError(f"write_scalars: metric {name!r} must be a scalar, got "
                        f"{type(value).__name__} {getattr(value, 'shape', '')}") from e
      record[name] = value if math.isfinite(value) else None
      self._tb.add_scalar(name, value, int(step))
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    if self._wandb is not None:
      self._wandb.write_scalars(step, record)

  def write_images(self, step: int, name: str, images: Any,
                   captions: Sequence[str] | None = None, ncols: int = 4) -> str | None:
    """Saves a captioned grid as `<workdir>/images/<name>_<step:06d>.png` and to TensorBoard.

    Args:
      step: training step, in the file name and the TB step.
      name: grid name (e.g. "eval"); a "/" in it becomes "_" in the file name only.
      images: [B, H, W, 3] uint8.
      captions: B strings (the prompts), drawn under their images, wrapped and truncated.
      ncols: images per row.

    Returns:
      The PNG path, or None when the writer is disabled.
    """
    if not self.enabled:
      return None
    grid = make_grid(images, captions, ncols)
    os.makedirs(self.image_dir, exist_ok=True)
    path = os.path.join(self.image_dir, f"{name.replace('/', '_')}_{int(step):06d}.png")
    grid.save(path)
    self._tb.add_image(name, np.asarray(grid), int(step), dataformats="HWC")
    if self._wandb is not None:
      self._wandb.write_image(step, name, np.asarray(grid), captions)
    return path

  def drop_after(self, step: int) -> int:
    """Forgets everything logged for steps after `step` (the checkpoint a run resumes from).

    metrics.jsonl is rewritten to keep only records with step <= `step` (lines cut by a crash
    go too) through a temporary file renamed over it, so a crash here leaves either the old or
    the new file. TensorBoard is reopened with `purge_step=step + 1`: its START event makes
    TensorBoard discard the earlier events of those steps. Image grids of later steps are
    deleted (the rerun writes them again).

    Args:
      step: the restored iteration (0: nothing restored, everything goes, including a step-0
        evaluation, which the fresh run writes again).

    Returns:
      The number of metrics records dropped (0 on a disabled writer).
    """
    if not self.enabled:
      return 0
    step = int(step)
    self._file.close()
    kept, dropped = [], 0
    with open(self.metrics_path, encoding="utf-8") as f:
      for line in f:
        if not line.strip():
          continue
        try:
          record_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
          dropped += 1  # a line cut by a crash
          continue
        if 0 < step and record_step <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
        else:
          dropped += 1
    if dropped:
      tmp = self.metrics_path + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.metrics_path)
      logging.warning("%s: dropped %d record(s) logged after iteration %d, the checkpoint this "
                      "run resumes from", self.metrics_path, dropped, step)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb.close()
      self._tb = SummaryWriter(os.path.join(self.workdir, "tb"), purge_step=step + 1)
    if os.path.isdir(self.image_dir):
      for name in os.listdir(self.image_dir):
        stem, _, number = os.path.splitext(name)[0].rpartition("_")
        if (stem and number.isdigit() and (int(number) > step or step == 0)
            and name.endswith(".png")):
          os.remove(os.path.join(self.image_dir, name))
    # Reopened for appending, as in __init__; close() closes it.
    self._file = open(self.metrics_path, "a", encoding="utf-8")  # pylint: disable=R1732
    return dropped

  def flush(self) -> None:
    if self.enabled:
      self._file.flush()
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the files; safe to call twice."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      self._wandb.close()
      self._wandb = None
    self.enabled = False

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _terminate_partial_line(path: str) -> None:
  """Ends a line cut short by a crash, so the next record starts on its own line."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, "rb+") as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) != b"\n":
      f.write(b"\n")


def read_metrics(path: str, latest_per_step: bool = False) -> list[dict[str, Any]]:
  """Reads a metrics.jsonl file.

  Args:
    path: file written by `MetricWriter`.
    latest_per_step: keep only the last record of each step, sorted by step. A resumed run
      logs again the steps after its last checkpoint; the later record is the one that counts.

  Returns:
    Records in file order (or by step); null values come back as None. Lines that are not valid
    JSON (a line cut by a crash) are skipped with a warning naming the line.
  """
  records = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning("%s:%d is not valid JSON (cut by a crash?); skipped", path, number)
  if latest_per_step:
    by_step = {r["step"]: r for r in records}
    records = [by_step[s] for s in sorted(by_step)]
  return records


# ---- image grids ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)  # scalable font; needs Pillow >= 10.1 + FreeType
  except (TypeError, ImportError, OSError):
    return ImageFont.load_default()


def _line_height(font) -> int:
  top, bottom = font.getbbox("Agjy|")[1::2]
  return bottom - top + 2


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
  """Greedy word wrap to `width` pixels; long words are split, overflow ends in '...'."""
  def fits(s):
    return font.getlength(s) <= width

  lines, current = [], ""
  for word in text.split():
    candidate = f"{current} {word}" if current else word
    if fits(candidate):
      current = candidate
      continue
    if current:
      lines.append(current)
    while not fits(word) and len(word) > 1:  # a word wider than the cell: hard split
      cut = 1
      while cut < len(word) and fits(word[:cut + 1]):
        cut += 1
      lines.append(word[:cut])
      word = word[cut:]
    current = word
  if current:
    lines.append(current)
  if len(lines) > max_lines:
    last = lines[max_lines - 1]
    while last and not fits(last + "..."):
      last = last[:-1]
    lines = lines[:max_lines - 1] + [last.rstrip() + "..."]
  return lines


def make_grid(images: Any, captions: Sequence[str] | None = None, ncols: int = 4, *,
              caption_lines: int = _CAPTION_LINES, min_cell_width: int = 128,
              font_size: int = _FONT_SIZE) -> Image.Image:
  """Tiles images row-major with each caption in a white band under its image.

  Small images are enlarged by an integer factor (nearest neighbour) until a cell is at least
  `min_cell_width` pixels wide, so captions stay legible next to e.g. 32x32 samples.

  Args:
    images: [B, H, W, 3] uint8.
    captions: B strings, or None for no caption band.
    ncols: images per row (capped at B).
    caption_lines: lines of text per caption; longer captions are truncated with "...".
    min_cell_width: minimum cell width in pixels after integer upscaling.
    font_size: caption text size in pixels.

  Returns:
    RGB image of width `ncols * W * scale` and height `rows * (H * scale + band)`, where
    `scale = max(1, ceil(min_cell_width / W))`, `rows = ceil(B / ncols)` and `band` is the
    caption band height (0 without captions). Image i's top-left corner is at
    `((i % ncols) * W * scale, (i // ncols) * (H * scale + band))`.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"make_grid: images must be [B, H, W, 3] uint8, got {images.dtype} "
                     f"{list(images.shape)}")
  num, height, width = images.shape[:3]
  if num == 0:
    raise ValueError("make_grid: no images (B = 0)")
  if captions is not None and len(captions) != num:
    raise ValueError(f"make_grid: {len(captions)} captions for {num} images")
  if ncols < 1:
    raise ValueError(f"make_grid: ncols={ncols} must be >= 1")
  ncols = min(ncols, num)
  nrows = -(-num // ncols)
  scale = max(1, -(-min_cell_width // width))
  cell_w, cell_h = width * scale, height * scale
  font = _font(font_size)
  line_h = _line_height(font)
  band = 0 if captions is None else caption_lines * line_h + 2 * _CAPTION_MARGIN

  grid = Image.new("RGB", (ncols * cell_w, nrows * (cell_h + band)), "white")
  draw = ImageDraw.Draw(grid)
  for i in range(num):
    x, y = (i % ncols) * cell_w, (i // ncols) * (cell_h + band)
    tile = Image.fromarray(images[i])
    if scale > 1:
      tile = tile.resize((cell_w, cell_h), Image.Resampling.NEAREST)
    grid.paste(tile, (x, y))
    if captions is not None:
      lines = _wrap(str(captions[i]), font, cell_w - 2 * _CAPTION_MARGIN, caption_lines)
      for j, line in enumerate(lines):
        draw.text((x + _CAPTION_MARGIN, y + cell_h + _CAPTION_MARGIN + j * line_h), line,
                  fill="black", font=font)
  return grid


# ---- curves --------------------------------------------------------------------------------
def plot_curves(metrics_path: str, out_png: str, keys: Sequence[str] | None = None) -> str:
  """Plots metrics against step, one subplot per key, and saves a PNG.

  Uses matplotlib's object API (no pyplot), so it neither needs a display nor changes the
  backend of a notebook that imports it.

  Args:
    metrics_path: metrics.jsonl written by `MetricWriter`; the last record of each step counts.
    out_png: output path.
    keys: metric names to plot; default every "reward/..." key. When "<key>_std" is also logged
      it is drawn as a +-1 std band around <key> instead of a subplot of its own; "eval/<name>"
      (the trainer's evaluations, logged every few steps) is drawn in the subplot of
      "reward/<name>" as points joined across the steps that have it.

  Returns:
    `out_png`.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  records = read_metrics(metrics_path, latest_per_step=True)
  available = list(dict.fromkeys(k for r in records for k in r if k != "step"))
  if keys is None:
    keys = [k for k in available if k.startswith("reward/")
            and not (k.endswith("_std") and k[:-len("_std")] in available)]
    if not keys:
      raise ValueError(f"plot_curves: no 'reward/' metrics in {metrics_path}; available: "
                       f"{available}")
  missing = [k for k in keys if k not in available]
  if missing:
    raise ValueError(f"plot_curves: {missing} not in {metrics_path}; available: {available}")

  ncols = min(3, len(keys))
  nrows = -(-len(keys) // ncols)
  fig = Figure(figsize=(4.5 * ncols, 3.0 * nrows))
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()

  def series(key):
    # None (non-finite when logged, or absent at that step) becomes NaN: a gap in the line.
    return np.array([np.nan if r.get(key) is None else r[key] for r in records], np.float64)

  steps = np.array([r["step"] for r in records])
  for ax, key in zip(axes, keys):
    values = series(key)
    ax.plot(steps, values, marker="." if len(steps) <= 50 else None, linewidth=1.2)
    if f"{key}_std" in available:
      std = series(f"{key}_std")
      ax.fill_between(steps, values - std, values + std, alpha=0.2, linewidth=0)
    eval_key = "eval/" + key[len("reward/"):] if key.startswith("reward/") else None
    if eval_key in available:
      evaluated = series(eval_key)
      at = np.isfinite(evaluated)
      ax.lines[0].set_label("training samples")
      ax.plot(steps[at], evaluated[at], marker="o", linewidth=1.5, label="evaluation")
      ax.legend(fontsize=8)
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in axes[len(keys):]:
    ax.set_visible(False)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=100)
  return out_png


# ---- progress and timing -------------------------------------------------------------------
# Phases of an iteration in the order the log line lists them (trainer's Timer names).
_PHASES = ("sample", "reward_wait", "advantages", "train")


def _short(value: float) -> str:
  return f"{value:.3g}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"


def iteration_line(done: int, total: int, metrics: Mapping[str, float],
                   seconds_per_iteration: float | None, desc: str = "train") -> str:
  """One log line for an iteration, for logs without a terminal (nohup, SLURM, Kubernetes).

  Example: `train 3/40 | jpeg_compressibility=-4.41 | kl=1.2e-05 | sample 1.20s reward_wait 0.31s
  advantages 0.01s train 0.80s | 2.45 s/it, ETA 0:01:30`.

  Args:
    done: iterations completed; total: iterations of the run.
    metrics: the iteration's metrics: `reward/<name>` (their `_std` is left out), `train/kl`,
      `time/<phase>`; missing ones are left out.
    seconds_per_iteration: for the ETA (None: no ETA).
  """
  parts = [f"{desc} {done}/{total}"]
  rewards = [f"{k[len('reward/'):]}={_short(float(v))}" for k, v in metrics.items()
             if k.startswith("reward/") and not k.endswith("_std") and v is not None]
  if rewards:
    parts.append(" ".join(rewards))
  if metrics.get("train/kl") is not None:
    parts.append(f"kl={_short(float(metrics['train/kl']))}")
  phases = [f"{p} {float(metrics[f'time/{p}']):.2f}s" for p in _PHASES
            if metrics.get(f"time/{p}") is not None]
  if phases:
    parts.append(" ".join(phases))
  if seconds_per_iteration is not None:
    eta = datetime.timedelta(seconds=round(seconds_per_iteration * max(total - done, 0)))
    parts.append(f"{seconds_per_iteration:.2f} s/it, ETA {eta}")
  return " | ".join(parts)


class ProgressBar:
  """Progress of the training iterations: a tqdm bar on a terminal, one line each otherwise.

  On a terminal the bar shows the rewards as its postfix. Without one (nohup, batch schedulers)
  every `update` prints `iteration_line` instead, so a cluster log shows steps, rewards, KL,
  seconds per phase and an ETA. Disabled (non-primary processes, `log.progress=False`): silent.
  """

  def __init__(self, total: int, initial: int = 0, enabled: bool | None = None,
               desc: str = "train", file=None):
    """Creates the bar.

    Args:
      total: number of iterations of the whole run.
      initial: iterations already done (a resumed run starts there).
      enabled: False to disable; None means "this is jax process 0".
      desc: label in front of the bar.
      file: stream to draw on; default sys.stderr.
    """
    file = sys.stderr if file is None else file
    if enabled is None:
      import jax  # pylint: disable=g-import-not-at-top
      enabled = jax.process_index() == 0
    isatty = getattr(file, "isatty", None)
    terminal = isatty is not None and isatty()
    # `enabled`: a bar is drawn; `lines`: a line per iteration is printed instead.
    self.enabled = bool(enabled and terminal)
    self.lines = bool(enabled and not terminal)
    self.total, self.done, self.desc, self._file = total, initial, desc, file
    self._last = time.perf_counter()
    self._durations: list[float] = []
    self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc, file=file,
                          disable=not self.enabled, dynamic_ncols=True)

  def seconds_per_iteration(self) -> float | None:
    """Median wall time of the iterations since the first (which includes compilation)."""
    if not self._durations:
      return None
    recent = self._durations[1:] or self._durations
    return float(np.median(recent))

  def update(self, n: int = 1, metrics: Mapping[str, float] | None = None) -> None:
    """Advances by `n` iterations; shows `metrics` (name -> float) after the bar or in the line.

    The bar's postfix holds the rewards (without `_std`); the line everything of
    `iteration_line`.
    """
    now = time.perf_counter()
    self._durations.extend([(now - self._last) / n] * n if n > 0 else [])
    self._last = now
    self.done += n
    metrics = dict(metrics or {})
    if self.lines:
      print(iteration_line(self.done, self.total, metrics, self.seconds_per_iteration(),
                           self.desc), file=self._file, flush=True)
    if not self.enabled:
      return
    shown = {k: float(v) for k, v in metrics.items()
             if k.startswith("reward/") and not k.endswith("_std") and v is not None}
    if shown:
      self._bar.set_postfix(shown, refresh=False)
    self._bar.update(n)

  def close(self) -> None:
    self._bar.close()

  def __enter__(self) -> ProgressBar:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


@contextlib.contextmanager
def timed(name: str, totals: dict[str, float]) -> Iterator[None]:
  """Adds the wall-clock seconds spent in the block to `totals[name]`.

  JAX dispatches asynchronously: the time only covers device work if the block waits for its
  results (e.g. `jax.block_until_ready`, or fetching them to the host).
  """
  start = time.perf_counter()
  try:
    yield
  finally:
    totals[name] = totals.get(name, 0.0) + time.perf_counter() - start


class Timer:
  """Per-phase wall-clock accumulator: `with timer("sample"): ...`, then `timer.totals()`."""

  def __init__(self):
    self._totals: dict[str, float] = {}

  def __call__(self, name: str) -> contextlib.AbstractContextManager[None]:
    return timed(name, self._totals)

  timed = __call__

  def reset(self) -> None:
    """Forgets all totals (call at the start of each iteration for per-iteration times)."""
    self._totals.clear()

  def totals(self) -> dict[str, float]:
    """Seconds per phase since the last reset."""
    return dict(self._totals)

  def scalars(self, prefix: str = "time/") -> dict[str, float]:
    """Totals as metrics, e.g. {"time/sample": 1.2}."""
    return {f"{prefix}{name}": seconds for name, seconds in self._totals.items()}
