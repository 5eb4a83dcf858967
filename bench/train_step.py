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

from mgrpo_jax import policy as policy_lib
from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax import train_step as train_step_lib
from mgrpo_jax.config_utils import load_sibling
from mgrpo_jax.models import registry
from mgrpo_jax.sampling import rollout as rollout_lib
from mgrpo_jax.sampling import schedule
from mgrpo_jax.sampling.tree import tree_spec_from_config

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

  mesh = sharding_lib.make_mesh(config.mesh)
  generator = registry.get_generator(config.model)
  spec = tree_spec_from_config(config)
  sampler = rollout_lib.sampler_from_config(config)
  # The generator's own schedule (FLUX's differs from SD3's shifted one), as the trainer uses.
  sigmas = schedule.generator_sigmas(generator, config, config.sample.num_steps)
  graphdef, trainable, frozen = policy_lib.build_model_states(generator, config, mesh)
  policy = policy_lib.Policy(graphdef, bool(config.lora.enabled))
  P = config.data.prompts_per_batch
  prompts = [f'a sign that reads "bench {i}"' for i in range(P)]
  tokens = sharding_lib.global_batch(generator.tokenize(prompts), mesh)
  neg = sharding_lib.global_batch(generator.tokenize([""] * P), mesh)

  sample = jax.jit(train_step_lib.make_sample_fn(policy, spec, sampler, sigmas,
                                                 generator.latent_shape))
  t_sample = median_seconds(
      lambda r: sample(trainable, frozen, tokens, neg, jax.random.key(r)), args.repeats)
  out, cond, neg_cond, _ = sample(trainable, frozen, tokens, neg, jax.random.key(0))

  tx = policy_lib.make_optimizer(config)
  nmb = config.train.num_minibatches
  minibatches, normalizer = jax.jit(train_step_lib.make_minibatch_fn(nmb))(
      {"latents": out.latents, "next_latents": out.next_latents, "log_probs": out.log_probs,
       "steps": out.steps, "advantages": jnp.ones_like(out.log_probs),
       "keep": jnp.ones_like(out.log_probs)}, jax.random.key(0))
  batch = jax.tree.map(lambda a: a[0], minibatches)
  batch.update(cond=cond, neg_cond=neg_cond, normalizer=normalizer[0])
  step = jax.jit(train_step_lib.make_train_step(policy, tx, spec, sampler, sigmas, config.train))
  state = {"trainable": trainable, "opt_state": jax.jit(tx.init)(trainable),
           "step": jnp.zeros([], jnp.int32)}
  t_train = median_seconds(lambda r: step(state, batch, jax.random.key(r), frozen)[1]["loss"],
                           args.repeats)

  images = P * spec.num_leaves
  transitions = int(np.prod(batch["log_probs"].shape))
  print(f"backend={jax.default_backend()} devices={jax.device_count()} config={name}"
        f"{':' + args.variant if args.variant else ''} prompts={P} leaves/prompt={spec.num_leaves} "
        f"steps={spec.num_steps} cfg={sampler.guidance_scale} repeats={args.repeats} (median)")
  print(f"sampling:   {t_sample:.3f} s per batch of {images} images -> {images / t_sample:.1f} images/s"
        f" (NFE/prompt {spec.nfe} vs {spec.nfe_independent} independent)")
  print(f"train step: {t_train:.3f} s per minibatch of {transitions} transitions -> "
        f"{transitions / t_train:.1f} transitions/s")


if __name__ == "__main__":
  main()
