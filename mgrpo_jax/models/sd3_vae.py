"""The SD3 / SD3.5 VAE (diffusers `AutoencoderKL` layout) in Flax NNX, with its loader.

SD3's autoencoder has 16 latent channels and no quant / post-quant convs; latents enter the
transformer as `(z - shift_factor) * scaling_factor`. Images are NHWC here (diffusers: NCHW).

  encoder: conv_in -> down_blocks[i] (resnets, then a stride-2 conv except the last)
           -> mid_block (resnet, single-head self-attention, resnet) -> norm, SiLU, conv_out
           -> (mean, logvar) with 16 channels each
  decoder: conv_in -> mid_block -> up_blocks (reversed widths, layers_per_block + 1 resnets,
           then nearest 2x + conv except the last) -> norm, SiLU, conv_out

State paths are diffusers' names with `weight` -> `kernel` / `scale` (GroupNorm) and the mid-block
attention's `to_out.0` -> `to_out`, e.g. `decoder.up_blocks.0.resnets.1.conv1.kernel`,
`encoder.mid_block.attentions.0.to_q.kernel`, `decoder.conv_norm_out.scale`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgrpo_jax.models import weights

_ARCH_FIELDS = ("in_channels", "out_channels", "down_block_types", "up_block_types",
                "block_out_channels", "layers_per_block", "act_fn", "latent_channels",
                "norm_num_groups", "sample_size", "scaling_factor", "shift_factor",
                "latents_mean", "latents_std", "force_upcast", "use_quant_conv",
                "use_post_quant_conv", "mid_block_add_attention")
NORM_EPS = 1e-6  # every GroupNorm of the diffusers VAE (resnets, attention, output norm)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of an SD3-style AutoencoderKL plus how to run it.

  Attributes:
    in_channels / out_channels: image channels (3).
    block_out_channels: widths of the resolution levels; len - 1 downsamplings.
    layers_per_block: resnets per encoder level (decoder levels have one more).
    latent_channels: 16 for SD3.
    norm_num_groups: GroupNorm groups.
    sample_size: nominal image size (unused by the computation).
    scaling_factor, shift_factor: latents = (z - shift) * scale.
    mid_block_add_attention: self-attention in the mid blocks.
    dtype: compute dtype of convs; norms and attention statistics are float32.
    param_dtype: parameter dtype.
  """

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 16
  norm_num_groups: int = 32
  sample_size: int = 1024
  scaling_factor: float = 1.5305
  shift_factor: float = 0.0609
  mid_block_add_attention: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad or not self.block_out_channels:
      raise ValueError(f"VAE config: block_out_channels {self.block_out_channels} must be "
                       f"non-empty multiples of norm_num_groups={self.norm_num_groups}")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> VAEConfig:
    """From a diffusers `vae/config.json` dict; refuses what this implementation cannot run.

    Raises:
      ValueError: an unknown key, or a supported key with a value other than SD3's layout
        (quant convs, other block types, activations), named in the message.
    """
    arch = weights.diffusers_arch_kwargs(config, "AutoencoderKL", _ARCH_FIELDS, "VAE")
    n = len(arch.get("block_out_channels", cls.block_out_channels))
    required = {"use_quant_conv": False, "use_post_quant_conv": False, "act_fn": "silu",
                "down_block_types": ["DownEncoderBlock2D"] * n,
                "up_block_types": ["UpDecoderBlock2D"] * n}
    for key, value in required.items():
      if key in arch and _normalise(arch[key]) != _normalise(value):
        raise ValueError(f"VAE config {key}={arch[key]!r} is not supported (SD3's VAE has "
                         f"{value!r})")
    for key in ("latents_mean", "latents_std"):
      if arch.get(key) is not None:
        raise ValueError(f"VAE config {key} is set; per-channel latent statistics are not "
                         "supported (SD3 uses scaling_factor / shift_factor)")
    kwargs = {k: arch[k] for k in ("in_channels", "out_channels", "block_out_channels",
                                   "layers_per_block", "latent_channels", "norm_num_groups",
                                   "sample_size", "scaling_factor", "shift_factor",
                                   "mid_block_add_attention") if k in arch}
    if kwargs.get("shift_factor") is None:
      kwargs["shift_factor"] = 0.0
    return cls(**kwargs, **overrides)


def _normalise(value):
  return list(value) if isinstance(value, (list, tuple)) else value


# ---- layers -------------------------------------------------------------------------------------
def _conv(cfg: VAEConfig, cin: int, cout: int, rngs: nnx.Rngs, kernel: int = 3,
          stride: int = 1, padding: Any = "SAME") -> nnx.Conv:
  return nnx.Conv(cin, cout, kernel_size=(kernel, kernel), strides=(stride, stride),
                  padding=padding, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                    (None, None, None, None)),
                  rngs=rngs)


