"""A tiny pixel-space text renderer: the SD3 MMDiT on 32x32 RGB pixels, pretrained on CPU.

The generator of the CPU main job (`configs/tiny_ocr_color.py`). Latents are the image itself
(no VAE): x [B, 32, 32, 3] in [-1, 1], cut into 4x4 patches (64 image tokens). The velocity
network is `sd3_transformer.SD3Transformer`, the same blocks as SD3 and the random tiny model,
so LoRA targets (`attn.to_q`, ...), logical axes and sharding behave as at full size.

  text:     PromptTokenizer ids [B, L] -> tiny_mmdit.TinyTextEncoder -> hidden, pooled
  velocity: SD3Transformer(x [B, 32, 32, 3], sigma [B], hidden, pooled) -> [B, 32, 32, 3]
  decode:   (x + 1) / 2, bicubic upscale by `display_scale` -> images [B, 128, 128, 3] in [0, 1]

Prompt simplification (a toy model cannot read a sentence): the tokenizer reads an
OCR-Color-10 style prompt as the short byte string `WORD|colour` (the first double-quoted span
and the word after 'The color of the text "..." is'), e.g. 'A sign that reads "CAT". The color
of the text "CAT" is red.' -> 'CAT|red'. A prompt with no quoted span is read as its raw bytes
(truncated), and the empty prompt (CFG's negative) as no bytes at all.

Why the upscale in `decode`: RapidOCR does not read 32 px words, but reads them reliably after
a 4x bicubic upscale (all rewards then see 128 px images, and the evaluation grid is legible).
It has no parameters, so it adds nothing to the weights.

Pretrained weights ship in `mgrpo_jax/assets/tiny_text_renderer/` (model.safetensors with the
module's dotted state paths as tensor names, config.json with the TinyPixelConfig fields and
the command that made them); `mgrpo_jax.pretrain` writes that layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgrpo_jax.models import sd3_transformer
from mgrpo_jax.models import tiny_mmdit
from mgrpo_jax.models.tokenizer import ByteTokenizer

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                         "tiny_text_renderer")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

_QUOTED = re.compile(r'"([^"]*)"')
_COLOR = re.compile(r'color of the text\s+"[^"]*"\s+is\s+([A-Za-z]+)', re.IGNORECASE)


def condition_text(prompt: str) -> str:
  """What the tiny renderer reads of a prompt: 'WORD|colour', 'WORD|' or the prompt itself."""
  quoted = _QUOTED.search(prompt)
  if quoted is None:
    return prompt
  color = _COLOR.search(prompt)
  return f"{quoted.group(1)}|{color.group(1).lower() if color else ''}"


class PromptTokenizer:
  """OCR-Color prompts -> ids of `condition_text(prompt)` (ByteTokenizer framing and padding)."""

  def __init__(self, max_length: int):
    self.bytes = ByteTokenizer(max_length)
    self.max_length = self.bytes.max_length

  def __call__(self, prompts: list[str]) -> dict[str, np.ndarray]:
    """list of B strings -> {'input_ids': int32 [B, max_length]}."""
    if isinstance(prompts, str):
      raise TypeError("tokenize takes a list of prompts, got a single string")
    return self.bytes([condition_text(str(p)) for p in prompts])


@dataclasses.dataclass(frozen=True)
class TinyPixelConfig:
  """Sizes of the pixel-space renderer.

  Attributes:
    image_size: side of the generated pixels (the latent).
    patch_size: transformer patch side.
    num_layers: joint MMDiT blocks.
    num_heads: attention heads; width D = num_heads * head_dim.
    head_dim: channels per head.
    text_length: tokens per prompt (BOS + 'WORD|colour' bytes + EOS, padded).
    text_layers: pre-LN self-attention layers of the byte text encoder.
    pooled_dim: width of the pooled text embedding.
    display_scale: integer upscale of `decode` (bicubic), so OCR sees large glyphs.
    dtype: compute dtype name ("float32" or "bfloat16").
    remat: rematerialise transformer blocks in the backward pass.
    scan_layers: run the identical transformer blocks as one `jax.lax.scan` (the same function;
      `mgrpo_jax.pretrain` turns it on: faster training steps on CPU, `bench/pretrain_step.py`).
    path: directory with model.safetensors + config.json to load ('' = random init);
      `registry.tiny_text_model_config()` points it at the shipped weights.
  """

  image_size: int = 32
  patch_size: int = 4
  num_layers: int = 5
  num_heads: int = 6
  head_dim: int = 32
  text_length: int = 16
  text_layers: int = 1
  pooled_dim: int = 64
  display_scale: int = 4
  dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = False
  path: str = ""

  def __post_init__(self):
    if not isinstance(self.display_scale, int) or self.display_scale < 1:
      raise ValueError(f"tiny pixel config: display_scale={self.display_scale!r}, expected a "
                       "positive int")
    self.tiny_config()  # validates the shared sizes

  def tiny_config(self) -> tiny_mmdit.TinyConfig:
    """The equivalent TinyConfig (text encoder and transformer sizes; its decoder is unused)."""
    return tiny_mmdit.TinyConfig(
        latent_size=self.image_size, latent_channels=3, patch_size=self.patch_size,
        num_layers=self.num_layers, num_heads=self.num_heads, head_dim=self.head_dim,
        text_length=self.text_length, text_layers=self.text_layers, pooled_dim=self.pooled_dim,
        upsample=1, dtype=self.dtype, remat=self.remat,
        scan_layers=self.scan_layers)

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, 3)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    side = self.image_size * self.display_scale
    return (side, side, 3)

  def architecture(self) -> dict[str, Any]:
    """The fields that fix the weights' shapes (written to / checked against config.json)."""
    keep = ("image_size", "patch_size", "num_layers", "num_heads", "head_dim", "text_length",
            "text_layers", "pooled_dim")
    return {k: getattr(self, k) for k in keep}


