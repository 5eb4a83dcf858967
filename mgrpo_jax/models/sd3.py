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
import os


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgrpo_jax import sharding as sharding_lib

from mgrpo_jax.models import base, sd3_transformer, sd3_vae, text_encoders, weights

CLIP_LENGTH = 77
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclasses.dataclass(frozen=True)
class SD3Settings:
  """How to run a checkpoint (the `config.model` group of an SD3 experiment).

  Attributes:
    path: the diffusers directory.
    resolution: image side in pixels (a multiple of 8 x patch size).
    max_sequence_length: T5 tokens (diffusers' default 256).
    use_t5: False drops text_encoder_3 (zeros in its place, as diffusers does without it).
    dtype: compute dtype ("bfloat16" on accelerators).
    param_dtype: dtype weights are loaded in.
    remat: rematerialise transformer blocks in the backward pass.
    attention: attention kernel ("auto", "xla", "cudnn", "splash"; models/attention.py).
  """

  path: str
  resolution: int = 512
  max_sequence_length: int = 256
  use_t5: bool = True
  dtype: str = "bfloat16"
  param_dtype: str = "bfloat16"
  remat: bool = False
  attention: str = "auto"

  def __post_init__(self):
    from mgrpo_jax import hub  # pylint: disable=import-outside-toplevel
    object.__setattr__(self, "path", hub.pipeline_dir(self.path))  # a Hub id -> its snapshot
    weights.check_pipeline_dir(self.path, "StableDiffusion3Pipeline", self.resolution)


def _component(settings: SD3Settings, name: str) -> str:
  return os.path.join(settings.path, name)


class SD3Model(nnx.Module):
  """All SD3 networks; implements `models.base.FlowModel`."""

  def __init__(self, settings: SD3Settings, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(settings.dtype), jnp.dtype(settings.param_dtype)
    read = lambda name: weights.read_config(_component(settings, name))
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.transformer = sd3_transformer.SD3Transformer(
        sd3_transformer.SD3TransformerConfig.from_diffusers_config(
            read("transformer"), remat=settings.remat, attention=settings.attention,
            **kw), rngs=rngs)
    # The VAE decodes in float32: bf16 convs over 512 px images cost visible banding.
    self.vae = sd3_vae.AutoencoderKL(sd3_vae.VAEConfig.from_diffusers_config(
        read("vae"), param_dtype=param_dtype), rngs=rngs)
    self.text_encoder = text_encoders.CLIPTextModelWithProjection(
        text_encoders.CLIPTextConfig.from_hf_config(read("text_encoder"), **kw), rngs=rngs)
    self.text_encoder_2 = text_encoders.CLIPTextModelWithProjection(
        text_encoders.CLIPTextConfig.from_hf_config(read("text_encoder_2"), **kw), rngs=rngs)
    self.text_encoder_3 = text_encoders.T5EncoderModel(
        text_encoders.T5Config.from_hf_config(read("text_encoder_3"), **kw),
        rngs=rngs) if settings.use_t5 else None
    self.t5_width = self.transformer.config.joint_attention_dim
    self.t5_length = settings.max_sequence_length
    side = settings.resolution // self.vae.config.downsample_factor
    self.latent_shape = (side, side, self.transformer.config.in_channels)
    self.image_shape = (settings.resolution, settings.resolution, 3)

  def encode_text(self, tokens: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """{'clip_l', 'clip_g' [B, 77], 't5' [B, L]} -> {'hidden' [B, 77 + L, W], 'pooled' [B, P]}."""
    hidden, pooled = text_encoders.encode_sd3_prompt(
        self.text_encoder, self.text_encoder_2, self.text_encoder_3, tokens["clip_l"],
        tokens["clip_g"], tokens.get("t5"), t5_width=self.t5_width, t5_length=self.t5_length)
    return {"hidden": hidden, "pooled": pooled}

  def velocity(self, x, sigma, cond):
    return self.transformer(x, sigma, cond["hidden"], cond["pooled"])

  def decode(self, latents):
    return self.vae.latents_to_images(latents)


class SD3Tokenizer:
  """The three tokenizers of the directory, padded and truncated as SD3's pipeline does."""

  def __init__(self, settings: SD3Settings):
    # Only tokenizers are used: no "PyTorch was not found" advice when torch is absent.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    load = lambda name: AutoTokenizer.from_pretrained(_component(settings, name),
                                                      local_files_only=True)
    self.clip_l, self.clip_g = load("tokenizer"), load("tokenizer_2")
    self.t5 = load("tokenizer_3") if settings.use_t5 else None
    self.t5_length = settings.max_sequence_length

  def __call__(self, prompts: list[str]) -> dict[str, np.ndarray]:
    prompts = list(prompts)
    enc = lambda tok, n: np.asarray(tok(prompts, padding="max_length", max_length=n,
                                        truncation=True)["input_ids"], np.int32)
    out = {"clip_l": enc(self.clip_l, CLIP_LENGTH), "clip_g": enc(self.clip_g, CLIP_LENGTH)}
    if self.t5 is not None:
      out["t5"] = enc(self.t5, self.t5_length)
    return out


def load_weights(settings: SD3Settings, abstract_state: nnx.State, mesh=None) -> nnx.State:
  """Fills the (frozen) state of `SD3Model` from the directory, component by component.

  Args:
    settings: the checkpoint.
    abstract_state: the state to fill (top-level keys = components); arrays or
      ShapeDtypeStructs, placed by their logical axes on `mesh` (or their `.sharding`).
    mesh: device mesh.

  Raises:
    CheckpointError / ValueError / FileNotFoundError naming the component and tensor.
  """
  loaders = {
      "transformer": sd3_transformer.load_sd3_transformer,
      "vae": sd3_vae.load_sd3_vae,
      "text_encoder": text_encoders.load_clip_text_state,
      "text_encoder_2": text_encoders.load_clip_text_state,
      "text_encoder_3": text_encoders.load_t5_state,
  }
  return weights.load_components(settings.path, abstract_state, loaders, mesh, "SD3")


def make_generator(settings: SD3Settings) -> base.Generator:
  required = COMPONENTS if settings.use_t5 else COMPONENTS[:4]
  weights.check_pipeline_components(
      settings.path, "StableDiffusion3Pipeline", required,
      hints={"text_encoder_3": " (or set config.model.use_t5=False)"})
  with sharding_lib.fast_module_tracing():
    shapes = nnx.eval_shape(lambda: SD3Model(settings, rngs=nnx.Rngs(0)))
  return base.Generator(
      name="sd3",
      make_module=lambda rngs: SD3Model(settings, rngs=rngs),
      tokenize=SD3Tokenizer(settings),
      latent_shape=shapes.latent_shape,
      image_shape=shapes.image_shape,
      load_weights=lambda abstract, mesh: load_weights(settings, abstract, mesh))
