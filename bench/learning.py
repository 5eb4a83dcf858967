r"""Does the reward go up, and at what sampling cost? Tree vs flat rollouts on configs/tiny_jpeg.py.

  python bench/learning.py                          # 2 seeds x {tree, flat}, 40 iterations each
  python bench/learning.py --seeds 0 1 2 --iterations 60

Each run trains the tiny model from scratch (a temporary workdir) and the script prints, per
rollout mode: model evaluations per prompt per iteration, the mean JPEG-compressibility reward of
the first and the last 10 iterations (mean over seeds, with the spread across seeds), and the
mean seconds per iteration after the first. Both modes produce 4 images per prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from mgrpo_jax import trainer as trainer_lib
from mgrpo_jax.config_utils import load_sibling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(variant: str | None, seed: int, iterations: int) -> dict[str, float]:
  config = load_sibling(os.path.join(ROOT, "configs", "tiny_jpeg.py"), "tiny_jpeg").get_config(
      variant)
  config.seed = seed
  config.train.num_iterations = iterations
  config.log.progress = False
  config.log.eval_every = iterations
  config.log.checkpoint_every = iterations
  with tempfile.TemporaryDirectory() as workdir:
    trainer_lib.train_and_evaluate(config, workdir)
    lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  rewards = [l["reward/jpeg_compressibility"] for l in lines]
  window = min(10, len(rewards))
  return {"nfe": lines[0]["nfe/per_prompt"], "first": statistics.mean(rewards[:window]),
          "last": statistics.mean(rewards[-window:]),
          "sec": statistics.mean(l["time/iteration"] for l in lines[1:]) if len(lines) > 1
                 else lines[0]["time/iteration"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--iterations", type=int, default=40)
  args = parser.parse_args()
  print(f"configs/tiny_jpeg.py, {args.iterations} iterations, seeds {args.seeds}")
  print(f"{'mode':<6}{'NFE/prompt':>11}{'reward first10':>18}{'reward last10':>18}"
        f"{'gain':>16}{'s/iter':>8}")
  for name, variant in (("tree", None), ("flat", "flat")):
    runs = [run(variant, s, args.iterations) for s in args.seeds]
    gains = [r["last"] - r["first"] for r in runs]
    spread = (max(gains) - min(gains)) / 2
    print(f"{name:<6}{runs[0]['nfe']:>11.0f}{statistics.mean(r['first'] for r in runs):>18.3f}"
          f"{statistics.mean(r['last'] for r in runs):>18.3f}"
          f"{statistics.mean(gains):>+10.3f} ±{spread:.3f}"
          f"{statistics.mean(r['sec'] for r in runs):>8.2f}")


if __name__ == "__main__":
  main()
