r"""Our transformer against diffusers + PyTorch doing the same work, per attention implementation.

  python bench/accelerator.py --tiny                                  # CPU smoke run, ~1 minute
  python bench/accelerator.py --model sd35m --framework jax --attention xla,cudnn \
      --json /tmp/jax.json                                            # one H100, SD3.5-M size
  python bench/accelerator.py --model sd35m --framework torch --json /tmp/torch.json
  python bench/accelerator.py --merge /tmp/jax.json /tmp/torch.json   # the table with ratios

Work (SD3.5-Medium-sized MMDiT-X: 24 blocks, dual attention in blocks 0-12, RMS qk-norm, 2.24 B
parameters; or FLUX.1-dev-sized: 19 + 38 blocks, 11.9 B; random weights in `--dtype`, 512 px,
`--text-tokens` text tokens):
  forward    one velocity call on `--batch` latents (16 = 8 CFG pairs), no gradient.
  train      the LoRA train step (rank 32 on the joint attention's q/k/v/out): re-score
             `--train-batch` stored transitions with the policy under CFG, the reference pass
             (adapters off) for the KL term, backward through the adapters, AdamW. Ours is
             `train_step.make_train_step`; torch runs Flow-GRPO's equivalent (peft-style LoRA
             wrappers, reference pass under no_grad with adapters disabled).
  rollout    the SDE sampling loop with CFG and per-step log-probs, `--steps` steps: ours flat
             (`--leaves` independent trajectories) and as the SD3.5-M config's tree (3 roots, x2
             at step 1, x4 at step 3: 24 leaves); torch runs Flow-GRPO's flat loop (all leaves in
             one batch, CFG by batch concatenation).
Times are medians of `--repeats` calls after `--warmup` calls (compilation excluded). With
`--framework both` (the default) torch runs after JAX in the same process; on a GPU run them as
separate processes (`--framework jax` / `torch`, then `--merge`) since JAX preallocates most of
the GPU memory. torch and diffusers are optional: without them the torch rows say why.

Weights are random and made leaf by leaf (one small jitted normal per distinct leaf shape) instead
of a jitted init of the whole model, which takes minutes to compile at this size.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from mgrpo_jax import policy as policy_lib
from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax import train_step as train_step_lib
from mgrpo_jax.models import attention as attention_lib
from mgrpo_jax.models import flux_transformer, lora as lora_lib, sd3_transformer
from mgrpo_jax.sampling import rollout as rollout_lib
from mgrpo_jax.sampling import schedule
from mgrpo_jax.sampling.tree import make_tree_spec

# Architectures (diffusers config.json fields). SD3.5-Medium and FLUX.1-dev as published; the
# tiny ones keep every feature (dual attention, qk-norm, guidance embedding) at CPU size.
ARCHS = {
    "sd35m": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                  pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                  qk_norm="rms_norm"),
    "flux": dict(patch_size=1, in_channels=64, out_channels=64, num_layers=19,
                 num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                 joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56)),
    "sd35m_tiny": dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                       attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48,
                       caption_projection_dim=64, pooled_projection_dim=32, out_channels=4,
                       pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"),
    "flux_tiny": dict(patch_size=1, in_channels=16, out_channels=16, num_layers=1,
                      num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                      joint_attention_dim=48, pooled_projection_dim=32, guidance_embeds=True,
                      axes_dims_rope=(4, 6, 6)),
}
# Flow-GRPO's LoRA targets: q/k/v/out of the joint attention (our module paths).
LORA_TARGETS = (r"attn\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",)
TORCH_LORA_TARGETS = r"(^|\.)attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
# configs/sd35m_ocr_color.py's tree (3 roots, x2 at step 1, x4 at step 3) and sampler.
TREE = dict(num_roots=3, branch_steps=(1, 3), branch_factors=(2, 4))
GUIDANCE, NOISE_LEVEL, SHIFT, FLUX_GUIDANCE = 4.5, 0.7, 3.0, 3.5
LORA_RANK, LORA_ALPHA, BETA, CLIP_RANGE = 32, 64.0, 0.04, 1e-4
# Leaves smaller than this are drawn on the host (numpy), larger ones by a jitted draw per shape.
_HOST_DRAW_MAX = 1 << 20


@dataclasses.dataclass
class Work:
  """Sizes of one benchmark run (all static)."""

  model: str            # "sd35m" or "flux"
  arch: dict
  latent: tuple         # (h, w, c) of the (unpacked) latent
  text_tokens: int
  batch: int
  train_batch: int
  steps: int
  leaves: int
  dtype: str
  remat: bool

  @property
  def flux(self) -> bool:
    return self.model == "flux"

  @property
  def guidance_scale(self) -> float:
    """CFG weight: SD3 samples with CFG; FLUX.1-dev embeds guidance (one call per step)."""
    return 1.0 if self.flux else GUIDANCE

  @property
  def cond_width(self) -> tuple[int, int]:
    return self.arch["joint_attention_dim"], self.arch["pooled_projection_dim"]


def make_work(args) -> Work:
  arch = ARCHS[args.model + ("_tiny" if args.tiny else "")]
  if args.model == "flux":
    side = (args.resolution // 8) if not args.tiny else 8
    latent = (side, side, arch["in_channels"] // 4)
  else:
    side = (args.resolution // 8) if not args.tiny else arch["sample_size"]
    latent = (side, side, arch["in_channels"])
  return Work(model=args.model, arch=arch, latent=latent, text_tokens=args.text_tokens,
              batch=args.batch, train_batch=args.train_batch, steps=args.steps,
              leaves=args.leaves, dtype=args.dtype, remat=args.remat)


def median_ms(fn: Callable[[int], Any], warmup: int, repeats: int, sync: Callable) -> dict:
  """Calls fn(i) `warmup` times (compilation), then `repeats` timed calls; milliseconds."""
  t0 = time.perf_counter()
  for i in range(warmup):
    sync(fn(i))
  first = time.perf_counter() - t0
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    sync(fn(warmup + i))
    times.append(1e3 * (time.perf_counter() - t0))
  return {"ms": statistics.median(times), "all_ms": times, "warmup_s": first}


# ---- JAX -----------------------------------------------------------------------------------------
class Velocity(nnx.Module):
  """A transformer behind the generator's `velocity(x, sigma, cond)` (what Policy calls)."""

  def __init__(self, work: Work, attention: str, rngs: nnx.Rngs):
    kw = dict(dtype=jnp.dtype(work.dtype), param_dtype=jnp.dtype(work.dtype), remat=work.remat,
              attention=attention)
    if work.flux:
      self.transformer = flux_transformer.FluxTransformer(
          flux_transformer.FluxTransformerConfig(**work.arch, **kw), rngs=rngs)
    else:
      self.transformer = sd3_transformer.SD3Transformer(
          sd3_transformer.SD3TransformerConfig(**work.arch, **kw), rngs=rngs)
    self.flux = work.flux

  def velocity(self, x, sigma, cond):
    if self.flux:
      return self.transformer(x, sigma, cond["hidden"], cond["pooled"], cond["guidance"])
    return self.transformer(x, sigma, cond["hidden"], cond["pooled"])


