"""The FLUX.1 transformer in Flax NNX, and its loader for diffusers checkpoints.

Matches diffusers' `FluxTransformer2DModel` (FLUX.1-dev / -schnell): `num_layers` double-stream
blocks (text and image tokens with their own weights, attending jointly) followed by
`num_single_layers` single-stream blocks over the concatenated [text; image] sequence, with
rotary position embeddings over three id axes (text tokens all at id 0; image tokens at
(0, row, col) of the 2 x 2-packed latent grid), per-head RMS qk-norm, adaLN-Zero modulation from
timestep + pooled CLIP text (+ the distilled guidance scale for FLUX.1-dev), and a final
continuous adaLN. Latents are NHWC here and packed inside `__call__`; diffusers' pipeline packs
them outside into [B, h/2 * w/2, 4 C] with channel order (c, dy, dx), which is what the weights of
`x_embedder` / `proj_out` expect.

The layers shared with SD3 (linear with logical axes, RMS norm, adaLN modulation, GELU MLP,
continuous norm, timestep MLPs) come from `sd3_transformer`; `FluxTransformerConfig` exposes the
fields they read (`inner_dim`, `dtype`, `param_dtype`, heads). State paths follow diffusers'
module names with the renames of `sd3_transformer` (`to_out.0` -> `to_out`, `ff.net.0.proj` /
`ff.net.2` -> `ff.proj_in` / `ff.proj_out`), e.g.

  x_embedder.kernel                                        [4 C, D]
  time_text_embed.guidance_embedder.linear_1.kernel        [256, D]   (guidance_embeds only)
  transformer_blocks.0.attn.add_q_proj.kernel              [D, D]
  single_transformer_blocks.0.proj_out.kernel              [D + 4 D, D]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax.models import attention as attention_lib
from mgrpo_jax.models import sd3_transformer as sd3t
from mgrpo_jax.models import weights

_TOKENS = ("batch", None, None)
_HEADS = ("batch", None, "heads", None)
_MLP = ("batch", None, "mlp")

_ARCH_FIELDS = ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
                "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")
# diffusers' FluxPosEmbed(theta=10000, ...) is fixed in the model class, not the config.
ROPE_THETA = 10000.0
# Image tokens are 2 x 2 patches of the latent (FluxPipeline._pack_latents).
PACK = 2


@dataclasses.dataclass(frozen=True)
class FluxTransformerConfig:
  """Architecture (from diffusers' config.json) plus how to run it.

  Attributes:
    patch_size: must be 1 (the 2 x 2 packing happens outside the model in diffusers).
    in_channels: width of a packed token, 4 x latent channels (64 for FLUX.1's 16).
    out_channels: packed output width (None in the config means in_channels).
    num_layers: double-stream blocks.
    num_single_layers: single-stream blocks.
    attention_head_dim, num_attention_heads: inner width D = heads * head_dim.
    joint_attention_dim: width of the T5 states fed to `context_embedder`.
    pooled_projection_dim: width of the pooled CLIP embedding.
    guidance_embeds: FLUX.1-dev's embedded guidance scale (False for schnell).
    axes_dims_rope: rotary widths of the three id axes; they sum to head_dim.
    dtype, param_dtype, remat, attention: as in `SD3TransformerConfig`.
  """

  patch_size: int = 1
  in_channels: int = 64
  out_channels: int = 64
  num_layers: int = 19
  num_single_layers: int = 38
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 768
  guidance_embeds: bool = False
  axes_dims_rope: tuple[int, ...] = (16, 56, 56)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  attention: str = "auto"
  # Read by the shared SD3 layers: FLUX always normalises queries and keys.
  qk_norm: str = "rms_norm"

  def __post_init__(self):
    attention_lib.check_implementation(self.attention)
    object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
    for name in ("in_channels", "out_channels", "num_layers", "attention_head_dim",
                 "num_attention_heads", "joint_attention_dim", "pooled_projection_dim"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"FLUX transformer config: {name}={value!r}, expected a positive int")
    if self.num_single_layers < 0:
      raise ValueError(f"FLUX transformer config: num_single_layers={self.num_single_layers} < 0")
    if self.patch_size != 1:
      raise ValueError(f"FLUX transformer config: patch_size={self.patch_size} is not supported "
                       "(FLUX packs 2 x 2 latent patches outside the model; expected 1)")
    if self.in_channels % (PACK * PACK) or self.out_channels % (PACK * PACK):
      raise ValueError(f"FLUX transformer config: in/out_channels {self.in_channels}/"
                       f"{self.out_channels} must be 4 x the latent channels")
    if len(self.axes_dims_rope) != 3 or sum(self.axes_dims_rope) != self.attention_head_dim or \
        any(a % 2 for a in self.axes_dims_rope):
      raise ValueError(f"FLUX transformer config: axes_dims_rope={self.axes_dims_rope} must be "
                       f"three even widths summing to attention_head_dim={self.attention_head_dim}")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def latent_channels(self) -> int:
    return self.in_channels // (PACK * PACK)

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> FluxTransformerConfig:
    """From a diffusers `transformer/config.json` dict; unknown architecture keys are refused.

    Raises:
      ValueError: naming the unknown key, the wrong class or the unsupported value.
    """
    kwargs = sd3t.transformer_arch_kwargs(cls, config, "FluxTransformer2DModel", _ARCH_FIELDS,
                                          "FLUX transformer")
    return cls(**kwargs, **overrides)


# ---- rotary embedding (fixed, no parameters) ------------------------------------------------------
def image_ids(grid_h: int, grid_w: int) -> np.ndarray:
  """[grid_h * grid_w, 3] ids (0, row, col) of the packed tokens, row-major like FluxPipeline."""
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  return np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3).astype(np.float64)


@functools.lru_cache(maxsize=16)
def rope_tables(axes_dims: tuple[int, ...], text_len: int, grid_h: int,
                grid_w: int) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin tables [text_len + grid_h * grid_w, head_dim] float32 for [text; image] tokens.

  Per id axis with width d: angles pos * theta^(-2k/d) for k < d/2, each repeated twice
  (interleaved pairs), computed in float64 as diffusers does, then rounded to float32.
  """
  ids = np.concatenate([np.zeros((text_len, 3)), image_ids(grid_h, grid_w)], axis=0)
  cos, sin = [], []
  for axis, dim in enumerate(axes_dims):
    freqs = 1.0 / ROPE_THETA ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.repeat(np.outer(ids[:, axis], freqs), 2, axis=1)
    cos.append(np.cos(angles))
    sin.append(np.sin(angles))
  out = (np.concatenate(cos, -1).astype(np.float32), np.concatenate(sin, -1).astype(np.float32))
  for t in out:
    t.setflags(write=False)
  return out


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved channel pairs: x [B, T, H, d], cos/sin [T, d]; float32 math, x's dtype."""
  pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  out = x.astype(jnp.float32) * cos[None, :, None] + rotated * sin[None, :, None]
  return out.astype(x.dtype)


# ---- blocks ---------------------------------------------------------------------------------------
class FluxAttention(nnx.Module):
  """Attention with RMS qk-norm and RoPE; `joint` adds the text stream's own projections.

  Joint: text tokens come first in the attended sequence ([text; image], FLUX's order) and the
  two outputs go through `to_add_out` / `to_out`. Single-stream (`joint=False`) is "pre-only":
  the output is returned before any projection (the block's `proj_out` does it).
  """

  def __init__(self, cfg: FluxTransformerConfig, joint: bool, rngs: nnx.Rngs):
    dim = cfg.inner_dim
    self.heads, self.head_dim, self.joint = cfg.num_attention_heads, cfg.attention_head_dim, joint
    self.attention = cfg.attention
    lin = lambda axes: sd3t._linear(cfg, dim, dim, axes, rngs)  # pylint: disable=protected-access
    self.to_q, self.to_k, self.to_v = (lin(("embed", "heads")) for _ in range(3))
    self.norm_q, self.norm_k = sd3t.RMSNorm(self.head_dim, cfg), sd3t.RMSNorm(self.head_dim, cfg)
    if joint:
      self.to_out = lin(("heads", "embed"))
      self.add_q_proj, self.add_k_proj, self.add_v_proj = (lin(("embed", "heads"))
                                                           for _ in range(3))
      self.norm_added_q = sd3t.RMSNorm(self.head_dim, cfg)
      self.norm_added_k = sd3t.RMSNorm(self.head_dim, cfg)
      self.to_add_out = lin(("heads", "embed"))

  def _qkv(self, x, proj_q, proj_k, proj_v, norm_q, norm_k):
    split = lambda t: t.reshape(t.shape[:-1] + (self.heads, self.head_dim))
    q, k, v = (sharding_lib.constrain(split(p(x)), _HEADS) for p in (proj_q, proj_k, proj_v))
    return norm_q(q), norm_k(k), v

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
               context: jax.Array | None = None):
    """x [B, N, D] (all tokens when single-stream), context [B, L, D] (joint only), cos/sin
    [L + N, head_dim]. Returns out [B, N, D], or (image_out, context_out) when joint."""
    q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
    if self.joint:
      cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                             self.norm_added_q, self.norm_added_k)
      q, k, v = (jnp.concatenate(p, axis=1) for p in ((cq, q), (ck, k), (cv, v)))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = attention_lib.dot_product_attention(q, k, v, implementation=self.attention)
    out = out.reshape(out.shape[:2] + (-1,))
    if not self.joint:
      return out
    num_text = context.shape[1]
    return self.to_out(out[:, num_text:]), self.to_add_out(out[:, :num_text])


