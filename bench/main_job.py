r"""The README's main job, measured: wall time, held-out rewards before/after, a before/after grid.

  python bench/main_job.py --workdir /tmp/main_job --out docs/main_job_before_after.png

Runs `mgrpo-train --config configs/tiny_ocr_color.py --workdir DIR` (the README command, in a
subprocess, timed; skipped with --no-run when DIR already holds the finished run), then reads
the run's evaluations from DIR/metrics.jsonl (step 0 = the pretrained model before training,
the last step = after; `log.eval_at_start`, all 40 held-out prompts, fixed noise) and renders a
grid of the first --grid_prompts held-out prompts with the base model (top row of each pair) and
the trained adapters (bottom row), same noise, through `mgrpo_jax.load_pipeline`.

Prints a Markdown table and writes DIR/main_job.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny_ocr_color.py")


def run_main_job(workdir: str) -> float:
  """Runs the README's main-job command; returns its wall time in seconds."""
  start = time.perf_counter()
  subprocess.run(["mgrpo-train", "--config", CONFIG, "--workdir", workdir], check=True)
  return time.perf_counter() - start


def evaluations(workdir: str) -> dict[int, dict[str, float]]:
  """step -> {reward: held-out mean} from the run's evaluation rows."""
  from mgrpo_jax import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  out = {}
  for record in metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"),
                                         latest_per_step=True):
    values = {k[len("eval/"):]: v for k, v in record.items() if k.startswith("eval/")}
    if values:
      out[int(record["step"])] = values
  return out


def before_after_grid(workdir: str, out_png: str, num_prompts: int, seed: int) -> None:
  """Base model and trained adapters on the first held-out prompts, pairs of rows."""
  import mgrpo_jax  # pylint: disable=import-outside-toplevel
  from mgrpo_jax import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  from mgrpo_jax.data import prompts as prompts_lib  # pylint: disable=import-outside-toplevel
  from mgrpo_jax.data import synthetic_text  # pylint: disable=import-outside-toplevel
  records = prompts_lib.load_prompts(synthetic_text.prompt_csv("heldout"))[:num_prompts]
  prompts = [r.prompt for r in records]
  pipe = mgrpo_jax.load_pipeline(workdir)
  before = pipe(prompts, seed=seed, output_type="np", use_lora=False)
  after = pipe(prompts, seed=seed, output_type="np")
  ncols = min(4, num_prompts)
  images, captions = [], []
  for start in range(0, num_prompts, ncols):
    for label, batch in (("before", before), ("after", after)):
      for i in range(start, min(start + ncols, num_prompts)):
        images.append(batch[i])
        word = records[i].metadata.get("text", "")
        color = records[i].metadata.get("color", "")
        captions.append(f"{label}: {word} ({color})")
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  metrics_lib.make_grid(np.stack(images), captions, ncols=ncols, caption_lines=1).save(out_png)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--no-run", dest="run", action="store_false",
                      help="use the finished run in --workdir instead of training")
  parser.add_argument("--out", default="", help="before/after grid PNG (default WORKDIR/...)")
  parser.add_argument("--grid_prompts", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  wall = run_main_job(args.workdir) if args.run else None
  evals = evaluations(args.workdir)
  if len(evals) < 2 or 0 not in evals:
    sys.exit(f"main_job: {args.workdir}/metrics.jsonl lacks the step-0 and final evaluations "
             f"(found steps {sorted(evals)}); run without --no-run")
  last = max(evals)
  out_png = args.out or os.path.join(args.workdir, "main_job_before_after.png")
  before_after_grid(args.workdir, out_png, args.grid_prompts, args.seed)
  result = {"wall_s": wall, "before": evals[0], "after": evals[last], "iterations": last,
            "grid": out_png}
  with open(os.path.join(args.workdir, "main_job.json"), "w") as f:
    json.dump(result, f, indent=1)
  print("| held-out (40 prompts) | before (iteration 0) | after (iteration "
        f"{last}) |\n| --- | --- | --- |")
  for name in evals[0]:
    print(f"| {name} | {evals[0][name]:.3f} | {evals[last][name]:.3f} |")
  if wall is not None:
    print(f"wall time of `mgrpo-train` (compilation included): {wall:.0f} s")
  print(f"grid: {out_png}")


if __name__ == "__main__":
  main()
