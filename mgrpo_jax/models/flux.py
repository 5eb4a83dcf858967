"""FLUX.1 (dev / schnell) behind the generator interface, from a local diffusers directory.

  config.model = registry.flux_model_config("/path/to/FLUX.1-dev")
  generator = registry.get_generator(config.model)

The directory is the diffusers `FluxPipeline` layout (`model_index.json`, `transformer/`, `vae/`,
`text_encoder/` (CLIP-L text model), `text_encoder_2/` (T5 v1.1 XXL encoder), `tokenizer{,_2}/`,
`scheduler/`), read without torch. As FluxPipeline does: the conditioning is the T5 states and
the pooled CLIP output; FLUX.1-dev is guidance-distilled, so the guidance scale
(`config.model.guidance`, 3.5 by default) is an input of the transformer and sampling runs the
model once per step (set `config.sample.guidance_scale = 1.0`, no negative prompt); the
schedule comes from `scheduler/scheduler_config.json` with the resolution-dependent shift
(`Generator.sigmas`, so `config.sample.shift` is not used); the VAE is SD3's with FLUX's
scaling and shift factors from its config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgrpo_jax.models import base, diffusers_generator, flux_transformer, text_encoders, weights
from mgrpo_jax.sampling import schedule

CLIP_LENGTH = 77
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler")
# The loader of each component of `FluxModel`'s state but the VAE
# (`diffusers_generator.load_weights` adds it).
LOADERS = {"transformer": flux_transformer.load_flux_transformer,
           "text_encoder": text_encoders.load_clip_text_state,
           "text_encoder_2": text_encoders.load_t5_state}
# scheduler_config.json keys that change FluxPipeline's schedule in ways not implemented here.
_UNSUPPORTED_SCHEDULER = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                          "use_beta_sigmas", "invert_sigmas", "use_flow_sigmas")


@dataclasses.dataclass(frozen=True)
class FluxSettings(diffusers_generator.DiffusersSettings):
  """How to run a FLUX checkpoint (the `config.model` group of a FLUX experiment).

  The fields of `DiffusersSettings` (`resolution`: a multiple of 16, for the 8x VAE and the
  2 x 2 packing), and:

  Attributes:
    max_sequence_length: T5 tokens (FluxPipeline's default 512).
    guidance: the distilled guidance scale fed to FLUX.1-dev's transformer (ignored by models
      without `guidance_embeds`, e.g. schnell).
  """

  PIPELINE: ClassVar[str] = "FluxPipeline"

  max_sequence_length: int = 512
  guidance: float = 3.5


class FluxModel(diffusers_generator.DiffusersFlowModel):
  """All FLUX networks; implements `models.base.FlowModel`."""

  def __init__(self, settings: FluxSettings, *, rngs: nnx.Rngs):
    super().__init__(settings, flux_transformer.FluxTransformer,
                     flux_transformer.FluxTransformerConfig, rngs=rngs)
    side = self.latent_shape[0]
    if side % flux_transformer.PACK:
      raise ValueError(f"resolution {settings.resolution} gives an odd latent side {side}; FLUX "
                       "packs 2 x 2 latent patches")
    self.text_encoder = diffusers_generator.text_encoder(
        settings, "text_encoder", text_encoders.CLIPTextModel, text_encoders.CLIPTextConfig, rngs)
    self.text_encoder_2 = diffusers_generator.text_encoder(
        settings, "text_encoder_2", text_encoders.T5EncoderModel, text_encoders.T5Config, rngs)
    guided = self.transformer.config.guidance_embeds
    self.guidance = float(settings.guidance) if guided else None

  def encode_text(self, tokens: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """{'clip' [B, 77], 't5' [B, L]} -> {'hidden' [B, L, 4096] T5 states, 'pooled' [B, 768]}."""
    pooled = self.text_encoder(tokens["clip"])["pooled"]
    hidden = self.text_encoder_2(tokens["t5"])
    return {"hidden": hidden.astype(jnp.float32), "pooled": pooled.astype(jnp.float32)}

  def velocity(self, x, sigma, cond):
    guidance = None if self.guidance is None else jnp.full(sigma.shape, self.guidance, jnp.float32)
    return self.transformer(x, sigma, cond["hidden"], cond["pooled"], guidance)


class FluxTokenizer:
  """CLIP and T5 tokenizers of the directory, padded and truncated as FluxPipeline does."""

  def __init__(self, settings: FluxSettings):
    load = lambda name: diffusers_generator.load_tokenizer(settings.path, name)
    self.clip, self.t5 = load("tokenizer"), load("tokenizer_2")
    self.t5_length = settings.max_sequence_length

  def __call__(self, prompts: list[str]) -> dict[str, np.ndarray]:
    ids = diffusers_generator.token_ids
    return {"clip": ids(self.clip, prompts, CLIP_LENGTH),
            "t5": ids(self.t5, prompts, self.t5_length)}


def scheduler_sigmas(settings: FluxSettings, image_seq_len: int):
  """`num_steps -> sigmas` following `scheduler/scheduler_config.json` (see schedule.flux_sigmas).

  Raises:
    FileNotFoundError: no scheduler_config.json.
    ValueError: a scheduler option that would change the schedule and is not implemented.
  """
  path = os.path.join(settings.path, "scheduler", "scheduler_config.json")
  if not os.path.isfile(path):  # its shift settings decide the schedule: no silent default
    raise FileNotFoundError(f"{path} not found (FLUX's sigma schedule is read from it)")
  with open(path) as f:
    config = json.load(f)
  used = [k for k in _UNSUPPORTED_SCHEDULER if config.get(k)]
  if used or config.get("time_shift_type", "exponential") != "exponential":
    raise ValueError(f"{path}: scheduler options {used or ['time_shift_type']} are not supported "
                     "(FluxPipeline's default FlowMatchEulerDiscreteScheduler is)")
  kwargs = dict(dynamic=bool(config.get("use_dynamic_shifting", False)),
                shift=float(config.get("shift", 1.0)),
                base_seq_len=int(config.get("base_image_seq_len", 256)),
                max_seq_len=int(config.get("max_image_seq_len", 4096)),
                base_shift=float(config.get("base_shift", 0.5)),
                max_shift=float(config.get("max_shift", 1.15)))
  return lambda num_steps: schedule.flux_sigmas(num_steps, image_seq_len, **kwargs)


def make_generator(settings: FluxSettings) -> base.Generator:
  weights.check_pipeline_components(settings.path, "FluxPipeline", COMPONENTS)
  generator = diffusers_generator.make_generator("flux", settings, FluxModel,
                                                 FluxTokenizer(settings), LOADERS)
  h, w, _ = generator.latent_shape
  return dataclasses.replace(generator, sigmas=scheduler_sigmas(settings, (h // 2) * (w // 2)))