class DoubleBlock(nnx.Module):
  """diffusers FluxTransformerBlock: separate adaLN-Zero, attention weights and MLPs per stream."""

  def __init__(self, cfg: FluxTransformerConfig, rngs: nnx.Rngs):
    self.dtype = cfg.dtype
    self.norm1 = sd3t.Modulation(cfg, 6, rngs)
    self.norm1_context = sd3t.Modulation(cfg, 6, rngs)
    self.attn = FluxAttention(cfg, joint=True, rngs=rngs)
    self.ff = sd3t.FeedForward(cfg, rngs)
    self.ff_context = sd3t.FeedForward(cfg, rngs)

  def __call__(self, x, context, temb, cos, sin):
    """x [B, N, D], context [B, L, D] float32 residual streams, temb [B, D] -> (x, context)."""
    ln = sd3t._layer_norm  # pylint: disable=protected-access
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
    c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
    attn_out, context_attn_out = self.attn(
        (ln(x) * (1 + scale) + shift).astype(self.dtype), cos, sin,
        context=(ln(context) * (1 + c_scale) + c_shift).astype(self.dtype))
    x = x + gate * attn_out.astype(jnp.float32)
    x = x + gate_mlp * self.ff((ln(x) * (1 + scale_mlp) + shift_mlp).astype(self.dtype)).astype(
        jnp.float32)
    context = context + c_gate * context_attn_out.astype(jnp.float32)
    context = context + c_gate_mlp * self.ff_context(
        (ln(context) * (1 + c_scale_mlp) + c_shift_mlp).astype(self.dtype)).astype(jnp.float32)
    return x, context


