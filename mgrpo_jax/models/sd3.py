"""Stable Diffusion 3 / 3.5 behind the generator interface, from a local diffusers directory.

  config.model = registry.sd3_model_config("/path/to/stable-diffusion-3.5-medium")
  generator = registry.get_generator(config.model)

The directory is the diffusers layout (`model_index.json`, `transformer/`, `vae/`,
`text_encoder{,_2,_3}/`, `tokenizer{,_2,_3}/`, `scheduler/`), read without torch. The module holds
every component; `encode_text` builds SD3's conditioning (CLIP-L + CLIP-G + T5), `velocity` is
the MMDiT, `decode` the VAE with SD3's latent scaling. Nothing is initialised randomly when
weights are loaded: the trainer builds the module abstractly and `load_weights` fills the frozen
state tensor by tensor into its sharding.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import numpy as np
from flax import nnx

from mgrpo_jax.models import base, diffusers_generator, sd3_transformer, text_encoders, weights

CLIP_LENGTH = 77
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
# The loader of each component of `SD3Model`'s state but the VAE
# (`diffusers_generator.load_weights` adds it).
LOADERS = {"transformer": sd3_transformer.load_sd3_transformer,
           "text_encoder": text_encoders.load_clip_text_state,
           "text_encoder_2": text_encoders.load_clip_text_state,
           "text_encoder_3": text_encoders.load_t5_state}


@dataclasses.dataclass(frozen=True)
class SD3Settings(diffusers_generator.DiffusersSettings):
  """How to run an SD3 checkpoint (the `config.model` group of an SD3 experiment).

  The fields of `DiffusersSettings` (`resolution`: also a multiple of 8 x patch size), and:

  Attributes:
    max_sequence_length: T5 tokens (diffusers' default 256).
    use_t5: False drops text_encoder_3 (zeros in its place, as diffusers does without it).
  """

  PIPELINE: ClassVar[str] = "StableDiffusion3Pipeline"

  max_sequence_length: int = 256
  use_t5: bool = True


class SD3Model(diffusers_generator.DiffusersFlowModel):
  """All SD3 networks; implements `models.base.FlowModel`."""

  def __init__(self, settings: SD3Settings, *, rngs: nnx.Rngs):
    super().__init__(settings, sd3_transformer.SD3Transformer,
                     sd3_transformer.SD3TransformerConfig, rngs=rngs)
    clip = lambda name: diffusers_generator.text_encoder(
        settings, name, text_encoders.CLIPTextModelWithProjection, text_encoders.CLIPTextConfig,
        rngs)
    self.text_encoder, self.text_encoder_2 = clip("text_encoder"), clip("text_encoder_2")
    self.text_encoder_3 = diffusers_generator.text_encoder(
        settings, "text_encoder_3", text_encoders.T5EncoderModel, text_encoders.T5Config,
        rngs) if settings.use_t5 else None
    self.t5_width = self.transformer.config.joint_attention_dim
    self.t5_length = settings.max_sequence_length

  def encode_text(self, tokens: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """{'clip_l', 'clip_g' [B, 77], 't5' [B, L]} -> {'hidden' [B, 77 + L, W], 'pooled' [B, P]}."""
    hidden, pooled = text_encoders.encode_sd3_prompt(
        self.text_encoder, self.text_encoder_2, self.text_encoder_3, tokens["clip_l"],
        tokens["clip_g"], tokens.get("t5"), t5_width=self.t5_width, t5_length=self.t5_length)
    return {"hidden": hidden, "pooled": pooled}

  def velocity(self, x, sigma, cond):
    return self.transformer(x, sigma, cond["hidden"], cond["pooled"])


class SD3Tokenizer:
  """The three tokenizers of the directory, padded and truncated as SD3's pipeline does."""

  def __init__(self, settings: SD3Settings):
    load = lambda name: diffusers_generator.load_tokenizer(settings.path, name)
    self.clip_l, self.clip_g = load("tokenizer"), load("tokenizer_2")
    self.t5 = load("tokenizer_3") if settings.use_t5 else None
    self.t5_length = settings.max_sequence_length

  def __call__(self, prompts: list[str]) -> dict[str, np.ndarray]:
    ids = diffusers_generator.token_ids
    out = {"clip_l": ids(self.clip_l, prompts, CLIP_LENGTH),
           "clip_g": ids(self.clip_g, prompts, CLIP_LENGTH)}
    if self.t5 is not None:
      out["t5"] = ids(self.t5, prompts, self.t5_length)
    return out


def make_generator(settings: SD3Settings) -> base.Generator:
  required = COMPONENTS if settings.use_t5 else COMPONENTS[:4]
  weights.check_pipeline_components(
      settings.path, "StableDiffusion3Pipeline", required,
      hints={"text_encoder_3": " (or set config.model.use_t5=False)"})
  return diffusers_generator.make_generator("sd3", settings, SD3Model, SD3Tokenizer(settings),
                                            LOADERS)
