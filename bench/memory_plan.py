r"""Per-device memory of the real-size SD3.5-Medium / FLUX.1-dev LoRA train step, compiled AOT.

  python bench/memory_plan.py                                  # SD3.5-M, 8 devices, fsdp=8
  python bench/memory_plan.py --mesh 2,4,1 --batch 1 2 4
  python bench/memory_plan.py --num_layers 2                   # quick check of the script
  python bench/memory_plan.py --model flux --batch 1           # FLUX.1-dev (no CFG, no KL)

Nothing is allocated: the model (SD3.5-Medium's transformer config, bf16 weights, float32 LoRA
r=32 on the attention projections of both streams) is built with `nnx.eval_shape`, the
Multi-GRPO train step (policy forward with CFG, the reference forward for the KL term,
backward, AdamW) is lowered for abstract arguments carrying their shardings on a simulated
mesh, and XLA's memory analysis of the compiled program is printed per device: arguments
(frozen weights, adapters, optimizer state, batch), outputs and temporaries (activations kept for
the backward pass). The text conditioning is precomputed (the trainer stores it per prompt), so
the text encoders and the VAE are not part of this step.

Rematerialisation (`config.model.remat`) cannot be measured this way: XLA:CPU merges the
recomputed forward with the original one (common-subexpression elimination), so a CPU compile
with remat keeps every activation. The remat column is therefore an estimate from two small
compilations of the temporaries: with per-block cost a = T(2 layers) - T(1 layer) and the rest
b = T(1) - a, remat keeps b + a (one block's activations while it is recomputed) + the saved
block inputs of every layer, on top of the full model's arguments and outputs. The "linear"
column, b + a * layers, checks that model against the full compile's temporaries. FLUX has two
kinds of blocks, so its per-block costs come from T(1 double, 1 single), T(2, 1) and T(1, 2), and
remat keeps the larger of the two.

Figures are XLA:CPU's, with attention materialising its score matrices; TPU and GPU kernels
(flash attention through `jax.nn.dot_product_attention`) need much less, so read these as upper
bounds that tell which slice is certainly large enough.
"""

from __future__ import annotations

import argparse
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  _n = 8
  for i, a in enumerate(sys.argv):
    if a.startswith("--devices"):
      _n = int(a.split("=")[1]) if "=" in a else int(sys.argv[i + 1])
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_n}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402

import mgrpo_jax  # noqa: E402,F401
from mgrpo_jax import policy as policy_lib  # noqa: E402
from mgrpo_jax import sharding as sharding_lib  # noqa: E402
from mgrpo_jax import train_step as train_step_lib  # noqa: E402
from mgrpo_jax.models import flux_transformer, sd3_transformer  # noqa: E402
from mgrpo_jax.models import lora as lora_lib  # noqa: E402
from mgrpo_jax.sampling import rollout as rollout_lib  # noqa: E402
from mgrpo_jax.sampling import schedule  # noqa: E402
from mgrpo_jax.sampling.tree import make_tree_spec  # noqa: E402

# stabilityai/stable-diffusion-3.5-medium transformer/config.json (architecture fields).
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# black-forest-labs/FLUX.1-dev transformer/config.json (architecture fields).
FLUX1_DEV = dict(
    patch_size=1, in_channels=64, out_channels=64, num_layers=19, num_single_layers=38,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# Flow-GRPO's LoRA targets (both streams' q/k/v/out of the joint attention; FLUX's single
# blocks have q/k/v only).
LORA_TARGETS = (r"attn\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",)
GiB = 1024 ** 3


def model_spec(name: str, layers: tuple[int, ...]):
  """(make_transformer, velocity, model width, pooled width) for `layers` blocks: (n,) for
  SD3.5-M, (n_double, n_single) for FLUX.1-dev; bf16 weights and compute."""
  kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=False)
  if name == "sd35m":
    (n,) = layers
    config = sd3_transformer.SD3TransformerConfig(
        **dict(SD35_MEDIUM, num_layers=n, dual_attention_layers=tuple(
            i for i in SD35_MEDIUM["dual_attention_layers"] if i < n)), **kw)
    return (lambda rngs: sd3_transformer.SD3Transformer(config, rngs=rngs),
            lambda t, x, s, c: t(x, s, c["hidden"], c["pooled"]), config.inner_dim, 2048)
  n_double, n_single = layers
  config = flux_transformer.FluxTransformerConfig(
      **dict(FLUX1_DEV, num_layers=n_double, num_single_layers=n_single), **kw)
  guidance = lambda s: jnp.full(s.shape, 3.5, jnp.float32)
  return (lambda rngs: flux_transformer.FluxTransformer(config, rngs=rngs),
          lambda t, x, s, c: t(x, s, c["hidden"], c["pooled"], guidance(s)), config.inner_dim,
          768)