class GroupNorm(nnx.Module):
  """GroupNorm over NHWC with per-channel scale and bias; statistics in float32."""

  def __init__(self, cfg: VAEConfig, channels: int):
    self.groups = cfg.norm_num_groups
    self.scale = nnx.Param(jnp.ones((channels,), cfg.param_dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), cfg.param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + NORM_EPS)
    return g.reshape(b, h, w, c) * self.scale[...].astype(jnp.float32) + \
        self.bias[...].astype(jnp.float32)


class ResnetBlock(nnx.Module):
  """norm, SiLU, conv, norm, SiLU, conv, plus the (1x1-projected if widths differ) input."""

  def __init__(self, cfg: VAEConfig, cin: int, cout: int, rngs: nnx.Rngs):
    self.dtype = cfg.dtype
    self.norm1 = GroupNorm(cfg, cin)
    self.conv1 = _conv(cfg, cin, cout, rngs)
    self.norm2 = GroupNorm(cfg, cout)
    self.conv2 = _conv(cfg, cout, cout, rngs)
    self.conv_shortcut = _conv(cfg, cin, cout, rngs, kernel=1) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)).astype(self.dtype))
    h = self.conv2(jax.nn.silu(self.norm2(h)).astype(self.dtype))
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x.astype(self.dtype))
    return shortcut.astype(jnp.float32) + h.astype(jnp.float32)


class SelfAttention(nnx.Module):
  """The mid block's single-head attention over all pixels, with a residual connection."""

  def __init__(self, cfg: VAEConfig, channels: int, rngs: nnx.Rngs):
    self.dtype = cfg.dtype
    self.group_norm = GroupNorm(cfg, channels)
    dense = lambda: nnx.Linear(channels, channels, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                               kernel_init=nnx.with_partitioning(
                                   nnx.initializers.lecun_normal(), (None, None)),
                               rngs=rngs)
    self.to_q, self.to_k, self.to_v, self.to_out = dense(), dense(), dense(), dense()

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, 1, h * w, c).astype(self.dtype)
    q, k, v = (jnp.swapaxes(p(t), 1, 2) for p in (self.to_q, self.to_k, self.to_v))
    # [B, HW, 1, C]: one head whose width is the channel count (scale C^-1/2).
    out = jax.nn.dot_product_attention(q, k, v).reshape(b, h * w, c)
    return x + self.to_out(out).astype(jnp.float32).reshape(b, h, w, c)


class MidBlock(nnx.Module):

  def __init__(self, cfg: VAEConfig, channels: int, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(cfg, channels, channels, rngs),
                             ResnetBlock(cfg, channels, channels, rngs)])
    self.attentions = nnx.List([SelfAttention(cfg, channels, rngs)]
                               if cfg.mid_block_add_attention else [])

  def __call__(self, x):
    x = self.resnets[0](x)
    for attn in self.attentions:
      x = attn(x)
    return self.resnets[1](x)