class SingleBlock(nnx.Module):
  """diffusers FluxSingleTransformerBlock: attention and MLP side by side on all tokens."""

  def __init__(self, cfg: FluxTransformerConfig, rngs: nnx.Rngs):
    dim, self.dtype = cfg.inner_dim, cfg.dtype
    lin = sd3t._linear  # pylint: disable=protected-access
    self.norm = sd3t.Modulation(cfg, 3, rngs)
    self.proj_mlp = lin(cfg, dim, 4 * dim, ("embed", "mlp"), rngs)
    self.attn = FluxAttention(cfg, joint=False, rngs=rngs)
    # Input rows: the attention output (heads) then the MLP hidden units (mlp).
    self.proj_out = lin(cfg, 5 * dim, dim, (None, "embed"), rngs)

  def __call__(self, x, temb, cos, sin):
    """x [B, L + N, D] float32 residual stream -> same."""
    shift, scale, gate = self.norm(temb)
    h = (sd3t._layer_norm(x) * (1 + scale) + shift).astype(self.dtype)  # pylint: disable=protected-access
    mlp = sharding_lib.constrain(jax.nn.gelu(self.proj_mlp(h), approximate=True), _MLP)
    out = self.proj_out(jnp.concatenate([self.attn(h, cos, sin), mlp], axis=-1))
    return x + gate * out.astype(jnp.float32)


