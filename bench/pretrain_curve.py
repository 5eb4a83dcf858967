r"""Held-out OCR / text-colour rewards of the tiny text renderer along a pretraining run.

  python -m mgrpo_jax.pretrain --workdir W --seed 0 --config.train.steps=5000 \
      --config.log.export_every=500
  python bench/pretrain_curve.py --workdir W --seeds 0 1 --out bench/results/pretrain_cpu_seed0.json

Evaluates every exported WORKDIR/weights_<step> (and the final WORKDIR/weights), plus the shipped
weights for reference, with `mgrpo_jax.pretrain.evaluate` (40 held-out (word, colour) pairs, 10
ODE steps, CFG 4.5, one sampling seed per --seeds entry), and prints one Markdown row per
weights directory: step, the run's seconds per step up to that step (from WORKDIR/log.jsonl,
so the wall time a run of that many steps needs on the machine that ran it), and the rewards.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from mgrpo_jax import pretrain  # noqa: E402

SHIPPED = os.path.join(ROOT, "mgrpo_jax", "assets", "tiny_text_renderer")


def exported_steps(workdir: str) -> list[tuple[int, str]]:
  """(step, directory) of every weights_<step> export in `workdir` and of its final export
  WORKDIR/weights, by step."""
  found = []
  for name in os.listdir(workdir):
    match = re.fullmatch(r"weights_(\d+)", name)
    if match and os.path.isfile(os.path.join(workdir, name, "model.safetensors")):
      found.append((int(match.group(1)), os.path.join(workdir, name)))
  final = os.path.join(workdir, "weights")  # the end-of-run export; its config names the step
  if os.path.isfile(os.path.join(final, "config.json")):
    with open(os.path.join(final, "config.json")) as f:
      step = int(json.load(f)["steps"])
    if step not in {s for s, _ in found}:
      found.append((step, final))
  return sorted(found)


def elapsed_at(workdir: str) -> dict[int, float]:
  """step -> elapsed seconds of the run when it logged that step (log.jsonl)."""
  out = {}
  path = os.path.join(workdir, "log.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        if "elapsed_s" in record:
          out[int(record["step"])] = float(record["elapsed_s"])
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a pretraining workdir with exports")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--steps", type=int, nargs="*", default=None,
                      help="only these exported steps (default: all)")
  parser.add_argument("--no-shipped", action="store_true", help="skip the shipped weights")
  parser.add_argument("--out", default="", help="also write the rows as JSON here")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.workdir):
    raise SystemExit(f"pretrain_curve: no workdir {args.workdir}")
  targets = [(step, path) for step, path in exported_steps(args.workdir)
             if args.steps is None or step in args.steps]
  if not targets:
    raise SystemExit(f"pretrain_curve: no weights_<step> exports in {args.workdir} (run "
                     "pretrain with --config.log.export_every=N)")
  elapsed = elapsed_at(args.workdir)
  if not args.no_shipped:
    targets.append((None, SHIPPED))
  rows = []
  print("| weights | step | wall time to this step (min) | OCR (seeds) | text colour (seeds) | "
        "colour correct (seeds) |")
  print("| --- | --- | --- | --- | --- | --- |")
  for step, path in targets:
    results = [pretrain.evaluate(path, "heldout", seed) for seed in args.seeds]
    # Paths in the record are relative (to the repository for the shipped weights, to the
    # workdir for its exports), so a committed record names no machine's directories.
    name = os.path.relpath(path, ROOT if path == SHIPPED else args.workdir)
    row = {"weights": name, "step": step,
           "elapsed_min": (elapsed[step] / 60 if step in elapsed else None),
           "seeds": args.seeds,
           "ocr": [r["ocr"] for r in results], "text_color": [r["text_color"] for r in results],
           "color_correct": [r["color_correct"] for r in results]}
    rows.append(row)
    fmt = lambda values: " / ".join(f"{v:.3f}" for v in values) + (
        f" (mean {np.mean(values):.3f})" if len(values) > 1 else "")
    wall = "-" if row["elapsed_min"] is None else f"{row['elapsed_min']:.1f}"
    print(f"| {'shipped' if path == SHIPPED else name} | "
          f"{'-' if step is None else step} | {wall} | {fmt(row['ocr'])} | "
          f"{fmt(row['text_color'])} | {fmt(row['color_correct'])} |", flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
