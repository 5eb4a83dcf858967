"""The SD3 / SD3.5 MMDiT transformer in Flax NNX, and its loader for diffusers checkpoints.

Matches diffusers' `SD3Transformer2DModel` (SD3-Medium: plain joint blocks; SD3.5-Medium:
`dual_attention_layers` add a second self-attention on the image stream, and `qk_norm='rms_norm'`
normalises queries and keys per head on both streams). Latents are NHWC here, diffusers' are NCHW.

State paths follow diffusers' module names so that checkpoints map one to one and LoRA regexes
read the same, with three renames: `attn.to_out.0` is `attn.to_out` (no dropout slot),
`ff.net.0.proj` / `ff.net.2` are `ff.proj_in` / `ff.proj_out`, and a torch `weight` is a flax
`kernel` (Linear, Conv) or `scale` (RMS norm). Example paths:

  pos_embed.proj.kernel                                  [p, p, c, D]
  time_text_embed.timestep_embedder.linear_1.kernel      [256, D]
  transformer_blocks.0.attn.to_q.kernel                  [D, D]
  transformer_blocks.0.attn2.to_out.kernel               [D, D]     (dual-attention blocks only)
  transformer_blocks.0.attn.norm_added_q.scale           [head_dim] (qk_norm='rms_norm' only)
  transformer_blocks.0.ff.proj_in.kernel                 [D, 4D]

The 2D sin-cos position table is not a parameter: diffusers stores it (as the persistent buffer
`pos_embed.pos_embed`, [1, M*M, D] for M = pos_embed_max_size), but it is a fixed function of the
config, so it is recomputed in numpy for each latent size (cached) and enters jitted code as a
constant; the loader checks sampled rows of the stored buffer against it instead of loading it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax.models import attention as attention_lib
from mgrpo_jax.models import weights

# Logical axes of activations: batch split over the data axes, heads / MLP over 'tensor', the
# model width replicated (FSDP gathers weights, not activations).
_TOKENS = ("batch", None, None)
_HEADS = ("batch", None, "heads", None)
_MLP = ("batch", None, "mlp")

# Diffusers' `Timesteps(num_channels=256)` inside CombinedTimestepTextProjEmbeddings.
TIME_PROJ_DIM = 256
# Every norm in the SD3 transformer (adaLN, final norm, qk RMS norm) uses this epsilon.
NORM_EPS = 1e-6
# diffusers' SD3 pipelines pass timesteps = sigma * 1000.
TIMESTEP_SCALE = 1000.0

_ARCH_FIELDS = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
                "pooled_projection_dim", "out_channels", "pos_embed_max_size",
                "dual_attention_layers", "qk_norm")
_QK_NORMS = (None, "rms_norm")


@dataclasses.dataclass(frozen=True)
class SD3TransformerConfig:
  """Architecture (from diffusers' config.json) plus how to run it.

  Attributes:
    sample_size: latent height/width the model was trained at; sets the position-table scale.
    patch_size: side of the square patches (conv stride).
    in_channels: latent channels in.
    num_layers: number of joint transformer blocks; the last one is `context_pre_only`.
    attention_head_dim: channels per head.
    num_attention_heads: heads; inner width D = heads * head_dim.
    joint_attention_dim: width of the text encoder states fed to `context_embedder`.
    caption_projection_dim: width after `context_embedder`; must equal D.
    pooled_projection_dim: width of the pooled text embedding.
    out_channels: latent channels out.
    pos_embed_max_size: side M of the stored position grid (latent patches); inputs are centre
      crops of it.
    dual_attention_layers: block indices with the extra image self-attention (SD3.5).
    qk_norm: None or 'rms_norm' (per-head RMS norm of queries and keys on both streams).
    dtype: compute dtype of matmuls and activations; norms and softmax statistics stay float32.
    param_dtype: dtype parameters are created (and loaded) in.
    remat: rematerialise each block in the backward pass (nnx.remat) to save activation memory.
    scan_layers: run each stretch of consecutive blocks with the same structure (all blocks but
      the last, split where dual attention starts or stops) as one `jax.lax.scan` over their
      stacked states. The same function and parameters as the loop; the stacking copies the
      stretch's weights once per call, so it is meant for small models. Why: XLA's CPU compiler
      fuses the residual stream's cotangent chain across all blocks of an unrolled loop into
      every consumer (recomputing it): the tiny renderer's training step is ~1.7x faster as a
      scan, which keeps one block per loop body (`bench/pretrain_step.py` measures it).
    attention: attention kernel, one of `attention.IMPLEMENTATIONS` ("auto" picks cuDNN on
      NVIDIA GPUs, splash on TPU, XLA elsewhere; see models/attention.py).
  """

  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  num_layers: int = 18
  attention_head_dim: int = 64
  num_attention_heads: int = 18
  joint_attention_dim: int = 4096
  caption_projection_dim: int = 1152
  pooled_projection_dim: int = 2048
  out_channels: int = 16
  pos_embed_max_size: int = 96
  dual_attention_layers: tuple[int, ...] = ()
  qk_norm: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  scan_layers: bool = False
  attention: str = "auto"

  def __post_init__(self):
    attention_lib.check_implementation(self.attention)
    # Normalised so configs compare and hash by value (they are static jit arguments).
    object.__setattr__(self, "dual_attention_layers",
                       tuple(int(i) for i in self.dual_attention_layers))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
    for name in ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                 "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
                 "pooled_projection_dim", "out_channels", "pos_embed_max_size"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"SD3 transformer config: {name}={value!r}, expected a positive int")
    if self.sample_size < self.patch_size:
      raise ValueError(f"SD3 transformer config: sample_size={self.sample_size} is smaller than "
                       f"patch_size={self.patch_size}")
    if self.qk_norm not in _QK_NORMS:
      raise ValueError(f"SD3 transformer config: qk_norm={self.qk_norm!r} is not supported "
                       f"(supported: {_QK_NORMS})")
    bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
    if bad:
      raise ValueError(f"SD3 transformer config: dual_attention_layers {bad} are outside "
                       f"[0, num_layers={self.num_layers})")
    if self.caption_projection_dim != self.inner_dim:
      raise ValueError(
          f"SD3 transformer config: caption_projection_dim={self.caption_projection_dim} must "
          f"equal num_attention_heads * attention_head_dim = {self.inner_dim} (both streams "
          "share the joint attention width)")
    if self.inner_dim % 4:
      raise ValueError(f"SD3 transformer config: inner width {self.inner_dim} must be divisible "
                       "by 4 for the 2D sin-cos position table")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def latent_channels(self) -> int:
    """Channels of one NHWC latent (as `FluxTransformerConfig.latent_channels`)."""
    return self.in_channels

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> SD3TransformerConfig:
    """From a diffusers `transformer/config.json` dict; `overrides` set dtype/param_dtype/remat/
    scan_layers/attention. Unknown architecture keys are refused
    (`weights.diffusers_arch_kwargs`).

    Raises:
      ValueError: naming the unknown key, the wrong class or the unsupported value.
    """
    kwargs = transformer_arch_kwargs(cls, config, "SD3Transformer2DModel", _ARCH_FIELDS,
                                     "SD3 transformer")
    if kwargs.get("pos_embed_max_size", 96) is None:
      raise ValueError("SD3 transformer config: pos_embed_max_size=None (an uncropped position "
                       "table) is not supported; expected an int")
    if "dual_attention_layers" in kwargs:
      kwargs["dual_attention_layers"] = tuple(kwargs["dual_attention_layers"])
    return cls(**kwargs, **overrides)


def transformer_arch_kwargs(cls, config: Mapping[str, Any], class_name: str,
                            fields: tuple[str, ...], what: str) -> dict[str, Any]:
  """`weights.diffusers_arch_kwargs` of a transformer config `cls` (SD3's or FLUX's), where, as
  in diffusers, a missing or None `out_channels` means `in_channels`."""
  kwargs = weights.diffusers_arch_kwargs(config, class_name, fields, what)
  if kwargs.get("out_channels") is None:
    kwargs["out_channels"] = kwargs.get("in_channels", cls.in_channels)
  return kwargs


# ---- fixed embeddings (no parameters) ------------------------------------------------------------
def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """[n] positions -> [n, dim] float64 as [sin(pos w), cos(pos w)], w = 10000^(-k / (dim/2))."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _pos_rows(dim: int, rows: np.ndarray, cols: np.ndarray, max_size: int,
              base_size: int) -> np.ndarray:
  """Rows of diffusers' 2D table for grid cells (rows[i], cols[i]): [n] -> [n, dim] float32.

  Grid coordinates are index / (max_size / base_size), formed in float32 as diffusers does; the
  first half of the channels encodes the column (width) coordinate and the second the row.
  """
  step = np.float32(max_size / base_size)
  h = rows.astype(np.float32) / step
  w = cols.astype(np.float32) / step
  return np.concatenate([_sincos_1d(dim // 2, w), _sincos_1d(dim // 2, h)],
                        axis=1).astype(np.float32)


@functools.lru_cache(maxsize=16)
def cropped_pos_embed(dim: int, grid_h: int, grid_w: int, max_size: int,
                      base_size: int) -> np.ndarray:
  """The centre crop of the max_size x max_size position table that a grid_h x grid_w patch grid
  sees, flattened row-major: [grid_h * grid_w, dim] float32 (read-only, cached).

  Raises:
    ValueError: if the patch grid is larger than the table.
  """
  if grid_h > max_size or grid_w > max_size:
    raise ValueError(f"patch grid {grid_h}x{grid_w} exceeds pos_embed_max_size={max_size}")
  top, left = (max_size - grid_h) // 2, (max_size - grid_w) // 2
  rows, cols = np.meshgrid(np.arange(top, top + grid_h), np.arange(left, left + grid_w),
                           indexing="ij")
  table = _pos_rows(dim, rows.reshape(-1), cols.reshape(-1), max_size, base_size)
  table.setflags(write=False)
  return table


def timestep_embedding(timesteps: jax.Array, dim: int = TIME_PROJ_DIM) -> jax.Array:
  """Sinusoidal embedding as diffusers' Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0).

  Args:
    timesteps: [B] float, diffusers' scale (sigma * 1000).
    dim: even embedding width.

  Returns:
    [B, dim] float32, [cos(t f), sin(t f)] with f_k = 10000^(-k / (dim/2)).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _layer_norm(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """LayerNorm without affine parameters, statistics in float32; returns float32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


# ---- layers -------------------------------------------------------------------------------------
def _linear(cfg: SD3TransformerConfig, in_features: int, out_features: int,
            axes: tuple[str | None, str | None], rngs: nnx.Rngs) -> nnx.Linear:
  """A biased Linear whose kernel [in, out] carries logical axes `axes`; the bias follows `out`."""
  return nnx.Linear(
      in_features, out_features, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)), rngs=rngs)


