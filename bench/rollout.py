r"""Tree vs flat rollouts at equal leaves per prompt: model evaluations (NFE) and wall time.

  python bench/rollout.py                      # tiny model, CPU, default trees
  python bench/rollout.py --steps 10 --leaves 8 --prompts 4 --repeats 5

For every tree shape with `--leaves` leaves per prompt it prints NFE per prompt and the median
wall time of two jitted calls after compilation, each with its ratio to the flat rollout:
`denoise` (the rollout alone, given the text conditioning: what NFE counts) and `sample` (text
encoding, rollout and decoding of every leaf, as the trainer runs it). The denoising time ratio
tracks the NFE ratio; the full sampling ratio is higher because decoding costs the same for
every shape. `--width` / `--layers` size the tiny MMDiT so the denoiser dominates as it does at
full scale.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from mgrpo_jax import runtime as runtime_lib
from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax import train_step as train_step_lib
from mgrpo_jax.config_utils import load_sibling
from mgrpo_jax.sampling import rollout as rollout_lib
from mgrpo_jax.sampling import schedule
from mgrpo_jax.sampling.tree import make_tree_spec


def tree_shapes(steps: int, leaves: int):
  """(name, roots, branch_steps, factors): flat plus trees that branch early and late."""
  shapes = [("flat", leaves, (), ())]
  if leaves % 2 == 0 and leaves > 2:
    half = leaves // 2
    shapes.append((f"x2@0,x{half}@{steps // 3}", 1, (0, steps // 3), (2, half)))
    shapes.append((f"x2@{steps // 5},x{half}@{steps // 2}", 1, (steps // 5, steps // 2), (2, half)))
  shapes.append((f"x{leaves}@{steps // 2}", 1, (steps // 2,), (leaves,)))
  return shapes


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--leaves", type=int, default=8)
  parser.add_argument("--prompts", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--guidance", type=float, default=4.5)
  parser.add_argument("--layers", type=int, default=4, help="MMDiT blocks of the tiny model")
  parser.add_argument("--heads", type=int, default=4, help="heads of 32 channels each")
  args = parser.parse_args()

  base = load_sibling(__file__, "../configs/base").get_config()
  base.sample.num_steps = args.steps
  base.sample.guidance_scale = args.guidance
  base.lora.enabled = True
  base.model.num_layers = args.layers
  base.model.num_heads = args.heads
  base.model.head_dim = 32
  runtime = runtime_lib.build_runtime(base, sharding_lib.make_mesh(base.mesh), "sample")
  generator, policy, sampler = runtime.generator, runtime.policy, runtime.sampler
  trainable, frozen = runtime.trainable, runtime.frozen
  sigmas = schedule.generator_sigmas(generator, base, args.steps)
  mask = schedule.sde_step_mask(args.steps, None)
  tokens = runtime.tokens([f"a sign that reads \"bench {i}\"" for i in range(args.prompts)])
  neg = runtime.tokens([""] * args.prompts)

  rows = []
  for name, roots, branch_steps, factors in tree_shapes(args.steps, args.leaves):
    spec = make_tree_spec(args.steps, mask, num_roots=roots, branch_steps=branch_steps,
                          branch_factors=factors)
    assert spec.num_leaves == args.leaves, (name, spec.num_leaves)
    fn = jax.jit(train_step_lib.make_sample_fn(policy, spec, sampler, sigmas,
                                               generator.latent_shape))

    @jax.jit
    def denoise(trainable, cond, neg_cond, key, spec=spec):
      return rollout_lib.rollout(policy.velocity_fn(trainable, frozen), cond, neg_cond, key,
                                 spec, sigmas, generator.latent_shape, sampler).final_latents

    key = jax.random.key(0)
    _, cond, neg_cond, _ = fn(trainable, frozen, tokens, neg, key)
    t_sample = median_seconds(
        lambda r: fn(trainable, frozen, tokens, neg, jax.random.fold_in(key, r)), args.repeats)
    t_denoise = median_seconds(
        lambda r: denoise(trainable, cond, neg_cond, jax.random.fold_in(key, r)), args.repeats)
    rows.append((name, spec.nfe, t_denoise, t_sample))

  flat = rows[0]
  print(f"backend={jax.default_backend()} devices={jax.device_count()} steps={args.steps} "
        f"leaves/prompt={args.leaves} prompts={args.prompts} cfg={args.guidance} "
        f"MMDiT {args.layers} blocks x {args.heads * 32} wide, repeats={args.repeats} (median)")
  print(f"{'rollout':<16}{'NFE/prompt':>11}{'NFE ratio':>10}{'denoise s':>11}{'ratio':>7}"
        f"{'sample s':>10}{'ratio':>7}")
  for name, nfe, t_denoise, t_sample in rows:
    print(f"{name:<16}{nfe:>11d}{nfe / flat[1]:>10.3f}{t_denoise:>11.3f}"
          f"{t_denoise / flat[2]:>7.3f}{t_sample:>10.3f}{t_sample / flat[3]:>7.3f}")


def median_seconds(fn, repeats):
  jax.block_until_ready(fn(1000))  # compile (a key not used for timing)
  times = []
  for r in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(r))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


if __name__ == "__main__":
  main()
