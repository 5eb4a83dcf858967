"""CLIP (text and vision towers with projections) in Flax NNX, for rewards computed on the device.

Loads Hugging Face `CLIPModel` directories (PickScore_v1 is a CLIP-H/14, CLIPScore and the LAION
aesthetic predictor use CLIP-L/14) without torch. The text tower is SD3's CLIP text transformer
(`text_encoders.clip_text_forward`); the vision tower is

  pixels [B, S, S, 3] -> patch conv (no bias) -> [CLS] + patches + positions -> pre_layrnorm
  -> encoder layers -> post_layernorm(CLS) -> visual_projection

`preprocess` is CLIPImageProcessor in JAX: bicubic resize of the short side to the model's size
(antialiased when shrinking, like PIL), centre crop, scale to [0, 1], normalise with CLIP's mean
and std. State paths are the checkpoint's names (`vision_model.pre_layrnorm.scale`, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mgrpo_jax.models import text_encoders as te
from mgrpo_jax.models import weights

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Fields of transformers' CLIPVisionConfig that change the computation."""

  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    te._activation(self.hidden_act, "vision_config.hidden_act")  # pylint: disable=protected-access
    if self.image_size % self.patch_size:
      raise ValueError(f"CLIP vision config: image_size={self.image_size} is not divisible by "
                       f"patch_size={self.patch_size}")

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any], **overrides) -> CLIPVisionConfig:
    return weights.config_fields(cls, config, **overrides)


class _VisionEmbeddings(nnx.Module):

  def __init__(self, cfg: CLIPVisionConfig, rngs):
    d, p = cfg.hidden_size, cfg.patch_size
    self.class_embedding = nnx.Param(jnp.zeros((d,), cfg.param_dtype))
    self.patch_embedding = nnx.Conv(
        cfg.num_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=False,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                          (None, None, None, "embed")), rngs=rngs)
    self.position_embedding = te._embedding(  # pylint: disable=protected-access
        (cfg.image_size // p) ** 2 + 1, d, (None, "embed"), cfg.param_dtype, rngs)


class _VisionTransformer(nnx.Module):

  def __init__(self, cfg: CLIPVisionConfig, rngs):
    self.config = cfg
    self.embeddings = _VisionEmbeddings(cfg, rngs)
    self.pre_layrnorm = te._LayerNorm(  # pylint: disable=protected-access
        cfg.hidden_size, cfg.layer_norm_eps, cfg.param_dtype)
    self.encoder = nnx.Module()
    self.encoder.layers = nnx.List([te._CLIPLayer(cfg, rngs)  # pylint: disable=protected-access
                                    for _ in range(cfg.num_hidden_layers)])
    self.post_layernorm = te._LayerNorm(  # pylint: disable=protected-access
        cfg.hidden_size, cfg.layer_norm_eps, cfg.param_dtype)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    """Normalised pixels [B, S, S, 3] -> pooled CLS state [B, hidden] (after post_layernorm)."""
    cfg = self.config
    b = pixels.shape[0]
    if pixels.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
      raise ValueError(f"pixels shape {pixels.shape}, expected [B, {cfg.image_size}, "
                       f"{cfg.image_size}, {cfg.num_channels}] (use clip.preprocess)")
    emb = self.embeddings
    patches = emb.patch_embedding(pixels.astype(cfg.dtype)).astype(jnp.float32)
    patches = patches.reshape(b, -1, cfg.hidden_size)
    cls = jnp.broadcast_to(emb.class_embedding[...].astype(jnp.float32), (b, 1, cfg.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1)
    x = x + emb.position_embedding.embedding[...].astype(jnp.float32)[None]
    x = self.pre_layrnorm(x)
    for layer in self.encoder.layers:
      x = layer(x, None)
    return self.post_layernorm(x[:, 0])


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text: te.CLIPTextConfig
  vision: CLIPVisionConfig
  projection_dim: int = 768

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any], **overrides) -> CLIPConfig:
    if "text_config" not in config or "vision_config" not in config:
      raise ValueError("CLIP config.json needs text_config and vision_config (a CLIPModel "
                       "directory)")
    return cls(te.CLIPTextConfig.from_hf_config(config["text_config"], **overrides),
               CLIPVisionConfig.from_hf_config(config["vision_config"], **overrides),
               int(config.get("projection_dim", 512)))


class CLIPModel(nnx.Module):
  """Both CLIP towers with projections and the logit scale."""

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
    self.config = config
    tc, vc = config.text, config.vision
    self.text_model = te._CLIPTransformer(tc, rngs)  # pylint: disable=protected-access
    self.vision_model = _VisionTransformer(vc, rngs)
    self.text_projection = te._dense(  # pylint: disable=protected-access
        tc.hidden_size, config.projection_dim, ("embed", None), tc.dtype, tc.param_dtype, rngs,
        bias=False)
    self.visual_projection = te._dense(  # pylint: disable=protected-access
        vc.hidden_size, config.projection_dim, ("embed", None), vc.dtype, vc.param_dtype, rngs,
        bias=False)
    self.logit_scale = nnx.Param(jnp.asarray(2.6592, tc.param_dtype))

  def text_features(self, input_ids: jax.Array) -> jax.Array:
    """int [B, L] -> unnormalised text embeddings [B, projection_dim] float32."""
    out = te.clip_text_forward(self.text_model, self.config.text, input_ids)
    return self.text_projection(out["pooled"].astype(self.config.text.dtype)).astype(jnp.float32)

  def image_features(self, pixels: jax.Array) -> jax.Array:
    """Normalised pixels [B, S, S, 3] -> unnormalised image embeddings [B, projection_dim]."""
    pooled = self.vision_model(pixels)
    return self.visual_projection(pooled.astype(self.config.vision.dtype)).astype(jnp.float32)


def preprocess(images: jax.Array, size: int) -> jax.Array:
  """uint8 or [0, 1] float images [B, H, W, 3] -> CLIP pixels [B, size, size, 3] float32."""
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  b, h, w, c = x.shape
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  x = jax.image.resize(x, (b, nh, nw, c), method="bicubic", antialias=True)
  top, left = (nh - size) // 2, (nw - size) // 2
  x = x[:, top:top + size, left:left + size]
  return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def _name(path: str):
  """Dotted state path -> (transformers tensor name, transform to our layout)."""
  if path == "logit_scale" or path.endswith("class_embedding"):
    return path, None
  kernel = weights.conv_kernel if "patch_embedding" in path else weights.linear_kernel
  return weights.torch_name(path, kernel)


def load_clip_state(directory: str, abstract_state, mesh=None, rules=None) -> nnx.State:
  """Fills the state of a `CLIPModel` from a transformers CLIPModel directory."""
  checkpoint = weights.Checkpoint(directory)
  ignored = tuple(n for n in checkpoint.keys() if n.endswith("position_ids"))
  return weights.load_state(checkpoint, abstract_state, _name, component="CLIP", mesh=mesh,
                            rules=rules, ignore_unexpected=ignored)


def from_pretrained(directory: str, mesh=None, rules=None, **overrides) -> CLIPModel:
  config = CLIPConfig.from_hf_config(weights.read_config(directory), **overrides)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: CLIPModel(config, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, load_clip_state(directory, abstract, mesh=mesh, rules=rules))