def check_conditioning(cfg: Any, batch: int, sigma: jax.Array, encoder_hidden_states: jax.Array,
                       pooled_projections: jax.Array) -> None:
  """Raises ValueError (at trace time) unless the inputs beside the latents fit `cfg` (an SD3 or
  FLUX transformer config): sigma [B], encoder_hidden_states [B, L, joint_attention_dim],
  pooled_projections [B, pooled_projection_dim], with B = `batch`."""
  if sigma.shape != (batch,):
    raise ValueError(f"sigma shape {sigma.shape}, expected ({batch},)")
  if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch or \
      encoder_hidden_states.shape[2] != cfg.joint_attention_dim:
    raise ValueError(f"encoder_hidden_states shape {encoder_hidden_states.shape}, expected "
                     f"[{batch}, L, {cfg.joint_attention_dim}]")
  if pooled_projections.shape != (batch, cfg.pooled_projection_dim):
    raise ValueError(f"pooled_projections shape {pooled_projections.shape}, expected "
                     f"({batch}, {cfg.pooled_projection_dim})")


class RMSNorm(nnx.Module):
  """RMS norm over the last axis with a learned scale (diffusers RMSNorm, elementwise_affine)."""

  def __init__(self, dim: int, cfg: SD3TransformerConfig):
    self.scale = nnx.Param(jnp.ones((dim,), cfg.param_dtype))
    self.dtype = cfg.dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + NORM_EPS)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Modulation(nnx.Module):
  """`linear(silu(temb))` split into `num` chunks of width D (adaLN shift/scale/gate vectors)."""

  def __init__(self, cfg: SD3TransformerConfig, num: int, rngs: nnx.Rngs):
    self.linear = _linear(cfg, cfg.inner_dim, num * cfg.inner_dim, ("embed", "mlp"), rngs)
    self.num = num

  def __call__(self, temb: jax.Array) -> list[jax.Array]:
    out = self.linear(jax.nn.silu(temb))
    return [c[:, None, :].astype(jnp.float32) for c in jnp.split(out, self.num, axis=-1)]


