"""The tiny default generator: an SD3-style MMDiT with a byte-level text encoder and a conv decoder.

Small enough to sample and train on two CPU cores, random-initialised from a seed, and built
from the same blocks as the real SD3 transformer (`sd3_transformer.SD3Transformer`: patchify,
joint text/image attention, adaLN-Zero timestep modulation), so LoRA target patterns, logical
axis names and sharding behave exactly as they do at full size. Its pieces:

  text:     ByteTokenizer ids [B, L] -> TinyTextEncoder -> hidden [B, L, D_text], pooled [B, D_pool]
  velocity: SD3Transformer(x [B, h, w, c], sigma [B], hidden, pooled) -> [B, h, w, c]
  decode:   TinyDecoder latents [B, h, w, c] -> nearest-upsampled convs -> images [B, H, W, 3]

State paths (for LoRA regexes): `transformer.transformer_blocks.0.attn.to_q.kernel`,
`text_encoder.layers.0.self_attn.q_proj.kernel`, `decoder.conv_in.kernel`. The text encoder's
attention is named CLIP-style (`self_attn.q_proj`) so the default LoRA targets (`attn.to_q`, ...)
adapt only the transformer, as Flow-GRPO does for SD3.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mgrpo_jax.models import sd3_transformer
from mgrpo_jax.models.tokenizer import PAD_ID, VOCAB_SIZE


# Rows of the token table: the byte vocabulary rounded up to a multiple of 64 so the 'vocab' axis
# divides any power-of-two tensor-parallel degree up to 64; the extra rows are never indexed.
_EMBED_ROWS = -(-VOCAB_SIZE // 64) * 64


@dataclasses.dataclass(frozen=True)
class TinyConfig:
  """Sizes of the tiny generator.

  Attributes:
    latent_size: latent height = width (h).
    latent_channels: latent channels (c).
    patch_size: transformer patch side; latent_size must be divisible by it.
    num_layers: joint MMDiT blocks.
    num_heads: attention heads; transformer width D = num_heads * head_dim.
    head_dim: channels per head.
    text_length: tokens per prompt (bytes + BOS/EOS, truncated).
    text_layers: pre-LN transformer layers of the text encoder (width D).
    pooled_dim: width of the pooled text embedding.
    decoder_channels: channels of the decoder convs.
    upsample: image side / latent side; a power of two (one 2x stage each).
    dtype: compute dtype name ("float32" or "bfloat16"); parameters stay float32.
    remat: rematerialise transformer blocks in the backward pass.
    scan_layers: run the identical transformer blocks as one scan (SD3TransformerConfig's
      field: same function, faster training steps on CPU).
  """

  latent_size: int = 16
  latent_channels: int = 4
  patch_size: int = 2
  num_layers: int = 2
  num_heads: int = 4
  head_dim: int = 16
  text_length: int = 32
  text_layers: int = 1
  pooled_dim: int = 64
  decoder_channels: int = 32
  upsample: int = 4
  dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = False

  def __post_init__(self):
    for name in ("latent_size", "latent_channels", "patch_size", "num_layers", "num_heads",
                 "head_dim", "text_length", "pooled_dim", "decoder_channels", "upsample"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"tiny model config: {name}={value!r}, expected a positive int")
    if self.text_layers < 0:
      raise ValueError(f"tiny model config: text_layers={self.text_layers}, expected >= 0")
    if self.latent_size % self.patch_size:
      raise ValueError(f"tiny model config: latent_size={self.latent_size} is not divisible by "
                       f"patch_size={self.patch_size}")
    if self.upsample & (self.upsample - 1):
      raise ValueError(f"tiny model config: upsample={self.upsample} must be a power of two")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"tiny model config: dtype={self.dtype!r}, expected float32 or bfloat16")

  @property
  def width(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    return (self.latent_size, self.latent_size, self.latent_channels)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    side = self.latent_size * self.upsample
    return (side, side, 3)

  def transformer_config(self) -> sd3_transformer.SD3TransformerConfig:
    grid = self.latent_size // self.patch_size
    return sd3_transformer.SD3TransformerConfig(
        sample_size=self.latent_size, patch_size=self.patch_size,
        in_channels=self.latent_channels, num_layers=self.num_layers,
        attention_head_dim=self.head_dim, num_attention_heads=self.num_heads,
        joint_attention_dim=self.width, caption_projection_dim=self.width,
        pooled_projection_dim=self.pooled_dim, out_channels=self.latent_channels,
        pos_embed_max_size=grid, dtype=jnp.dtype(self.dtype), remat=self.remat,
        scan_layers=self.scan_layers)


def _dense(n_in, n_out, axes, rngs, dtype=jnp.float32):
  return nnx.Linear(
      n_in, n_out, dtype=dtype,
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)), rngs=rngs)


class _LayerNorm(nnx.Module):
  """LayerNorm with scale and bias, statistics in float32."""

  def __init__(self, dim: int):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

  def __call__(self, x):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * self.scale[...] + self.bias[...]


class _SelfAttention(nnx.Module):
  """The four projections of a text self-attention (CLIP names)."""

  def __init__(self, dim: int, dtype, rngs: nnx.Rngs):
    self.q_proj = _dense(dim, dim, ("embed", "heads"), rngs, dtype)
    self.k_proj = _dense(dim, dim, ("embed", "heads"), rngs, dtype)
    self.v_proj = _dense(dim, dim, ("embed", "heads"), rngs, dtype)
    self.out_proj = _dense(dim, dim, ("heads", "embed"), rngs, dtype)


class _TextLayer(nnx.Module):
  """Pre-LN encoder layer: x + attn(LN(x)) with padding mask, then x + MLP(LN(x))."""

  def __init__(self, dim: int, heads: int, dtype, rngs: nnx.Rngs):
    self.heads = heads
    self.dtype = dtype
    self.layer_norm1 = _LayerNorm(dim)
    self.self_attn = _SelfAttention(dim, dtype, rngs)
    self.layer_norm2 = _LayerNorm(dim)
    self.fc1 = _dense(dim, 4 * dim, ("embed", "mlp"), rngs, dtype)
    self.fc2 = _dense(4 * dim, dim, ("mlp", "embed"), rngs, dtype)

  def __call__(self, x, key_mask):
    b, n, d = x.shape
    h = self.layer_norm1(x).astype(self.dtype)
    split = lambda t: t.reshape(b, n, self.heads, d // self.heads)
    att = self.self_attn
    out = jax.nn.dot_product_attention(split(att.q_proj(h)), split(att.k_proj(h)),
                                       split(att.v_proj(h)), mask=key_mask[:, None, None, :])
    x = x + att.out_proj(out.reshape(b, n, d)).astype(jnp.float32)
    h = self.layer_norm2(x).astype(self.dtype)
    return x + self.fc2(jax.nn.gelu(self.fc1(h))).astype(jnp.float32)


class TinyTextEncoder(nnx.Module):
  """Byte ids [B, L] -> (hidden [B, L, D] float32, pooled [B, pooled_dim] float32)."""

  def __init__(self, cfg: TinyConfig, rngs: nnx.Rngs):
    d = cfg.width
    init = nnx.initializers.normal(0.02)
    self.token_embedding = nnx.Param(
        nnx.with_partitioning(init, ("vocab", "embed"))(rngs.params(), (_EMBED_ROWS, d)))
    self.position_embedding = nnx.Param(
        nnx.with_partitioning(init, (None, "embed"))(rngs.params(), (cfg.text_length, d)))
    self.layers = nnx.List([_TextLayer(d, cfg.num_heads, jnp.dtype(cfg.dtype), rngs)
                            for _ in range(cfg.text_layers)])
    self.final_layer_norm = _LayerNorm(d)
    self.text_projection = _dense(d, cfg.pooled_dim, ("embed", None), rngs)
    self.text_length = cfg.text_length

  def __call__(self, input_ids: jax.Array):
    if input_ids.ndim != 2 or input_ids.shape[1] != self.text_length:
      raise ValueError(f"input_ids shape {input_ids.shape}, expected [B, {self.text_length}]")
    mask = input_ids != PAD_ID  # BOS is never PAD, so every row attends to something
    x = self.token_embedding[...][input_ids] + self.position_embedding[...][None]
    for layer in self.layers:
      x = layer(x, mask)
    x = self.final_layer_norm(x)
    weights = mask.astype(jnp.float32)[..., None]
    pooled = (x * weights).sum(1) / weights.sum(1)
    return x, self.text_projection(pooled)


class TinyDecoder(nnx.Module):
  """Latents [B, h, w, c] -> images [B, h*u, w*u, 3] in [0, 1]: conv, then (2x nearest, conv)*."""

  def __init__(self, cfg: TinyConfig, rngs: nnx.Rngs):
    ch = cfg.decoder_channels
    conv = lambda i, o: nnx.Conv(
        i, o, kernel_size=(3, 3), padding="SAME",
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                          (None, None, None, None)), rngs=rngs)
    self.conv_in = conv(cfg.latent_channels, ch)
    self.up_blocks = nnx.List([conv(ch, ch) for _ in range(cfg.upsample.bit_length() - 1)])
    self.conv_out = conv(ch, 3)

  def __call__(self, latents):
    x = jax.nn.silu(self.conv_in(latents.astype(jnp.float32)))
    for block in self.up_blocks:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = jax.nn.silu(block(x))
    # Like a VAE's [-1, 1] output mapped to [0, 1], but smooth so no pixel is stuck at a bound.
    return 0.5 * (1.0 + jnp.tanh(self.conv_out(x)))


class TinyT2I(nnx.Module):
  """The tiny text-to-image flow model (implements `models.base.FlowModel`)."""

  def __init__(self, cfg: TinyConfig, *, rngs: nnx.Rngs):
    self.latent_shape = cfg.latent_shape
    self.image_shape = cfg.image_shape
    self.text_encoder = TinyTextEncoder(cfg, rngs)
    self.transformer = sd3_transformer.SD3Transformer(cfg.transformer_config(), rngs=rngs)
    self.decoder = TinyDecoder(cfg, rngs)

  def encode_text(self, tokens: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """{'input_ids': int32 [B, L]} -> {'hidden': [B, L, D], 'pooled': [B, pooled_dim]}."""
    hidden, pooled = self.text_encoder(tokens["input_ids"])
    return {"hidden": hidden, "pooled": pooled}

  def velocity(self, x: jax.Array, sigma: jax.Array, cond: dict[str, Any]) -> jax.Array:
    """x [B, h, w, c], sigma [B], cond from encode_text -> velocity [B, h, w, c] float32."""
    return self.transformer(x, sigma, cond["hidden"], cond["pooled"])

  def decode(self, latents: jax.Array) -> jax.Array:
    """[B, h, w, c] -> [B, H, W, 3] float32 in [0, 1]."""
    return self.decoder(latents)