def graphdefs(work: Work, attention: str, lora: bool):
  """(graphdef, abstract trainable, abstract frozen) of the (LoRA-adapted) model, no compute."""
  def make():
    model = Velocity(work, attention, nnx.Rngs(0))
    if lora:
      lora_lib.apply_lora(model, LORA_TARGETS, LORA_RANK, LORA_ALPHA, rngs=nnx.Rngs(1))
    return model
  # Tracing a 2 B model's construction is quadratic in its modules without this (minutes).
  with sharding_lib.fast_module_tracing():
    model = nnx.eval_shape(make)
  if lora:
    return lora_lib.split_lora(model)
  graphdef, state = nnx.split(model)
  return graphdef, None, state


def random_state(abstract, key) -> Any:
  """Random weights leaf by leaf: kernels ~ N(0, 1/fan_in), norm scales 1, biases 0.02 N(0, 1);
  one small jitted draw per distinct (shape, dtype), so nothing model-sized is compiled."""
  @functools.partial(jax.jit, static_argnums=(1, 2))
  def draw(k, shape, dtype, std):
    return (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def ones(shape, dtype):
    return jnp.ones(shape, dtype)

  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
  out = []
  for i, (path, leaf) in enumerate(leaves):
    name = jax.tree_util.keystr(path)
    size = int(np.prod(leaf.shape))
    if "scale" in name and "lora" not in name:
      out.append(ones(leaf.shape, leaf.dtype))
      continue
    std = 0.02 if leaf.ndim == 1 else 1.0 / math.sqrt(int(np.prod(leaf.shape[:-1])))
    if size < _HOST_DRAW_MAX:  # small leaves: numpy, no compile per shape
      out.append(jnp.asarray(std * rng.standard_normal(leaf.shape, np.float32), leaf.dtype))
    else:
      out.append(draw(jax.random.fold_in(key, i), leaf.shape, leaf.dtype, jnp.float32(std)))
    jax.block_until_ready(out[-1])
  return jax.tree_util.tree_unflatten(treedef, out)


def random_cond(work: Work, n: int, key) -> dict:
  width, pooled = work.cond_width
  k1, k2 = jax.random.split(key)
  cond = {"hidden": jax.random.normal(k1, (n, work.text_tokens, width), jnp.float32),
          "pooled": jax.random.normal(k2, (n, pooled), jnp.float32)}
  if work.flux:
    cond["guidance"] = jnp.full((n,), FLUX_GUIDANCE, jnp.float32)
  return cond


def bench_jax(work: Work, attentions: list[str], parts: list[str], warmup: int,
              repeats: int, compare_parts=("forward", "train", "rollout"),
              on_result: Callable[[dict], None] = lambda results: None) -> dict:
  """Times our forward / train step / rollouts; returns {row name: result dict}.

  Parts in `compare_parts` run with every implementation in `attentions`, the others with the
  first only; `on_result(results)` is called after each row (to save partial results)."""
  results: dict[str, Any] = {}
  sync = jax.block_until_ready
  t0 = time.perf_counter()
  graphdef, abstract_lora, abstract_base = graphdefs(work, "xla", lora=True)
  base = random_state(abstract_base, jax.random.key(0))
  adapters = random_state(abstract_lora, jax.random.key(1))
  init_s = time.perf_counter() - t0
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(base))
  results["_meta"] = {"params": n_params, "lora_params": sum(
      int(np.prod(a.shape)) for a in jax.tree.leaves(adapters)), "init_s": init_s}
  print(f"jax: {n_params / 1e6:.2f} M parameters ({work.dtype}), random init leaf by leaf "
        f"{init_s:.1f} s", flush=True)
  sigmas = schedule.flow_match_sigmas(work.steps, SHIFT)
  sampler = rollout_lib.SamplerConfig(method="sde", noise_level=NOISE_LEVEL,
                                      guidance_scale=work.guidance_scale)
  use_cfg = work.guidance_scale != 1.0
  h, w, c = work.latent
  tags = {}
  for attention in attentions:
    chosen, reason = attention_lib.select_implementation(
        attention, jnp.dtype(work.dtype), work.arch["attention_head_dim"],
        work.text_tokens + h * w // (4 if work.flux else work.arch["patch_size"] ** 2))
    tags[attention] = f"jax[{attention}]" + (f"={chosen}" if attention == "auto" else "")
    if reason:
      print(f"{tags[attention]}: {reason}", flush=True)  # the tag names what runs instead

  cache = {("xla", True): graphdef}

  def graphdef_of(attention, lora):
    """Abstract builds of a 2 B model take seconds: one per (implementation, LoRA or not)."""
    if (attention, lora) not in cache:
      cache[attention, lora] = graphdefs(work, attention, lora)[0]
    return cache[attention, lora]

  def record(name, res, text):
    results[name] = res
    print(f"{name.split('/', 1)[1]} {text}: {res['ms']:.1f} ms", flush=True)
    on_result(results)

  # Part by part, so the most important rows exist first if a time limit cuts the run short.
  for part in parts:
    for attention in attentions if part in compare_parts else attentions[:1]:
      tag = tags[attention]
      stage = part  # the row an exception is recorded under
      try:
        policy = policy_lib.Policy(graphdef_of(attention, True), True)
        if part == "forward":
          plain_graphdef = graphdef_of(attention, False)
          x = jax.random.normal(jax.random.key(2), (work.batch,) + work.latent, jnp.float32)
          sigma = jnp.linspace(0.1, 0.9, work.batch, dtype=jnp.float32)
          cond = random_cond(work, work.batch, jax.random.key(3))
          fwd = jax.jit(lambda state, x, sigma, cond, g=plain_graphdef:
                        nnx.merge(g, state).velocity(x, sigma, cond))
          res = median_ms(lambda i: fwd(base, x, sigma + 1e-3 * i, cond), warmup, repeats, sync)
          record(f"forward/{tag}", res, f"forward x{work.batch}")
        elif part == "train":
          res = _jax_train(work, policy, adapters, base, sigmas, sampler, warmup, repeats)
          record(f"train/{tag}", res,
                 f"LoRA train step x{work.train_batch} (CFG {sampler.guidance_scale})")
        elif part == "rollout":
          cond = random_cond(work, 1, jax.random.key(4))
          neg = random_cond(work, 1, jax.random.key(5)) if use_cfg else None
          mask = schedule.sde_step_mask(work.steps, None)
          for shape, tree in (("flat", dict(num_roots=work.leaves)), ("tree", TREE)):
            stage = f"rollout_{shape}"
            spec = make_tree_spec(work.steps, mask, **tree)
            if spec.num_leaves != work.leaves:
              raise ValueError(f"tree has {spec.num_leaves} leaves, --leaves={work.leaves}")

            @jax.jit
            def run(adapters, base, key, spec=spec, policy=policy, cond=cond, neg=neg):
              return rollout_lib.rollout(policy.velocity_fn(adapters, base), cond, neg, key, spec,
                                         sigmas, work.latent, sampler).final_latents

            res = median_ms(lambda i, run=run: run(adapters, base, jax.random.key(i)), warmup,
                            repeats, sync)
            res["nfe"] = spec.nfe
            record(f"rollout_{shape}/{tag}", res,
                   f"{shape} rollout, {work.leaves} leaves x {work.steps} steps (NFE {spec.nfe})")
      except Exception as err:  # pylint: disable=broad-except
        # One failing row (an out-of-memory, a kernel that refuses a shape) must not lose the
        # others: record it and go on.
        name = f"{stage}/{tag}"
        results[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        print(f"{name}: FAILED {results[name]['error'][:500]}", flush=True)
        on_result(results)
  return results


class _Cfg(dict):
  """The train-step settings as `train_step.make_train_step` reads them (attributes and .get)."""
  __getattr__ = dict.__getitem__


def _jax_train(work, policy, adapters, base, sigmas, sampler, warmup, repeats):
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(3e-4, weight_decay=1e-4))
  spec = make_tree_spec(work.steps, schedule.sde_step_mask(work.steps, None), num_roots=1)
  step = jax.jit(train_step_lib.make_train_step(
      policy, tx, spec, sampler, sigmas,
      _Cfg(beta=BETA, clip_range=CLIP_RANGE, kl_mode="flow_grpo")), donate_argnums=(0,))
  n = work.train_batch
  k = jax.random.split(jax.random.key(6), 4)
  x = jax.random.normal(k[0], (n, 1) + work.latent, jnp.float32)
  transitions = train_step_lib.Transitions(
      latents=x, next_latents=x + 0.05 * jax.random.normal(k[1], x.shape),
      log_probs=jnp.zeros((n, 1)), advantages=jax.random.normal(k[2], (n, 1)),
      keep=jnp.ones((n, 1)),
      steps=jax.random.randint(k[3], (n, 1), 0, work.steps - 1).astype(jnp.int32))
  neg_cond = (random_cond(work, n, jax.random.key(8)) if sampler.guidance_scale != 1.0
              else None)
  batch = train_step_lib.Minibatch(transitions, random_cond(work, n, jax.random.key(7)),
                                   neg_cond)
  state = train_step_lib.TrainState(jax.tree.map(jnp.copy, adapters),
                                    jax.jit(tx.init)(adapters), jnp.zeros([], jnp.int32))
  holder = {"state": state}

  def call(i):
    del i
    holder["state"], metrics = step(holder["state"], batch, base)
    return metrics["loss"]

  return median_ms(call, warmup, repeats, jax.block_until_ready)


# ---- PyTorch / diffusers -------------------------------------------------------------------------
def bench_torch(work: Work, parts: list[str], warmup: int, repeats: int,
                threads: int | None = None,
                on_result: Callable[[dict], None] = lambda results: None) -> dict:
  """diffusers' transformer doing the same work eagerly with SDPA; {} plus a reason if absent.

  `threads`: torch's CPU threads (on CPU with JAX in the same process, XLA's thread pool makes
  torch's multi-threaded kernels several times slower; one thread avoids that).
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import diffusers  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    print(f"torch: skipped ({err}); install torch and diffusers for the baseline", flush=True)
    return {"_skipped": str(err)}
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if threads:
    torch.set_num_threads(threads)
  dtype = getattr(torch, work.dtype)
  sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
  torch.manual_seed(0)
  t0 = time.perf_counter()
  cls = diffusers.FluxTransformer2DModel if work.flux else diffusers.SD3Transformer2DModel
  previous = torch.get_default_dtype()
  torch.set_default_dtype(dtype)  # parameters born in the compute dtype, on the device
  try:
    with torch.device(device):
      model = cls(**work.arch).eval()
  finally:
    torch.set_default_dtype(previous)
  model.requires_grad_(False)
  loras = _torch_add_lora(torch, model)
  init_s = time.perf_counter() - t0
  n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
  print(f"torch {torch.__version__} diffusers {diffusers.__version__} on {device}: "
        f"{n_params / 1e6:.2f} M parameters, init {init_s:.1f} s, {torch.get_num_threads()} "
        "threads", flush=True)
  results: dict[str, Any] = {"_meta": {"params": n_params, "init_s": init_s,
                                       "torch": torch.__version__,
                                       "diffusers": diffusers.__version__, "device": device}}
  h, w, c = work.latent
  gen = torch.Generator(device).manual_seed(0)
  rand = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)
  width, pooled_w = work.cond_width

  def cond(n):
    out = {"encoder_hidden_states": rand(n, work.text_tokens, width).to(dtype),
           "pooled_projections": rand(n, pooled_w).to(dtype)}
    if work.flux:
      out["guidance"] = torch.full((n,), FLUX_GUIDANCE, device=device)
      grid = torch.stack(torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2),
                                        indexing="ij"), -1).reshape(-1, 2)
      out["img_ids"] = torch.cat([torch.zeros(len(grid), 1), grid], 1).to(device, dtype)
      out["txt_ids"] = torch.zeros(work.text_tokens, 3, device=device, dtype=dtype)
    return out

  def velocity(x, sigma, kw):
    """x [B, c, h, w] float32 -> velocity [B, c, h, w] float32 (the model in `dtype`)."""
    if work.flux:  # FluxPipeline's 2 x 2 packing, timestep = sigma
      b = x.shape[0]
      packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
      packed = packed.reshape(b, (h // 2) * (w // 2), c * 4)
      out = model(hidden_states=packed.to(dtype), timestep=sigma.to(dtype), return_dict=False,
                  **kw)[0]
      out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
      return out.reshape(b, c, h, w).float()
    return model(hidden_states=x.to(dtype), timestep=(sigma * 1000).to(dtype),
                 return_dict=False, **kw)[0].float()

  def guided(x, sigma, kw, neg):
    if neg is None:
      return velocity(x, sigma, kw)
    both = {k: torch.cat([neg[k], kw[k]]) if k not in ("img_ids", "txt_ids") else kw[k]
            for k in kw}
    v = velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), both)
    v_u, v_c = v.chunk(2)
    return v_u + work.guidance_scale * (v_c - v_u)

  sigmas = torch.tensor(schedule.flow_match_sigmas(work.steps, SHIFT), device=device)
  use_cfg = work.guidance_scale != 1.0

  def torch_forward():
    x, sig, cd = rand(work.batch, c, h, w), torch.linspace(0.1, 0.9, work.batch,
                                                           device=device), cond(work.batch)

    def fwd(i):
      with torch.no_grad():
        return velocity(x, sig + 1e-3 * i, cd)
    res = median_ms(fwd, warmup, repeats, sync)
    return "forward/torch", res, f"forward x{work.batch}"

  def torch_train():
    n = work.train_batch
    x = rand(n, c, h, w)
    x_next = x + 0.05 * rand(n, c, h, w)
    step_idx = torch.randint(0, work.steps - 1, (n,), generator=gen, device=device)
    sig, sig_prev = sigmas[step_idx], sigmas[step_idx + 1]
    adv, old_lp = rand(n), torch.zeros(n, device=device)
    cd, neg = cond(n), (cond(n) if use_cfg else None)
    params = [p for m in loras for p in (m.lora_a, m.lora_b)]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-4)

    def train(i):
      del i
      v = guided(x, sig, cd, neg)
      mean, std = _torch_sde_mean_std(torch, v, x, sig, sig_prev, sigmas[1])
      log_prob = _torch_log_prob(torch, x_next, mean, std, sig, sig_prev)
      with torch.no_grad():  # the reference policy: adapters off
        for m in loras:
          m.enabled = False
        v_ref = guided(x, sig, cd, neg)
        for m in loras:
          m.enabled = True
        ref_mean, _ = _torch_sde_mean_std(torch, v_ref, x, sig, sig_prev, sigmas[1])
      ratio = torch.exp(log_prob - old_lp)
      loss = torch.maximum(-adv * ratio,
                           -adv * torch.clamp(ratio, 1 - CLIP_RANGE, 1 + CLIP_RANGE)).mean()
      kl = ((mean - ref_mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std.view(-1) ** 2)
      loss = loss + BETA * kl.mean()
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)
      return loss
    res = median_ms(train, warmup, repeats, sync)
    return "train/torch", res, f"LoRA train step x{n}"

  def torch_rollout():
    cd, neg = cond(1), (cond(1) if use_cfg else None)
    expand = lambda d: None if d is None else {
        k: (v.expand(work.leaves, *v.shape[1:]) if k not in ("img_ids", "txt_ids") else v)
        for k, v in d.items()}
    cd_l, neg_l = expand(cd), expand(neg)

    def sample(i):  # Flow-GRPO's pipeline_with_logprob loop over all leaves at once
      del i
      with torch.no_grad():
        x = rand(work.leaves, c, h, w)
        all_latents, all_log_probs = [x], []
        for s in range(work.steps):
          sig = sigmas[s].expand(work.leaves)
          v = guided(x, sig, cd_l, neg_l)
          mean, std = _torch_sde_mean_std(torch, v, x, sig, sigmas[s + 1].expand(work.leaves),
                                          sigmas[1])
          dt = sigmas[s + 1] - sigmas[s]
          x = mean + std * torch.sqrt(-dt) * rand(*x.shape)
          all_log_probs.append(_torch_log_prob(torch, x, mean, std, sig, sigmas[s + 1]))
          all_latents.append(x)
        return x
    res = median_ms(sample, warmup, repeats, sync)
    res["nfe"] = work.leaves * work.steps
    return "rollout_flat/torch", res, f"flat rollout, {work.leaves} leaves x {work.steps} steps"

  for part in parts:
    try:
      name, res, text = {"forward": torch_forward, "train": torch_train,
                         "rollout": torch_rollout}[part]()
      results[name] = res
      print(f"torch {text}: {res['ms']:.1f} ms", flush=True)
    except Exception as err:  # pylint: disable=broad-except
      name = f"{'rollout_flat' if part == 'rollout' else part}/torch"
      results[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
      print(f"{name}: FAILED {results[name]['error'][:500]}", flush=True)
    on_result(results)
    if device == "cuda":
      torch.cuda.empty_cache()
  return results


def _torch_sde_mean_std(torch, v, x, sigma, sigma_prev, sigma_max):
  """Flow-GRPO's SDE step (sde_step_with_logprob): mean [B, ...] and std_dev_t [B, 1, 1, 1]."""
  s = sigma.view(-1, 1, 1, 1).float()
  dt = sigma_prev.view(-1, 1, 1, 1).float() - s
  std = NOISE_LEVEL * torch.sqrt(s / (1 - torch.where(s == 1, sigma_max, s)))
  mean = x * (1 + std ** 2 / (2 * s) * dt) + v * (1 + std ** 2 * (1 - s) / (2 * s)) * dt
  return mean, std


def _torch_log_prob(torch, sample, mean, std, sigma, sigma_prev):
  dt = sigma_prev.view(-1, 1, 1, 1).float() - sigma.view(-1, 1, 1, 1).float()
  scale = std * torch.sqrt(-dt)
  lp = -((sample - mean) ** 2) / (2 * scale ** 2) - torch.log(scale) - 0.5 * math.log(2 * math.pi)
  return lp.mean(dim=(1, 2, 3))


def _torch_add_lora(torch, model):
  """peft-style LoRA (y = W x + b + alpha/r B A x, A Gaussian, B zero-ish) on the targets."""
  nn = torch.nn

  class LoRALinear(nn.Module):
    def __init__(self, base):
      super().__init__()
      self.base, self.enabled, self.scale = base, True, LORA_ALPHA / LORA_RANK
      # Trained adapters stay float32 (Flow-GRPO casts them up), cast to x's dtype in use.
      kw = dict(device=base.weight.device, dtype=torch.float32)
      self.lora_a = nn.Parameter(torch.randn(LORA_RANK, base.in_features, **kw) / LORA_RANK)
      self.lora_b = nn.Parameter(1e-3 * torch.randn(base.out_features, LORA_RANK, **kw))

    def forward(self, x):
      y = self.base(x)
      if self.enabled:
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
        y = y + self.scale * ((x @ a.t()) @ b.t())
      return y

  pattern = re.compile(TORCH_LORA_TARGETS)
  targets = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and pattern.search(name)]
  wrapped = []
  for name, module in targets:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    lora = LoRALinear(module)
    setattr(parent, child, lora) if not child.isdigit() else parent.__setitem__(int(child), lora)
    wrapped.append(lora)
  return wrapped


