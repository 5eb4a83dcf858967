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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgrpo_jax import sharding as sharding_lib

from mgrpo_jax.models import base, flux_transformer, sd3_vae, text_encoders, weights
from mgrpo_jax.sampling import schedule

CLIP_LENGTH = 77
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler")
# scheduler_config.json keys that change FluxPipeline's schedule in ways not implemented here.
_UNSUPPORTED_SCHEDULER = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                          "use_beta_sigmas", "invert_sigmas", "use_flow_sigmas")


@dataclasses.dataclass(frozen=True)
class FluxSettings:
  """How to run a checkpoint (the `config.model` group of a FLUX experiment).

  Attributes:
    path: the diffusers directory.
    resolution: image side in pixels (a multiple of 16: 8x VAE, then 2 x 2 packing).
    max_sequence_length: T5 tokens (FluxPipeline's default 512).
    guidance: the distilled guidance scale fed to FLUX.1-dev's transformer (ignored by models
      without `guidance_embeds`, e.g. schnell).
    dtype: compute dtype ("bfloat16" on accelerators).
    param_dtype: dtype weights are loaded in.
    remat: rematerialise transformer blocks in the backward pass.
    attention: attention kernel ("auto", "xla", "cudnn", "splash"; models/attention.py).
  """

  path: str
  resolution: int = 512
  max_sequence_length: int = 512
  guidance: float = 3.5
  dtype: str = "bfloat16"
  param_dtype: str = "bfloat16"
  remat: bool = False
  attention: str = "auto"

  def __post_init__(self):
    from mgrpo_jax import hub  # pylint: disable=import-outside-toplevel
    object.__setattr__(self, "path", hub.pipeline_dir(self.path))  # a Hub id -> its snapshot
    weights.check_pipeline_dir(self.path, "FluxPipeline", self.resolution)


def _component(settings: FluxSettings, name: str) -> str:
  return os.path.join(settings.path, name)


class FluxModel(nnx.Module):
  """All FLUX networks; implements `models.base.FlowModel`."""

  def __init__(self, settings: FluxSettings, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(settings.dtype), jnp.dtype(settings.param_dtype)
    read = lambda name: weights.read_config(_component(settings, name))
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.transformer = flux_transformer.FluxTransformer(
        flux_transformer.FluxTransformerConfig.from_diffusers_config(
            read("transformer"), remat=settings.remat, attention=settings.attention,
            **kw), rngs=rngs)
    # float32 decoding, as for SD3 (bf16 convs band visibly at 512 px).
    self.vae = sd3_vae.AutoencoderKL(sd3_vae.VAEConfig.from_diffusers_config(
        read("vae"), param_dtype=param_dtype), rngs=rngs)
    self.text_encoder = text_encoders.CLIPTextModel(
        text_encoders.CLIPTextConfig.from_hf_config(read("text_encoder"), **kw), rngs=rngs)
    self.text_encoder_2 = text_encoders.T5EncoderModel(
        text_encoders.T5Config.from_hf_config(read("text_encoder_2"), **kw), rngs=rngs)
    tcfg = self.transformer.config
    self.guidance = float(settings.guidance) if tcfg.guidance_embeds else None
    side = settings.resolution // self.vae.config.downsample_factor
    if side % flux_transformer.PACK:
      raise ValueError(f"resolution {settings.resolution} gives an odd latent side {side}; FLUX "
                       "packs 2 x 2 latent patches")
    self.latent_shape = (side, side, tcfg.latent_channels)
    self.image_shape = (settings.resolution, settings.resolution, 3)

  def encode_text(self, tokens: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """{'clip' [B, 77], 't5' [B, L]} -> {'hidden' [B, L, 4096] T5 states, 'pooled' [B, 768]}."""
    pooled = self.text_encoder(tokens["clip"])["pooled"]
    hidden = self.text_encoder_2(tokens["t5"])
    return {"hidden": hidden.astype(jnp.float32), "pooled": pooled.astype(jnp.float32)}

  def velocity(self, x, sigma, cond):
    guidance = None if self.guidance is None else jnp.full(sigma.shape, self.guidance, jnp.float32)
    return self.transformer(x, sigma, cond["hidden"], cond["pooled"], guidance)

  def decode(self, latents):
    return self.vae.latents_to_images(latents)


class FluxTokenizer:
  """CLIP and T5 tokenizers of the directory, padded and truncated as FluxPipeline does."""

  def __init__(self, settings: FluxSettings):
    # Only tokenizers are used: no "PyTorch was not found" advice when torch is absent.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    load = lambda name: AutoTokenizer.from_pretrained(_component(settings, name),
                                                      local_files_only=True)
    self.clip, self.t5 = load("tokenizer"), load("tokenizer_2")
    self.t5_length = settings.max_sequence_length

  def __call__(self, prompts: list[str]) -> dict[str, np.ndarray]:
    prompts = list(prompts)
    enc = lambda tok, n: np.asarray(tok(prompts, padding="max_length", max_length=n,
                                        truncation=True)["input_ids"], np.int32)
    return {"clip": enc(self.clip, CLIP_LENGTH), "t5": enc(self.t5, self.t5_length)}


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


def load_weights(settings: FluxSettings, abstract_state: nnx.State, mesh=None) -> nnx.State:
  """Fills the (frozen) state of `FluxModel` from the directory, component by component.

  Raises:
    CheckpointError / ValueError / FileNotFoundError naming the component and tensor.
  """
  loaders = {
      "transformer": flux_transformer.load_flux_transformer,
      "vae": sd3_vae.load_sd3_vae,
      "text_encoder": text_encoders.load_clip_text_state,
      "text_encoder_2": text_encoders.load_t5_state,
  }
  return weights.load_components(settings.path, abstract_state, loaders, mesh, "FLUX")


def make_generator(settings: FluxSettings) -> base.Generator:
  weights.check_pipeline_components(settings.path, "FluxPipeline", COMPONENTS)
  with sharding_lib.fast_module_tracing():
    shapes = nnx.eval_shape(lambda: FluxModel(settings, rngs=nnx.Rngs(0)))
  h, w, _ = shapes.latent_shape
  return base.Generator(
      name="flux",
      make_module=lambda rngs: FluxModel(settings, rngs=rngs),
      tokenize=FluxTokenizer(settings),
      latent_shape=shapes.latent_shape,
      image_shape=shapes.image_shape,
      load_weights=lambda abstract, mesh: load_weights(settings, abstract, mesh),
      sigmas=scheduler_sigmas(settings, (h // 2) * (w // 2)))