class FeedForward(nnx.Module):
  """D -> 4D -> D with tanh-approximated GELU (diffusers 'gelu-approximate')."""

  def __init__(self, cfg: SD3TransformerConfig, rngs: nnx.Rngs):
    dim = cfg.inner_dim
    self.proj_in = _linear(cfg, dim, 4 * dim, ("embed", "mlp"), rngs)
    self.proj_out = _linear(cfg, 4 * dim, dim, ("mlp", "embed"), rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = sharding_lib.constrain(jax.nn.gelu(self.proj_in(x), approximate=True), _MLP)
    return self.proj_out(hidden)


class Attention(nnx.Module):
  """Multi-head attention over the image stream, optionally joint with a context stream.

  With `joint=True` the context stream gets its own projections (`add_*_proj`), both streams'
  tokens attend together, and the context output goes through `to_add_out` unless
  `context_pre_only` (the last block, whose context output is discarded).
  """

  def __init__(self, cfg: SD3TransformerConfig, joint: bool, context_pre_only: bool,
               rngs: nnx.Rngs):
    dim = cfg.inner_dim
    self.heads = cfg.num_attention_heads
    self.head_dim = cfg.attention_head_dim
    self.joint = joint
    self.context_pre_only = context_pre_only
    self.attention = cfg.attention
    self.to_q = _linear(cfg, dim, dim, ("embed", "heads"), rngs)
    self.to_k = _linear(cfg, dim, dim, ("embed", "heads"), rngs)
    self.to_v = _linear(cfg, dim, dim, ("embed", "heads"), rngs)
    self.to_out = _linear(cfg, dim, dim, ("heads", "embed"), rngs)
    use_norm = cfg.qk_norm == "rms_norm"
    self.norm_q = RMSNorm(self.head_dim, cfg) if use_norm else None
    self.norm_k = RMSNorm(self.head_dim, cfg) if use_norm else None
    if joint:
      self.add_q_proj = _linear(cfg, dim, dim, ("embed", "heads"), rngs)
      self.add_k_proj = _linear(cfg, dim, dim, ("embed", "heads"), rngs)
      self.add_v_proj = _linear(cfg, dim, dim, ("embed", "heads"), rngs)
      self.to_add_out = (None if context_pre_only else
                         _linear(cfg, dim, dim, ("heads", "embed"), rngs))
      self.norm_added_q = RMSNorm(self.head_dim, cfg) if use_norm else None
      self.norm_added_k = RMSNorm(self.head_dim, cfg) if use_norm else None

  def _qkv(self, x, proj_q, proj_k, proj_v, norm_q, norm_k):
    split = lambda t: t.reshape(t.shape[:-1] + (self.heads, self.head_dim))
    q, k, v = (sharding_lib.constrain(split(p(x)), _HEADS) for p in (proj_q, proj_k, proj_v))
    if norm_q is not None:
      q, k = norm_q(q), norm_k(k)
    return q, k, v

  def __call__(self, x: jax.Array, context: jax.Array | None = None):
    """Args: x [B, N, D], context [B, L, D] (joint only). Returns out_x or (out_x, out_context)."""
    q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
    num_image = x.shape[1]
    if self.joint:
      cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                             self.norm_added_q, self.norm_added_k)
      q, k, v = (jnp.concatenate(p, axis=1) for p in ((q, cq), (k, ck), (v, cv)))
    # [B, T, heads, head_dim], scale head_dim^-1/2
    out = attention_lib.dot_product_attention(q, k, v, implementation=self.attention)
    out = out.reshape(out.shape[:2] + (-1,))
    image_out = self.to_out(out[:, :num_image])
    if not self.joint:
      return image_out
    context_out = None if self.context_pre_only else self.to_add_out(out[:, num_image:])
    return image_out, context_out