# ---- report --------------------------------------------------------------------------------------
def table(results: dict) -> str:
  """Rows: work | implementation | ms | torch ms | torch / ours (> 1: ours is faster)."""
  jx, th = results.get("jax", {}), results.get("torch", {})
  ms = lambda res: res.get("ms") if isinstance(res, dict) else None
  fmt = lambda res: f"{res['ms']:.1f}" if ms(res) else ("FAILED" if res else "-")
  header = results.get("header", {})
  lines = [f"device: {header.get('device', '?')}, model: {header.get('model', '?')}",
           f"{'work':<14}{'ours':<22}{'ours ms':>10}{'torch ms':>10}{'torch/ours':>11}"]
  for key, res in jx.items():
    if key.startswith("_"):
      continue
    work, impl = key.split("/", 1)
    ref = th.get(f"{work}/torch") or (th.get("rollout_flat/torch")
                                      if work.startswith("rollout") else None)
    ratio = f"{ms(ref) / ms(res):.2f}" if ms(ref) and ms(res) else "-"
    extra = f" (NFE {res['nfe']})" if "nfe" in res else ""
    lines.append(f"{work:<14}{impl + extra:<22}{fmt(res):>10}{fmt(ref):>10}{ratio:>11}")
  for key, res in th.items():
    work = key.split("/")[0]
    if not key.startswith("_") and not any(k.split("/")[0] == work for k in jx):
      lines.append(f"{work:<14}{'-':<22}{'-':>10}{fmt(res):>10}{'-':>11}")
  if "_skipped" in th:
    lines.append(f"torch baseline skipped: {th['_skipped']}")
  for source in (jx, th):
    for key, res in source.items():
      if isinstance(res, dict) and "error" in res:
        lines.append(f"{key} failed: {res['error'][:300]}")
  ref = th.get("rollout_flat/torch")
  for key, tree in jx.items():
    flat = jx.get(key.replace("rollout_tree/", "rollout_flat/"))
    if key.startswith("rollout_tree/") and ms(tree) and ms(ref) and flat and "nfe" in flat:
      goal = tree["nfe"] / flat["nfe"] / 1.5
      lines.append(f"tree rollout / torch flat loop ({key.split('/', 1)[1]}): "
                   f"{ms(tree) / ms(ref):.3f} (goal <= tree NFE / flat NFE / 1.5 = {goal:.3f})")
  return "\n".join(lines)


