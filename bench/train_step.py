r"""Throughput of the two device phases of training on the tiny model: sampling and train steps.

  python bench/train_step.py                       # configs/tiny_ocr_color.py defaults
  python bench/train_step.py --config configs/tiny_ocr_color.py --repeats 5

Prints images/s of the jitted sampling function (text encoding, tree rollout, decoding) and
transitions/s of the jitted train step (policy + reference forward, backward, AdamW), each the
median over `--repeats` calls after compilation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mgrpo_jax import runtime as runtime_lib
from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax import train_step as train_step_lib
from mgrpo_jax.config_utils import load_sibling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median_seconds(fn, repeats):
  jax.block_until_ready(fn(0))  # compile
  times = []
  for r in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(r + 1))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny_ocr_color.py"))
  parser.add_argument("--variant", default=None)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  name = os.path.splitext(os.path.basename(args.config))[0]
  config = load_sibling(args.config, name).get_config(args.variant)

  # The trainer's own runtime: same weights, jitted functions and shardings as a run.
  runtime = runtime_lib.build_runtime(config, sharding_lib.make_mesh(config.mesh), "train")
  state = runtime.init_state(num_prompts=1).replace(prompt_stats=None)
  fns = runtime.iteration_fns()
  spec, sampler = fns.spec, runtime.sampler
  P = config.data.prompts_per_batch
  tokens = runtime.tokens([f'a sign that reads "bench {i}"' for i in range(P)])
  neg = runtime.tokens([""] * P)
  key = jax.random.key(0)

  t_sample = median_seconds(
      lambda r: fns.sample(state.trainable, runtime.frozen, tokens, neg, key, r), args.repeats)
  out, cond, neg_cond, _ = fns.sample(state.trainable, runtime.frozen, tokens, neg, key, 0)
  ones = jnp.ones_like(out.log_probs)[None]  # advantages and keep of one batch [1, P, M]
  minibatches, normalizer = runtime.split_fn(out, ones, ones, 0, key)
  transitions, normalizer = runtime.take_fn(minibatches, normalizer, 0)
  batch = train_step_lib.Minibatch(transitions, cond, neg_cond, normalizer)
  holder = {"state": state}  # the train step donates its state: each call takes the last one

  def train(r):
    del r
    holder["state"], metrics = fns.train_step(holder["state"], batch, runtime.frozen)
    return metrics["loss"]

  t_train = median_seconds(train, args.repeats)

  images = P * spec.num_leaves
  transitions = int(np.prod(batch.transitions.log_probs.shape))
  print(f"backend={jax.default_backend()} devices={jax.device_count()} config={name}"
        f"{':' + args.variant if args.variant else ''} prompts={P} leaves/prompt={spec.num_leaves} "
        f"steps={spec.num_steps} cfg={sampler.guidance_scale} repeats={args.repeats} (median)")
  print(f"sampling:   {t_sample:.3f} s per batch of {images} images -> {images / t_sample:.1f} images/s"
        f" (NFE/prompt {spec.nfe} vs {spec.nfe_independent} independent)")
  print(f"train step: {t_train:.3f} s per minibatch of {transitions} transitions -> "
        f"{transitions / t_train:.1f} transitions/s")


if __name__ == "__main__":
  main()
