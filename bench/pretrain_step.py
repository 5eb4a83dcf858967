r"""Seconds per pretraining step of the tiny text renderer: plain block loop, scan, scan + remat.

  python bench/pretrain_step.py                       # shipped sizes, batch 32, 30 steps each
  python bench/pretrain_step.py --steps 20 --rounds 2 --out bench/results/pretrain_step_cpu.json
  python bench/pretrain_step.py --quick               # tiny sizes, a few steps (the test runs it)

Each way runs `mgrpo_jax.pretrain`'s own jitted train step (same optimizer, same batches of
`batch_for_step`) from the same initial parameters, blocking after every step; it reports the
median step time after `--warmup` steps (compilation excluded), and the loss after the last
step, which must agree between the ways: they compute the same function. Rounds alternate the
ways so that a slow stretch of a shared machine does not favour one of them.

Why the ways differ on a CPU: written as a Python loop, the blocks' backward pass is one long
straight-line graph, and XLA's CPU compiler fuses the residual stream's cotangent chain across all
blocks into every consumer (so it is recomputed many times); `scan_layers` keeps one block per
loop body, and remat (recomputing each block's forward in the backward pass) saves the loop from
stacking the block activations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

from mgrpo_jax import pretrain
from mgrpo_jax.models import tiny_pixel

WAYS = {"loop": dict(scan_layers=False, remat=False),
        "scan": dict(scan_layers=True, remat=False),
        "scan_remat": dict(scan_layers=True, remat=True)}
QUICK_MODEL = dict(num_layers=3, num_heads=2, head_dim=16, pooled_dim=16)


def time_way(way: str, steps: int, warmup: int, batch_size: int, model: dict) -> dict:
  """Median seconds per step of one way and the loss after its last step."""
  config = pretrain.default_config()
  config.train.batch_size = batch_size
  config.model.update(model)
  config.model.update(WAYS[way])
  cfg = pretrain.model_config(config)
  module = tiny_pixel.TinyPixelT2I(cfg, rngs=nnx.Rngs(config.seed))
  graphdef, params = nnx.split(module, nnx.Param)
  tx = pretrain.make_optimizer(config)
  opt_state = tx.init(params)
  step_fn = pretrain.make_train_step(graphdef, tx)
  tokenizer = tiny_pixel.PromptTokenizer(cfg.text_length)
  key = jax.random.key(config.seed)
  times = []
  for step in range(warmup + steps):
    ids, x0, weights = pretrain.batch_for_step(config, tokenizer, step)
    t0 = time.perf_counter()
    params, opt_state, loss = step_fn(params, opt_state, ids, x0, jax.random.fold_in(key, step),
                                      weights)
    loss.block_until_ready()
    times.append(time.perf_counter() - t0)
  measured = times[warmup:]
  return {"way": way, **WAYS[way], "median_s": statistics.median(measured),
          "min_s": min(measured), "steps": steps, "loss_after": float(loss)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=30, help="timed steps per way and round")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile)")
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS))
  parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 steps (smoke test)")
  parser.add_argument("--out", default="", help="also write the results to this JSON file")
  args = parser.parse_args()
  model = QUICK_MODEL if args.quick else {}
  steps, warmup, batch = (2, 1, 4) if args.quick else (args.steps, args.warmup, args.batch_size)
  runs = []
  for r in range(args.rounds):
    for way in (args.ways if r % 2 == 0 else args.ways[::-1]):
      result = time_way(way, steps, warmup, batch, model)
      runs.append({"round": r, **result})
      print(json.dumps(runs[-1]), flush=True)
  summary = {}
  for way in args.ways:
    medians = [x["median_s"] for x in runs if x["way"] == way]
    summary[way] = {"median_s_per_round": medians, "median_s": statistics.median(medians)}
  losses = {x["loss_after"] for x in runs}
  spread = (max(losses) - min(losses)) / max(abs(min(losses)), 1e-12)
  result = {"command": " ".join(["python bench/pretrain_step.py", *sys.argv[1:]]),
            "batch_size": batch, "model": model or "shipped sizes",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
                       f"({jax.default_backend()})",
            "runs": runs, "summary": summary, "loss_relative_spread": spread}
  for way, s in summary.items():
    print(f"{way:11s} {s['median_s']:.3f} s/step  (rounds: "
          f"{', '.join(f'{m:.3f}' for m in s['median_s_per_round'])})")
  print(f"loss after the last step, relative spread across ways: {spread:.1e}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
      f.write("\n")
  return result


if __name__ == "__main__":
  main()