class TimeGuidanceTextEmbed(nnx.Module):
  """temb = MLP(sinusoid(t)) [+ MLP(sinusoid(guidance))] + MLP(pooled), [B, D] float32."""

  def __init__(self, cfg: FluxTransformerConfig, rngs: nnx.Rngs):
    self.timestep_embedder = sd3t.TimestepEmbedder(cfg, sd3t.TIME_PROJ_DIM, rngs)
    self.guidance_embedder = (sd3t.TimestepEmbedder(cfg, sd3t.TIME_PROJ_DIM, rngs)
                              if cfg.guidance_embeds else None)
    self.text_embedder = sd3t.TimestepEmbedder(cfg, cfg.pooled_projection_dim, rngs)
    self.dtype = cfg.dtype

  def __call__(self, timesteps, guidance, pooled):
    embed = lambda mlp, t: mlp(sd3t.timestep_embedding(t).astype(self.dtype)).astype(jnp.float32)
    temb = embed(self.timestep_embedder, timesteps)
    if self.guidance_embedder is not None:
      temb = temb + embed(self.guidance_embedder, guidance)
    return temb + self.text_embedder(pooled.astype(self.dtype)).astype(jnp.float32)


def pack(latents: jax.Array) -> jax.Array:
  """NHWC latents [B, h, w, C] -> tokens [B, h/2 * w/2, 4 C], channel order (c, dy, dx)."""
  b, h, w, c = latents.shape
  x = latents.reshape(b, h // PACK, PACK, w // PACK, PACK, c)
  return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack(tokens: jax.Array, h: int, w: int) -> jax.Array:
  """Inverse of `pack`: [B, h/2 * w/2, 4 C] -> [B, h, w, C]."""
  b, _, cp = tokens.shape
  c = cp // (PACK * PACK)
  x = tokens.reshape(b, h // PACK, w // PACK, c, PACK, PACK)
  return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h, w, c)


class FluxTransformer(nnx.Module):
  """The FLUX.1 velocity network on NHWC latents."""

  def __init__(self, config: FluxTransformerConfig, *, rngs: nnx.Rngs):
    cfg = config
    self.config = cfg
    lin = sd3t._linear  # pylint: disable=protected-access
    self.x_embedder = lin(cfg, cfg.in_channels, cfg.inner_dim, (None, "embed"), rngs)
    self.context_embedder = lin(cfg, cfg.joint_attention_dim, cfg.inner_dim, (None, "embed"), rngs)
    self.time_text_embed = TimeGuidanceTextEmbed(cfg, rngs)
    self.transformer_blocks = nnx.List([DoubleBlock(cfg, rngs) for _ in range(cfg.num_layers)])
    self.single_transformer_blocks = nnx.List(
        [SingleBlock(cfg, rngs) for _ in range(cfg.num_single_layers)])
    self.norm_out = sd3t.ContinuousNorm(cfg, rngs)
    self.proj_out = lin(cfg, cfg.inner_dim, cfg.out_channels, ("embed", None), rngs)

  def _run(self, block, *args):
    if not self.config.remat:
      return block(*args)
    graphdef, state = nnx.split(block)  # functional remat, as in SD3Transformer
    return jax.checkpoint(lambda st, *a: nnx.merge(graphdef, st)(*a))(state, *args)

  def __call__(self, latents: jax.Array, sigma: jax.Array, encoder_hidden_states: jax.Array,
               pooled_projections: jax.Array, guidance: jax.Array | None = None) -> jax.Array:
    """Predicts the flow-matching velocity.

    Args:
      latents: [B, h, w, C] float (NHWC), C = in_channels / 4, h and w even.
      sigma: [B] noise level in [0, 1]; diffusers' transformer input is the same (t / 1000) and
        the model multiplies it by 1000.
      encoder_hidden_states: [B, L, joint_attention_dim] T5 states.
      pooled_projections: [B, pooled_projection_dim] pooled CLIP text embedding.
      guidance: [B] guidance scale (e.g. 3.5), required iff `guidance_embeds`.

    Returns:
      [B, h, w, out_channels / 4] float32.
    """
    cfg = self.config
    b, h, w, c = latents.shape
    if c != cfg.latent_channels or h % PACK or w % PACK:
      raise ValueError(f"latents shape {latents.shape}: expected [B, h, w, {cfg.latent_channels}]"
                       " with h and w even")
    sd3t.check_conditioning(cfg, b, sigma, encoder_hidden_states, pooled_projections)
    if cfg.guidance_embeds and (guidance is None or guidance.shape != (b,)):
      raise ValueError(f"this FLUX transformer embeds the guidance scale: pass guidance [{b}], "
                       f"got {None if guidance is None else guidance.shape}")
    if not cfg.guidance_embeds and guidance is not None:
      raise ValueError("guidance given, but the config has guidance_embeds=False")
    text_len = encoder_hidden_states.shape[1]
    cos, sin = (jnp.asarray(t) for t in rope_tables(cfg.axes_dims_rope, text_len, h // PACK,
                                                     w // PACK))
    scale = sd3t.TIMESTEP_SCALE
    temb = self.time_text_embed(sigma * scale, None if guidance is None else guidance * scale,
                                pooled_projections)
    x = self.x_embedder(pack(latents).astype(cfg.dtype)).astype(jnp.float32)
    context = self.context_embedder(encoder_hidden_states.astype(cfg.dtype)).astype(jnp.float32)
    x, context = sharding_lib.constrain(x, _TOKENS), sharding_lib.constrain(context, _TOKENS)
    for block in self.transformer_blocks:
      x, context = self._run(block, x, context, temb, cos, sin)
      x, context = sharding_lib.constrain(x, _TOKENS), sharding_lib.constrain(context, _TOKENS)
    tokens = jnp.concatenate([context, x], axis=1)
    for block in self.single_transformer_blocks:
      tokens = sharding_lib.constrain(self._run(block, tokens, temb, cos, sin), _TOKENS)
    x = self.norm_out(tokens[:, text_len:], temb).astype(cfg.dtype)
    return unpack(self.proj_out(x).astype(jnp.float32), h, w)


# ---- loading diffusers checkpoints ----------------------------------------------------------------
def checkpoint_name(path: str) -> tuple[str, weights.Transform | None]:
  """Dotted state path -> (diffusers tensor name, transform), with SD3's renames."""
  return sd3t.checkpoint_name(path)


def load_flux_transformer(directory: str, abstract_state: nnx.State, mesh=None,
                          rules=None) -> nnx.State:
  """Reads a diffusers FLUX transformer directory into an NNX state (see `load_sd3_transformer`).

  Raises:
    CheckpointError: missing / unexpected / wrongly shaped tensors, all named.
    ValueError: an unsupported config.json.
  """
  FluxTransformerConfig.from_diffusers_config(weights.read_config(directory))
  return weights.load_state(weights.Checkpoint(directory), abstract_state, checkpoint_name,
                            component="transformer", mesh=mesh, rules=rules)


def from_pretrained(directory: str, mesh=None, rules=None, **overrides) -> FluxTransformer:
  """Builds a `FluxTransformer` from a diffusers `transformer/` directory, never randomly
  initialising it (abstract build, then the state is filled from the checkpoint)."""
  config = FluxTransformerConfig.from_diffusers_config(weights.read_config(directory), **overrides)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: FluxTransformer(config, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, load_flux_transformer(directory, state, mesh=mesh, rules=rules))