class Velocity(nnx.Module):
  """A transformer behind the generator interface's `velocity(x, sigma, cond)`."""

  def __init__(self, make, call, rngs):
    self.transformer = make(rngs)
    self._call = call

  def velocity(self, x, sigma, cond):
    return self._call(self.transformer, x, sigma, cond)


def plan(args, per_device: int, layers: tuple[int, ...]) -> dict[str, float]:
  """XLA's memory analysis (GiB per device) of the train step with `layers` blocks."""
  mesh = sharding_lib.make_mesh(dict(zip(("data", "fsdp", "tensor"), args.mesh)))
  make_transformer, call, _, pooled_dim = model_spec(args.model, layers)

  def make():
    model = Velocity(make_transformer, call, nnx.Rngs(0))
    lora_lib.apply_lora(model, LORA_TARGETS, args.lora_rank, 2.0 * args.lora_rank,
                        rngs=nnx.Rngs(1))
    return model

  graphdef, lora_state, base_state = lora_lib.split_lora(nnx.eval_shape(make))

  def with_sharding(tree):
    shardings = sharding_lib.state_shardings(tree, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)

  trainable, frozen = with_sharding(lora_state), with_sharding(base_state)
  train_cfg = ml_collections.ConfigDict({"beta": args.beta, "clip_range": 1e-4,
                                         "kl_mode": "flow_grpo", "learning_rate": 3e-4,
                                         "b1": 0.9, "b2": 0.999, "adam_eps": 1e-8,
                                         "weight_decay": 1e-4, "max_grad_norm": 1.0,
                                         "grad_accum_steps": 1})
  tx = policy_lib.make_optimizer(ml_collections.ConfigDict({"train": train_cfg}))
  opt_state = jax.eval_shape(tx.init, trainable)
  replicated = sharding_lib.replicated(mesh)
  # Moments shard like their parameters; scalar counters are replicated.
  import optax  # pylint: disable=g-import-not-at-top
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, opt_state, jax.tree.map(lambda a: a.sharding, trainable),
      transform_non_params=lambda _: replicated)
  opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           opt_state, opt_shardings)
  state = train_step_lib.TrainState(trainable, opt_state,
                                    jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))

  T = 10
  spec = make_tree_spec(T, schedule.sde_step_mask(T, None), num_roots=1)
  sampler = rollout_lib.SamplerConfig(guidance_scale=args.cfg)
  sigmas = schedule.flow_match_sigmas(T, 3.0)
  step = train_step_lib.make_train_step(policy_lib.Policy(graphdef, True), tx, spec, sampler,
                                        sigmas, train_cfg)

  P = per_device * sharding_lib.batch_size_multiple(mesh)
  h = args.resolution // 8
  channels = 16  # both models' VAE latents
  def batched(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_lib.batch_sharding(mesh,
                                                                                   len(shape)))
  cond = {"hidden": batched((P, args.text_len, 4096), jnp.bfloat16),
          "pooled": batched((P, pooled_dim), jnp.bfloat16)}
  transitions = train_step_lib.Transitions(
      latents=batched((P, 1, h, h, channels), jnp.float32),
      next_latents=batched((P, 1, h, h, channels), jnp.float32),
      log_probs=batched((P, 1), jnp.float32), steps=batched((P, 1), jnp.int32),
      advantages=batched((P, 1), jnp.float32), keep=batched((P, 1), jnp.float32))
  batch = train_step_lib.Minibatch(transitions, cond, cond if args.cfg != 1.0 else None)
  with jax.set_mesh(mesh):  # activation sharding hints (sharding.constrain) need the mesh
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, batch, frozen).compile()
  mem = compiled.memory_analysis()
  return {"arguments": mem.argument_size_in_bytes / GiB, "outputs": mem.output_size_in_bytes / GiB,
          "temporaries": mem.temp_size_in_bytes / GiB,
          "total": (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                    + mem.output_size_in_bytes - mem.alias_size_in_bytes) / GiB}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("sd35m", "flux"), default="sd35m")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor sizes")
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4],
                      help="transitions per data-parallel device per train step")
  parser.add_argument("--num_layers", type=int, default=None,
                      help="blocks (FLUX: double blocks; single blocks scale with them)")
  parser.add_argument("--resolution", type=int, default=512)
  parser.add_argument("--text_len", type=int, default=None,
                      help="tokens (default SD3: CLIP 77 + T5 256; FLUX: T5 512)")
  parser.add_argument("--cfg", type=float, default=None, help="default 4.5 SD3, 1.0 FLUX")
  parser.add_argument("--beta", type=float, default=None, help="default 0.04 SD3, 0 FLUX")
  parser.add_argument("--lora_rank", type=int, default=32)
  args = parser.parse_args()
  args.mesh = tuple(int(x) for x in args.mesh.split(","))
  flux = args.model == "flux"
  # [FG] Flow-GRPO's settings: SD3.5-M with CFG 4.5 and KL 0.04; FLUX.1-dev without CFG or KL.
  args.text_len = args.text_len or (512 if flux else 77 + 256)
  args.cfg = args.cfg if args.cfg is not None else (1.0 if flux else 4.5)
  args.beta = args.beta if args.beta is not None else (0.0 if flux else 0.04)
  if flux:
    doubles = args.num_layers or FLUX1_DEV["num_layers"]
    full_layers = (doubles, doubles * FLUX1_DEV["num_single_layers"] // FLUX1_DEV["num_layers"])
    name = f"FLUX.1-dev transformer ({full_layers[0]} double + {full_layers[1]} single blocks)"
  else:
    full_layers = (args.num_layers or SD35_MEDIUM["num_layers"],)
    name = f"SD3.5-Medium transformer ({full_layers[0]} layers)"
  print(f"{name}, {args.resolution} px, text {args.text_len} tokens, CFG {args.cfg}, beta "
        f"{args.beta}, LoRA r={args.lora_rank}; mesh data,fsdp,tensor={args.mesh} on "
        f"{jax.device_count()} simulated devices; GiB per device")
  print(f"{'batch/dev':>9} {'args':>7} {'temp':>8} {'total':>8} {'temp lin.':>9} "
        f"{'remat (est.)':>13}")
  _, _, width, _ = model_spec(args.model, full_layers)
  tokens = (args.resolution // 16) ** 2 + args.text_len
  for b in args.batch:
    full = plan(args, b, full_layers)
    if flux:
      base = plan(args, b, (1, 1))["temporaries"]
      per_block = {"double": plan(args, b, (2, 1))["temporaries"] - base,
                   "single": plan(args, b, (1, 2))["temporaries"] - base}
      rest = base - per_block["double"] - per_block["single"]
      linear = rest + per_block["double"] * full_layers[0] + per_block["single"] * full_layers[1]
      largest = max(per_block.values())
    else:
      one = plan(args, b, (1,))["temporaries"]
      two = plan(args, b, (2,))["temporaries"]
      largest, rest = two - one, 2 * one - two
      linear = rest + largest * full_layers[0]
    # Saved per block under remat: its token stream inputs (float32), per CFG branch.
    saved = (2 if args.cfg != 1.0 else 1) * b * tokens * width * 4 / GiB
    remat = full["arguments"] + full["outputs"] + rest + largest + saved * sum(full_layers)
    print(f"{b:>9} {full['arguments']:>7.2f} {full['temporaries']:>8.2f} {full['total']:>8.2f} "
          f"{linear:>9.2f} {remat:>13.2f}", flush=True)


if __name__ == "__main__":
  main()