class ContinuousNorm(nnx.Module):
  """diffusers AdaLayerNormContinuous (no affine): LN(x) * (1 + scale) + shift, from temb."""

  def __init__(self, cfg: SD3TransformerConfig, rngs: nnx.Rngs):
    self.linear = _linear(cfg, cfg.inner_dim, 2 * cfg.inner_dim, ("embed", "mlp"), rngs)

  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    emb = self.linear(jax.nn.silu(temb)).astype(jnp.float32)
    scale, shift = jnp.split(emb[:, None, :], 2, axis=-1)  # diffusers' order: scale first
    return _layer_norm(x) * (1 + scale) + shift


class JointBlock(nnx.Module):
  """One MMDiT block (diffusers JointTransformerBlock) with adaLN-Zero modulation."""

  def __init__(self, cfg: SD3TransformerConfig, index: int, rngs: nnx.Rngs):
    self.dual = index in cfg.dual_attention_layers
    self.context_pre_only = index == cfg.num_layers - 1
    self.dtype = cfg.dtype
    # Image stream: 6 vectors, or 9 when the second attention has its own shift/scale/gate.
    self.norm1 = Modulation(cfg, 9 if self.dual else 6, rngs)
    self.norm1_context = (ContinuousNorm(cfg, rngs) if self.context_pre_only else
                          Modulation(cfg, 6, rngs))
    self.attn = Attention(cfg, joint=True, context_pre_only=self.context_pre_only, rngs=rngs)
    self.attn2 = Attention(cfg, joint=False, context_pre_only=False, rngs=rngs) \
        if self.dual else None
    self.ff = FeedForward(cfg, rngs)
    self.ff_context = None if self.context_pre_only else FeedForward(cfg, rngs)

  def __call__(self, x: jax.Array, context: jax.Array, temb: jax.Array):
    """x [B, N, D], context [B, L, D], temb [B, D] -> (x, context or None for the last block).

    The residual streams are kept in float32 regardless of the compute dtype.
    """
    mods = self.norm1(temb)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
    normed = _layer_norm(x)
    attn_in = (normed * (1 + scale_msa) + shift_msa).astype(self.dtype)
    if self.context_pre_only:
      context_in = self.norm1_context(context, temb).astype(self.dtype)
    else:
      c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = \
          self.norm1_context(temb)
      context_in = (_layer_norm(context) * (1 + c_scale_msa) + c_shift_msa).astype(self.dtype)

    attn_out, context_attn_out = self.attn(attn_in, context_in)
    x = x + gate_msa * attn_out.astype(jnp.float32)
    if self.dual:
      # The second attention reads the same normalised input as the first, modulated by its own
      # shift/scale (SD35AdaLayerNormZeroX), not the updated stream.
      shift_msa2, scale_msa2, gate_msa2 = mods[6:]
      attn2_in = (normed * (1 + scale_msa2) + shift_msa2).astype(self.dtype)
      x = x + gate_msa2 * self.attn2(attn2_in).astype(jnp.float32)
    ff_in = (_layer_norm(x) * (1 + scale_mlp) + shift_mlp).astype(self.dtype)
    x = x + gate_mlp * self.ff(ff_in).astype(jnp.float32)

    if self.context_pre_only:
      return x, None
    context = context + c_gate_msa * context_attn_out.astype(jnp.float32)
    ff_in = (_layer_norm(context) * (1 + c_scale_mlp) + c_shift_mlp).astype(self.dtype)
    context = context + c_gate_mlp * self.ff_context(ff_in).astype(jnp.float32)
    return x, context