class Downsample(nnx.Module):
  """Pad bottom/right by one, then a 3x3 stride-2 conv (diffusers' padding=0 Downsample2D)."""

  def __init__(self, cfg: VAEConfig, channels: int, rngs: nnx.Rngs):
    self.conv = _conv(cfg, channels, channels, rngs, stride=2, padding="VALID")

  def __call__(self, x):
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest 2x, then a 3x3 conv."""

  def __init__(self, cfg: VAEConfig, channels: int, rngs: nnx.Rngs):
    self.conv = _conv(cfg, channels, channels, rngs)

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
  """One resolution level: resnets, then an optional resampler."""

  def __init__(self, cfg, cin, cout, num_resnets, resample, rngs):
    self.dtype = cfg.dtype
    self.resnets = nnx.List([ResnetBlock(cfg, cin if i == 0 else cout, cout, rngs)
                             for i in range(num_resnets)])
    if resample == "down":
      self.downsamplers = nnx.List([Downsample(cfg, cout, rngs)])
    elif resample == "up":
      self.upsamplers = nnx.List([Upsample(cfg, cout, rngs)])
    self.resample = resample

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.resample == "down":
      x = self.downsamplers[0](x.astype(self.dtype)).astype(jnp.float32)
    elif self.resample == "up":
      x = self.upsamplers[0](x.astype(self.dtype)).astype(jnp.float32)
    return x


class Encoder(nnx.Module):

  def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
    widths = cfg.block_out_channels
    self.dtype = cfg.dtype
    self.conv_in = _conv(cfg, cfg.in_channels, widths[0], rngs)
    self.down_blocks = nnx.List([
        Level(cfg, widths[max(i - 1, 0)], widths[i], cfg.layers_per_block,
              "down" if i < len(widths) - 1 else None, rngs) for i in range(len(widths))])
    self.mid_block = MidBlock(cfg, widths[-1], rngs)
    self.conv_norm_out = GroupNorm(cfg, widths[-1])
    self.conv_out = _conv(cfg, widths[-1], 2 * cfg.latent_channels, rngs)

  def __call__(self, x):
    x = self.conv_in(x.astype(self.dtype)).astype(jnp.float32)
    for level in self.down_blocks:
      x = level(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)).astype(self.dtype))


class Decoder(nnx.Module):

  def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
    widths = cfg.block_out_channels[::-1]
    self.dtype = cfg.dtype
    self.conv_in = _conv(cfg, cfg.latent_channels, widths[0], rngs)
    self.mid_block = MidBlock(cfg, widths[0], rngs)
    self.up_blocks = nnx.List([
        Level(cfg, widths[max(i - 1, 0)], widths[i], cfg.layers_per_block + 1,
              "up" if i < len(widths) - 1 else None, rngs) for i in range(len(widths))])
    self.conv_norm_out = GroupNorm(cfg, widths[-1])
    self.conv_out = _conv(cfg, widths[-1], cfg.out_channels, rngs)

  def __call__(self, z):
    x = self.conv_in(z.astype(self.dtype)).astype(jnp.float32)
    x = self.mid_block(x)
    for level in self.up_blocks:
      x = level(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)).astype(self.dtype))


class AutoencoderKL(nnx.Module):
  """SD3's VAE. Images NHWC in [-1, 1] (encode / decode) or [0, 1] (the *_images helpers)."""

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.encoder = Encoder(config, rngs)
    self.decoder = Decoder(config, rngs)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, H, W, 3] in [-1, 1] -> (mean, logvar) [B, H/f, W/f, 16] float32 (f = 2^levels-1)."""
    moments = self.encoder(images).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array) -> jax.Array:
    """Raw (unscaled) latents [B, h, w, 16] -> images [B, h*f, w*f, 3] float32, about [-1, 1]."""
    return self.decoder(z).astype(jnp.float32)

  def latents_to_images(self, latents: jax.Array) -> jax.Array:
    """Sampler latents -> images in [0, 1] (as SD3's pipeline post-processes)."""
    cfg = self.config
    z = latents.astype(jnp.float32) / cfg.scaling_factor + cfg.shift_factor
    return jnp.clip(self.decode(z) * 0.5 + 0.5, 0.0, 1.0)

  def images_to_latents(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Images in [0, 1] -> sampler latents; the posterior mean, or a sample given `key`."""
    cfg = self.config
    mean, logvar = self.encode(images * 2.0 - 1.0)
    z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(
        key, mean.shape)
    return (z - cfg.shift_factor) * cfg.scaling_factor


# ---- loading diffusers checkpoints ------------------------------------------------------------
_RENAMES = ((re.compile(r"\.attentions\.(\d+)\.to_out\.(kernel|bias)$"),
             r".attentions.\1.to_out.0.\2"),)


def _attention_kernel(array: np.ndarray) -> np.ndarray:
  """Torch Linear [out, in] (or a legacy 1x1 conv [out, in, 1, 1]) -> [in, out]."""
  if array.ndim == 4:
    array = array[:, :, 0, 0]
  return weights.linear_kernel(array)


def checkpoint_name(path: str):
  """Dotted state path -> (diffusers tensor name, transform to our layout)."""
  transform = _attention_kernel if ".attentions." in path else weights.conv_kernel
  return weights.torch_name(path, transform, _RENAMES)


def load_sd3_vae(directory: str, abstract_state: nnx.State, mesh=None, rules=None) -> nnx.State:
  """Reads a diffusers `vae/` directory into the state of `AutoencoderKL`.

  Args:
    directory: holds config.json and *.safetensors (single or sharded with an index).
    abstract_state: target state (ShapeDtypeStruct or array leaves; shapes and dtypes are the
      targets, `.sharding` the placement unless `mesh` is given).
    mesh, rules: place by the leaves' logical axis names instead.

  Raises:
    CheckpointError: missing / unexpected / wrongly shaped tensors, by name.
  """
  VAEConfig.from_diffusers_config(weights.read_config(directory))  # validates the layout
  checkpoint = weights.Checkpoint(directory)
  return weights.load_state(checkpoint, abstract_state, checkpoint_name, component="vae",
                            mesh=mesh, rules=rules)


def from_pretrained(directory: str, mesh=None, rules=None, **overrides) -> AutoencoderKL:
  """Builds the VAE of a diffusers directory; `overrides` set dtype / param_dtype."""
  config = VAEConfig.from_diffusers_config(weights.read_config(directory), **overrides)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, load_sd3_vae(directory, state, mesh=mesh, rules=rules))