def device_name() -> str:
  try:
    d = jax.devices()[0]
    return f"{jax.default_backend()}: {d.device_kind} x{jax.device_count()}"
  except RuntimeError:
    return "unknown"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("sd35m", "flux"), default="sd35m")
  parser.add_argument("--tiny", action="store_true",
                      help="tiny architecture, float32, small batches: a CPU smoke run")
  parser.add_argument("--framework", choices=("jax", "torch", "both"), default="both")
  parser.add_argument("--attention", default=None,
                      help="comma list of implementations to time (default: xla,auto)")
  parser.add_argument("--parts", default="forward,train,rollout",
                      help="what to time, in this order")
  parser.add_argument("--compare-parts", default="forward,train,rollout",
                      help="parts timed with every --attention implementation (others: first)")
  parser.add_argument("--resolution", type=int, default=512)
  parser.add_argument("--text-tokens", type=int, default=None,
                      help="default 333 (SD3: 77 CLIP + 256 T5), 512 for FLUX")
  parser.add_argument("--batch", type=int, default=None, help="forward latents (default 16)")
  parser.add_argument("--train-batch", type=int, default=None,
                      help="transitions per train step (default 4; x2 rows with CFG)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--leaves", type=int, default=24)
  parser.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --tiny)")
  parser.add_argument("--remat", action="store_true", help="rematerialise blocks (backward)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--torch-threads", type=int, default=None,
                      help="torch CPU threads (default: 1 on CPU with --framework both)")
  parser.add_argument("--json", default=None, help="write the results here")
  parser.add_argument("--merge", nargs="+", default=None,
                      help="JSON files from earlier runs: print their combined table, run nothing")
  args = parser.parse_args(argv)

  if args.merge:
    merged: dict[str, Any] = {}
    for path in args.merge:
      with open(path) as f:
        data = json.load(f)
      for key, value in data.items():
        if isinstance(value, dict):
          merged.setdefault(key, {}).update(value)
        else:
          merged.setdefault(key, value)
    print(table(merged))
    if args.json:
      with open(args.json, "w") as f:
        json.dump(merged, f, indent=1)
    return merged

  tiny = args.tiny
  args.text_tokens = args.text_tokens or (12 if tiny else (512 if args.model == "flux" else 333))
  args.batch = args.batch or (4 if tiny else 16)
  args.train_batch = args.train_batch or (2 if tiny else 4)
  args.dtype = args.dtype or ("float32" if tiny else "bfloat16")
  attentions = (args.attention or "xla,auto").split(",")
  for a in attentions:
    attention_lib.check_implementation(a)
  parts = args.parts.split(",")
  bad = sorted(set(parts) - {"forward", "train", "rollout"})
  if bad:
    raise ValueError(f"--parts {bad} unknown; expected forward, train, rollout")
  work = make_work(args)
  header = {"device": device_name(), "host": platform.node(), "jax": jax.__version__,
            "model": args.model + (" (tiny)" if tiny else ""), "latent": list(work.latent),
            "text_tokens": work.text_tokens, "batch": work.batch,
            "train_batch": work.train_batch, "steps": work.steps, "leaves": work.leaves,
            "dtype": work.dtype, "remat": work.remat, "cfg": work.guidance_scale,
            "warmup": args.warmup, "repeats": args.repeats}
  print("bench/accelerator.py " + " ".join(f"{k}={v}" for k, v in header.items()), flush=True)
  results: dict[str, Any] = {"header": header}

  def save():
    if args.json:
      with open(args.json, "w") as f:
        json.dump(results, f, indent=1)

  if args.framework in ("jax", "both"):
    results["jax"] = {}

    def partial(rows):
      results["jax"] = rows
      save()
    results["jax"] = bench_jax(work, attentions, parts, args.warmup, args.repeats,
                               compare_parts=args.compare_parts.split(","), on_result=partial)
    save()
  if args.framework in ("torch", "both"):
    threads = args.torch_threads
    if threads is None and args.framework == "both" and jax.default_backend() == "cpu":
      threads = 1
    results["torch"] = {}

    def partial_torch(rows):
      results["torch"] = rows
      save()
    results["torch"] = bench_torch(work, parts, args.warmup, args.repeats, threads,
                                   on_result=partial_torch)
    save()
  print(table(results), flush=True)
  return results


if __name__ == "__main__":
  main()