class PatchEmbed(nnx.Module):
  """Non-overlapping p x p patches -> D channels (conv with stride p)."""

  def __init__(self, cfg: SD3TransformerConfig, rngs: nnx.Rngs):
    p = cfg.patch_size
    self.proj = nnx.Conv(
        cfg.in_channels, cfg.inner_dim, kernel_size=(p, p), strides=(p, p), padding="VALID",
        dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                          (None, None, None, "embed")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(x)


class TimestepEmbedder(nnx.Module):
  """linear_2(silu(linear_1(x))): diffusers TimestepEmbedding and PixArtAlphaTextProjection."""

  def __init__(self, cfg: SD3TransformerConfig, in_features: int, rngs: nnx.Rngs):
    self.linear_1 = _linear(cfg, in_features, cfg.inner_dim, (None, "embed"), rngs)
    self.linear_2 = _linear(cfg, cfg.inner_dim, cfg.inner_dim, ("embed", None), rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TimeTextEmbed(nnx.Module):
  """temb = MLP(sinusoid(t)) + MLP(pooled text), [B, D]."""

  def __init__(self, cfg: SD3TransformerConfig, rngs: nnx.Rngs):
    self.timestep_embedder = TimestepEmbedder(cfg, TIME_PROJ_DIM, rngs)
    self.text_embedder = TimestepEmbedder(cfg, cfg.pooled_projection_dim, rngs)
    self.dtype = cfg.dtype

  def __call__(self, timesteps: jax.Array, pooled: jax.Array) -> jax.Array:
    t = self.timestep_embedder(timestep_embedding(timesteps).astype(self.dtype))
    return (t.astype(jnp.float32) +
            self.text_embedder(pooled.astype(self.dtype)).astype(jnp.float32))


def _run_block(cfg: SD3TransformerConfig, graphdef, state, x, context, temb):
  """One block as a pure function of its state: (x [B, N, D], context [B, L, D]) -> same."""
  run = lambda st, *a: nnx.merge(graphdef, st)(*a)
  if cfg.remat:
    # Under jax.checkpoint only the block inputs are saved for the backward pass. (nnx.remat
    # would try to write the block's variables back, which fails when this module was merged
    # inside an outer jax transform.)
    run = jax.checkpoint(run)
  return _constrain_streams(*run(state, x, context, temb))


def _constrain_streams(x, context):
  x = sharding_lib.constrain(x, _TOKENS)
  if context is not None:
    context = sharding_lib.constrain(context, _TOKENS)
  return x, context


def _stretches(blocks) -> list:
  """[(graphdef, [state, ...])]: consecutive blocks with equal graphdefs (the same structure)
  share one entry, in block order."""
  out = []
  for block in blocks:
    graphdef, state = nnx.split(block)
    if out and out[-1][0] == graphdef:
      out[-1][1].append(state)
    else:
      out.append((graphdef, [state]))
  return out


class SD3Transformer(nnx.Module):
  """The SD3 / SD3.5 MMDiT velocity network on NHWC latents."""

  def __init__(self, config: SD3TransformerConfig, *, rngs: nnx.Rngs):
    cfg = config
    self.config = cfg
    self.pos_embed = PatchEmbed(cfg, rngs)
    self.time_text_embed = TimeTextEmbed(cfg, rngs)
    self.context_embedder = _linear(cfg, cfg.joint_attention_dim, cfg.caption_projection_dim,
                                    (None, "embed"), rngs)
    self.transformer_blocks = nnx.List([JointBlock(cfg, i, rngs) for i in range(cfg.num_layers)])
    self.norm_out = ContinuousNorm(cfg, rngs)
    self.proj_out = _linear(cfg, cfg.inner_dim, cfg.patch_size ** 2 * cfg.out_channels,
                            ("embed", None), rngs)

  def __call__(self, latents: jax.Array, sigma: jax.Array, encoder_hidden_states: jax.Array,
               pooled_projections: jax.Array) -> jax.Array:
    """Predicts the flow-matching velocity.

    Args:
      latents: [B, h, w, in_channels] float (NHWC); h and w divisible by patch_size and at most
        pos_embed_max_size * patch_size.
      sigma: [B] float noise level in [0, 1]; diffusers' timestep is sigma * 1000.
      encoder_hidden_states: [B, L, joint_attention_dim] float text encoder states.
      pooled_projections: [B, pooled_projection_dim] float pooled text embedding.

    Returns:
      [B, h, w, out_channels] float32.

    Raises:
      ValueError: (at trace time) on shapes that do not fit the config.
    """
    cfg = self.config
    p = cfg.patch_size
    b, h, w, c = latents.shape
    if c != cfg.in_channels or h % p or w % p:
      raise ValueError(f"latents shape {latents.shape}: expected [B, h, w, {cfg.in_channels}] "
                       f"with h and w divisible by patch_size={p}")
    check_conditioning(cfg, b, sigma, encoder_hidden_states, pooled_projections)
    gh, gw = h // p, w // p
    pos = cropped_pos_embed(cfg.inner_dim, gh, gw, cfg.pos_embed_max_size,
                            cfg.sample_size // p)
    x = self.pos_embed(latents.astype(cfg.dtype)).reshape(b, gh * gw, cfg.inner_dim)
    x = x.astype(jnp.float32) + pos[None]
    temb = self.time_text_embed(sigma * TIMESTEP_SCALE, pooled_projections)
    context = self.context_embedder(encoder_hidden_states.astype(cfg.dtype)).astype(jnp.float32)
    x, context = sharding_lib.constrain(x, _TOKENS), sharding_lib.constrain(context, _TOKENS)

    if cfg.scan_layers:
      for graphdef, states in _stretches(list(self.transformer_blocks)):
        if len(states) == 1:
          x, context = _run_block(cfg, graphdef, states[0], x, context, temb)
          continue
        # A stretch of identical blocks: one scan over their stacked states.
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
        step = lambda carry, st, g=graphdef: (_run_block(cfg, g, st, *carry, temb), None)
        (x, context), _ = jax.lax.scan(step, (x, context), stacked)
    else:
      for block in self.transformer_blocks:
        if cfg.remat:
          x, context = _run_block(cfg, *nnx.split(block), x, context, temb)
        else:
          x, context = _constrain_streams(*block(x, context, temb))

    x = self.norm_out(x, temb).astype(cfg.dtype)
    x = self.proj_out(x).astype(jnp.float32)  # [B, gh * gw, p * p * out]
    x = x.reshape(b, gh, gw, p, p, cfg.out_channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, cfg.out_channels)


# ---- loading diffusers checkpoints ------------------------------------------------------------
_RENAMES = (
    (re.compile(r"\.to_out\.(kernel|bias)$"), r".to_out.0.\1"),
    (re.compile(r"\.(ff|ff_context)\.proj_in\."), r".\1.net.0.proj."),
    (re.compile(r"\.(ff|ff_context)\.proj_out\."), r".\1.net.2."),
)
POS_EMBED_BUFFER = "pos_embed.pos_embed"


def checkpoint_name(path: str) -> tuple[str, weights.Transform | None]:
  """Dotted state path -> (diffusers tensor name, transform to our layout).

  e.g. 'transformer_blocks.3.attn.to_out.kernel' -> ('transformer_blocks.3.attn.to_out.0.weight',
  linear_kernel); 'pos_embed.proj.kernel' -> ('pos_embed.proj.weight', conv_kernel).
  """
  transform = weights.conv_kernel if path == "pos_embed.proj.kernel" else weights.linear_kernel
  return weights.torch_name(path, transform, _RENAMES)


def check_pos_embed_buffer(checkpoint: weights.Checkpoint, config: SD3TransformerConfig,
                           num_rows: int = 64) -> None:
  """Compares sampled rows of the stored `pos_embed.pos_embed` with the recomputed table.

  The full buffer is M*M x D (226M values for SD3.5-Medium), so only `num_rows` rows spread over
  the grid (always including the first and last) are read; a checkpoint made with a different
  grid scale or layout differs in almost every row.

  Raises:
    CheckpointError: on a shape mismatch or values beyond the stored dtype's rounding.
  """
  if POS_EMBED_BUFFER not in checkpoint:
    return
  m, dim = config.pos_embed_max_size, config.inner_dim
  shape, dtype = checkpoint.info(POS_EMBED_BUFFER)
  if tuple(shape) != (1, m * m, dim):
    raise weights.CheckpointError(
        f"shape: {POS_EMBED_BUFFER} is {tuple(shape)}, the config implies (1, {m * m}, {dim})")
  rows = np.unique(np.linspace(0, m * m - 1, num_rows).round().astype(np.int64))
  stored = np.asarray(checkpoint.get(POS_EMBED_BUFFER)[0, rows]).astype(np.float32)
  expected = _pos_rows(dim, rows // m, rows % m, m, config.sample_size // config.patch_size)
  if dtype.kind != "f" and dtype != np.dtype(ml_dtypes.bfloat16):
    raise weights.CheckpointError(f"{POS_EMBED_BUFFER} has dtype {dtype}, expected a float")
  # Values lie in [-1, 1]: allow the stored dtype's rounding plus float32 sin/cos noise.
  tol = float(ml_dtypes.finfo(dtype).eps) + 1e-5
  err = float(np.max(np.abs(stored - expected)))
  if err > tol:
    raise weights.CheckpointError(
        f"{POS_EMBED_BUFFER} differs from the sin-cos table implied by the config (max abs "
        f"error {err:.3g} > {tol:.3g}); check sample_size / patch_size / pos_embed_max_size")


def load_sd3_transformer(directory: str, abstract_state: nnx.State, mesh=None,
                         rules=None) -> nnx.State:
  """Reads a diffusers SD3 transformer checkpoint into an NNX state of `SD3Transformer`.

  Args:
    directory: the `transformer/` directory (config.json plus one or more *.safetensors).
    abstract_state: the module's state (e.g. `nnx.state(nnx.eval_shape(make))`) whose leaves
      are jax.ShapeDtypeStruct or jax.Array; each leaf's shape and dtype are the target, and its
      `.sharding` (if any) the placement.
    mesh: if given, shardings come instead from the leaves' logical axis names mapped by
      `rules` (default `mgrpo_jax.sharding.LOGICAL_RULES`).
    rules: logical-to-mesh rules, with `mesh`.

  Returns:
    An nnx.State with the same structure, leaves loaded (cast to the target dtype) and placed.

  Raises:
    CheckpointError: missing / unexpected / wrongly shaped tensors (all named), or a stored
      position table that disagrees with the config.
    ValueError: an unsupported config.json.
  """
  config = SD3TransformerConfig.from_diffusers_config(weights.read_config(directory))
  checkpoint = weights.Checkpoint(directory)
  check_pos_embed_buffer(checkpoint, config)
  return weights.load_state(checkpoint, abstract_state, checkpoint_name, component="transformer",
                            mesh=mesh, rules=rules, ignore_unexpected=(POS_EMBED_BUFFER,))


def from_pretrained(directory: str, mesh=None, rules=None, **overrides) -> SD3Transformer:
  """Builds an `SD3Transformer` from a diffusers `transformer/` directory (config + weights).

  Parameters are never materialised randomly: the module is built abstractly and its state
  filled from the checkpoint (sharded over `mesh` by logical axis names when given).

  Args:
    directory: the component directory.
    mesh, rules: as in `load_sd3_transformer`.
    **overrides: dtype / param_dtype / remat for the config.
  """
  config = SD3TransformerConfig.from_diffusers_config(weights.read_config(directory), **overrides)
  abstract = nnx.eval_shape(lambda: SD3Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  return nnx.merge(graphdef, load_sd3_transformer(directory, state, mesh=mesh, rules=rules))