def _zero(linear: nnx.Linear):
  linear.kernel[...] = jnp.zeros_like(linear.kernel[...])
  if linear.bias is not None:
    linear.bias[...] = jnp.zeros_like(linear.bias[...])


class TinyPixelT2I(tiny_mmdit.TinyT2I):
  """The pixel-space text renderer (implements `models.base.FlowModel`)."""

  def __init__(self, cfg: TinyPixelConfig, *, rngs: nnx.Rngs):
    tiny = cfg.tiny_config()
    self.latent_shape = cfg.latent_shape
    self.image_shape = cfg.image_shape
    self.display_scale = cfg.display_scale
    self.text_encoder = tiny_mmdit.TinyTextEncoder(tiny, rngs)
    self.transformer = sd3_transformer.SD3Transformer(tiny.transformer_config(), rngs=rngs)
    # adaLN-Zero (DiT): every block starts as the identity and the output as zero velocity,
    # which trains from scratch far faster than diffusers' default init.
    for block in self.transformer.transformer_blocks:
      for norm in ("norm1", "norm1_context"):
        _zero(getattr(block, norm).linear)
    _zero(self.transformer.norm_out.linear)
    _zero(self.transformer.proj_out)

  # encode_text and velocity are TinyT2I's (same text encoder and transformer); only the
  # construction and the pixel decoder differ.

  def decode(self, latents: jax.Array) -> jax.Array:
    """Pixels [B, s, s, 3] in [-1, 1] -> images [B, s*k, s*k, 3] float32 in [0, 1] (bicubic)."""
    images = jnp.clip((latents.astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)
    if self.display_scale > 1:
      b, h, w, c = images.shape
      k = self.display_scale
      images = jax.image.resize(images, (b, h * k, w * k, c), "cubic")
    return jnp.clip(images, 0.0, 1.0)


def read_config(path: str) -> dict[str, Any]:
  """config.json of a weights directory (FileNotFoundError naming the path if missing)."""
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"tiny text renderer: {file} does not exist (a directory written by "
                            "`python -m mgrpo_jax.pretrain` holds config.json and "
                            f"{WEIGHTS_FILE})")
  with open(file) as f:
    return json.load(f)


def check_architecture(cfg: TinyPixelConfig) -> None:
  """Raises ValueError naming every field where `cfg` differs from its weights' config.json."""
  saved = read_config(cfg.path).get("architecture", {})
  diff = {k: (v, saved.get(k)) for k, v in cfg.architecture().items() if saved.get(k) != v}
  if diff:
    listed = ", ".join(f"{k}={ours} (weights: {theirs})" for k, (ours, theirs) in diff.items())
    raise ValueError(f"config.model does not match the weights in {cfg.path}: {listed}")


def load_weights(cfg: TinyPixelConfig, abstract_state: nnx.State, mesh=None) -> nnx.State:
  """Fills `abstract_state` (a TinyPixelT2I state or its part) from `cfg.path`.

  Tensor names are the state's dotted paths, so a LoRA run's frozen base and a full fine-tuning
  state both load from the same file.
  """
  from mgrpo_jax.models import weights  # pylint: disable=import-outside-toplevel
  check_architecture(cfg)
  checkpoint = weights.Checkpoint(cfg.path)
  return weights.load_state(checkpoint, abstract_state, lambda p: (p, None),
                            component="tiny text renderer", mesh=mesh)


def save_weights(model: TinyPixelT2I, cfg: TinyPixelConfig, path: str,
                 provenance: dict[str, Any]) -> None:
  """Writes model.safetensors (dotted state paths, float16) and config.json to `path`.

  float16 halves the file (7 M parameters: 14 MB, under the package's 20 MB budget); its
  relative rounding error of 5e-4 is far below what training moves the weights by. The
  loader casts back to the model's float32.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(path, exist_ok=True)
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  tensors = {".".join(str(k) for k in p): np.asarray(jax.device_get(v.get_value()), np.float16)
             for p, v in flat}
  save_file(tensors, os.path.join(path, WEIGHTS_FILE))
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump({"architecture": cfg.architecture(), **provenance}, f, indent=2, sort_keys=True)
    f.write("\n")
