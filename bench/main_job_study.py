r"""The main job's sampling settings, compared: held-out rewards of 12-iteration runs.

  python bench/main_job_study.py --workdir /tmp/mj_study --out bench/results/main_job_sampling_study.json
  python bench/main_job_study.py --workdir /tmp/mj_study --runs sde_window cps_exact   # a subset
  python bench/main_job_study.py --workdir /tmp/mj_study --no-run --out FILE   # re-read finished runs

Each run is `mgrpo-train --config configs/tiny_ocr_color.py --workdir DIR/<name>` with the flags of
RUNS (the config's default plus overrides; about 5-7 minutes each on a 2-core CPU, so all of them
take over an hour). Per run the JSON keeps the held-out evaluations (`eval/ocr`,
`eval/text_color` at iterations 0, 4, 8, 12: all 40 held-out prompts, 10 ODE steps, fixed noise),
the training rewards of every iteration (SDE/CPS rollouts of that iteration's training prompts),
the range of the logged KL and gradient norm, and the wall time.

The `prompts8_*` runs train on 8 training prompts only (rows 0, 230, ..., 1610 of train.csv,
each 5 times, written to DIR/prompts8.csv) and evaluate on the same 40 rows: can the method
raise the rewards of the prompts it trains on?

`h100_weights_sde_all_steps` needs the weights shipped before 2026-11-28 in a directory given
with --h100_weights (`git show 976d191:mgrpo_jax/assets/tiny_text_renderer/model.safetensors`
and its config.json); without it that run is skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny_ocr_color.py")
TRAIN_CSV = os.path.join(ROOT, "mgrpo_jax", "assets", "synthetic_ocr_color", "train.csv")

# The settings of the main job before 2026-11-28: Flow-GRPO's SDE on steps 0-4, ODE after.
SDE_WINDOW = ["--config.sample.method=sde", "--config.sample.sde_window=(0,5)",
              "--config.train.kl_mode=flow_grpo"]
# Flow-GRPO's SDE on every step but the last.
SDE_ALL = ["--config.sample.method=sde", "--config.train.kl_mode=flow_grpo"]
# CPS with Flow-GRPO's score -(x - mean)^2 and KL.
CPS_FLOW_GRPO = ["--config.sample.cps_logprob=flow_grpo", "--config.train.kl_mode=flow_grpo"]
PROMPTS8 = ["--config.data.dataset={prompts8}", "--config.log.eval_dataset={prompts8}"]
TREE8 = ["--config.tree.branch_factors=(4,2)", "--config.tree.group_size=8"]

RUNS: dict[str, list[str]] = {
    "sde_window": SDE_WINDOW,
    "sde_window_global_std": SDE_WINDOW + ["--config.advantage.std=global"],
    "sde_window_8_prompts_8_iterations": SDE_WINDOW + [
        "--config.data.prompts_per_batch=8", "--config.train.num_iterations=8",
        "--config.log.checkpoint_every=8"],
    "sde_all_steps": SDE_ALL,
    "sde_all_steps_lr2e-3": SDE_ALL + ["--config.train.learning_rate=2e-3"],
    "sde_all_steps_8_leaves": SDE_ALL + TREE8,
    "h100_weights_sde_all_steps": SDE_ALL + ["--config.model.path={h100_weights}"],
    "prompts8_sde_all_steps_tree": SDE_ALL + PROMPTS8,
    "prompts8_sde_all_steps_flat": SDE_ALL + PROMPTS8 + ["--config.tree.mode=flat"],
    "cps_flow_grpo_score": CPS_FLOW_GRPO,
    "cps_flow_grpo_score_lr3e-3": CPS_FLOW_GRPO + ["--config.train.learning_rate=3e-3"],
    "cps_exact": [],  # the default
}


def write_prompts8(path: str) -> None:
  """8 training prompts (rows 0, 230, ..., 1610 of train.csv), each 5 times, 40 rows."""
  with open(TRAIN_CSV, newline="") as f:
    rows = list(csv.DictReader(f))
  pick = rows[::230][:8]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    for i in range(40):
      writer.writerow(dict(pick[i % 8], line_id=i))


def read_run(workdir: str) -> dict:
  """Evaluations, training rewards, KL / gradient-norm ranges of a finished run (the last row
  of each step, as bench/main_job.py reads it, so a resumed run counts once)."""
  from mgrpo_jax import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  evals, train, kl, grad = {}, [], [], []
  for row in metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"),
                                      latest_per_step=True):
    if "eval/ocr" in row:
      evals[str(row["step"])] = {"ocr": row["eval/ocr"], "text_color": row["eval/text_color"]}
    if "reward/ocr" in row:
      train.append([row["reward/ocr"], row["reward/text_color"]])
    if "train/kl" in row:
      kl.append(row["train/kl"])
      grad.append(row["train/grad_norm"])
  return {"eval": evals, "train_rewards_ocr_color": train,
          "kl_range": [min(kl), max(kl)] if kl else None,
          "grad_norm_range": [min(grad), max(grad)] if grad else None}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default="")
  parser.add_argument("--runs", nargs="*", default=list(RUNS))
  parser.add_argument("--h100_weights", default="")
  parser.add_argument("--no-run", action="store_true", help="only read finished runs")
  args = parser.parse_args(argv)
  unknown = sorted(set(args.runs) - set(RUNS))
  if unknown:
    parser.error(f"unknown runs {unknown}; known: {sorted(RUNS)}")
  os.makedirs(args.workdir, exist_ok=True)
  prompts8 = os.path.join(args.workdir, "prompts8.csv")
  write_prompts8(prompts8)
  results = {}
  for name in args.runs:
    if "{h100_weights}" in " ".join(RUNS[name]) and not args.h100_weights:
      print(f"{name}: skipped (no --h100_weights)", flush=True)
      continue
    flags = [f.format(prompts8=prompts8, h100_weights=args.h100_weights) for f in RUNS[name]]
    workdir = os.path.join(args.workdir, name)
    command = ["mgrpo-train", "--config", CONFIG, "--workdir", workdir,
               "--config.log.progress=False"] + flags
    wall = None
    if not args.no_run:
      start = time.perf_counter()
      subprocess.run(command, check=True)
      wall = time.perf_counter() - start
    result = read_run(workdir)
    result.update(command=" ".join(["mgrpo-train --config configs/tiny_ocr_color.py --workdir W"]
                                   + RUNS[name]), wall_s=wall)
    results[name] = result
    ev = result["eval"]
    print(f"{name}: " + " | ".join(f"{k}: ocr {v['ocr']:.3f} colour {v['text_color']:.3f}"
                                   for k, v in ev.items()), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
