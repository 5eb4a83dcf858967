"""What the SD3 and FLUX generators share: a local diffusers directory read without torch.

`sd3.py` and `flux.py` each keep what differs (settings, text encoders and conditioning, the
tokenizers they pad, weight loaders per component, FLUX's schedule); the rest is here:

  class FluxSettings(DiffusersSettings): ...   # path (Hub id -> directory), dtypes, ...
  class FluxModel(DiffusersFlowModel): ...     # transformer + float32 VAE, shapes, decode
  text_encoder(settings, "text_encoder_2", T5EncoderModel, T5Config, rngs)
  token_ids(load_tokenizer(path, "tokenizer_2"), prompts, 512)  # int32 [B, 512]
  make_generator("flux", settings, FluxModel, FluxTokenizer(settings), LOADERS)

`settings` is the generator's `DiffusersSettings`; the fields read here are `path`,
`resolution`, `dtype`, `param_dtype`, `remat` and `attention`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, ClassVar, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax.models import base, sd3_vae, weights


@dataclasses.dataclass(frozen=True)
class DiffusersSettings:
  """How to run a checkpoint (the `config.model` group); subclasses name their diffusers
  pipeline class in `PIPELINE` and add their own fields (which come after these).

  Attributes:
    path: the diffusers directory; a Hugging Face Hub id is replaced by its local snapshot.
    resolution: image side in pixels (a multiple of 16).
    max_sequence_length: T5 tokens.
    dtype: compute dtype ("bfloat16" on accelerators).
    param_dtype: dtype weights are loaded in.
    remat: rematerialise transformer blocks in the backward pass.
    attention: attention kernel ("auto", "xla", "cudnn", "splash"; models/attention.py).

  Raises:
    ValueError / FileNotFoundError: no diffusers `PIPELINE` directory at `path`, or a bad
      resolution (`weights.check_pipeline_dir`).
  """

  PIPELINE: ClassVar[str] = ""

  path: str
  resolution: int = 512
  max_sequence_length: int = 256
  dtype: str = "bfloat16"
  param_dtype: str = "bfloat16"
  remat: bool = False
  attention: str = "auto"

  def __post_init__(self):
    from mgrpo_jax import hub  # pylint: disable=import-outside-toplevel
    object.__setattr__(self, "path", hub.pipeline_dir(self.path))  # a Hub id -> its snapshot
    weights.check_pipeline_dir(self.path, self.PIPELINE, self.resolution)


def _read_config(settings: DiffusersSettings, component: str) -> dict[str, Any]:
  return weights.read_config(os.path.join(settings.path, component))


def _dtypes(settings: DiffusersSettings) -> dict[str, Any]:
  return dict(dtype=jnp.dtype(settings.dtype), param_dtype=jnp.dtype(settings.param_dtype))


class DiffusersFlowModel(nnx.Module):
  """The transformer and VAE of a diffusers directory, the shapes they imply, and `decode`.

  Subclasses add their text encoders, `encode_text` and `velocity` (`models.base.FlowModel`).

  Args:
    settings: the checkpoint and how to run it.
    transformer_cls: the transformer module, built from `transformer_config_cls
      .from_diffusers_config(transformer/config.json)`; its config has `latent_channels`.
    rngs: initialisers' keys (the module is normally built abstractly and loaded).
  """

  def __init__(self, settings: DiffusersSettings, transformer_cls: type,
               transformer_config_cls: type, *, rngs: nnx.Rngs):
    self.transformer = transformer_cls(transformer_config_cls.from_diffusers_config(
        _read_config(settings, "transformer"), remat=settings.remat,
        attention=settings.attention, **_dtypes(settings)), rngs=rngs)
    # The VAE decodes in float32: bf16 convs over 512 px images cost visible banding.
    self.vae = sd3_vae.AutoencoderKL(sd3_vae.VAEConfig.from_diffusers_config(
        _read_config(settings, "vae"), param_dtype=jnp.dtype(settings.param_dtype)), rngs=rngs)
    side = settings.resolution // self.vae.config.downsample_factor
    self.latent_shape = (side, side, self.transformer.config.latent_channels)
    self.image_shape = (settings.resolution, settings.resolution, 3)

  def decode(self, latents):
    return self.vae.latents_to_images(latents)


def text_encoder(settings: DiffusersSettings, component: str, module_cls: type, config_cls: type,
                 rngs: nnx.Rngs) -> nnx.Module:
  """`module_cls` of the transformers config.json in `component/`, in the settings' dtypes."""
  config = config_cls.from_hf_config(_read_config(settings, component), **_dtypes(settings))
  return module_cls(config, rngs=rngs)


def load_tokenizer(path: str, component: str):
  """The transformers tokenizer in `path/component` (local files only)."""
  # Only tokenizers are used: no "PyTorch was not found" advice when torch is absent.
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  return AutoTokenizer.from_pretrained(os.path.join(path, component), local_files_only=True)


def token_ids(tokenizer, prompts: Sequence[str], length: int) -> np.ndarray:
  """int32 [B, length] ids, padded to and truncated at `length` as the diffusers pipelines do."""
  return np.asarray(tokenizer(list(prompts), padding="max_length", max_length=length,
                              truncation=True)["input_ids"], np.int32)


def load_weights(settings: DiffusersSettings, abstract_state: nnx.State,
                 loaders: dict[str, Callable[..., nnx.State]], mesh=None) -> nnx.State:
  """Fills the (frozen) state of a `DiffusersFlowModel` from the directory, by component.

  Args:
    settings: the checkpoint.
    abstract_state: the state to fill (top-level keys = components); arrays or
      ShapeDtypeStructs, placed by their logical axes on `mesh` (or their `.sharding`).
    loaders: `component -> loader(directory, state, mesh=)` of every component but the VAE
      (`sd3_vae.load_sd3_vae` for all of these models).
    mesh: device mesh.

  Raises:
    CheckpointError / ValueError / FileNotFoundError naming the component and tensor.
  """
  return weights.load_components(settings.path, abstract_state,
                                 {"vae": sd3_vae.load_sd3_vae, **loaders}, mesh, settings.PIPELINE)


def make_generator(name: str, settings: DiffusersSettings, module_cls: type,
                   tokenize: Callable[[list[str]], dict[str, np.ndarray]],
                   loaders: dict[str, Callable[..., nnx.State]]) -> base.Generator:
  """The `base.Generator` of `module_cls(settings, rngs=)`, its shapes from an abstract build;
  `loaders` fill its state as in `load_weights`."""
  with sharding_lib.fast_module_tracing():
    shapes = nnx.eval_shape(lambda: module_cls(settings, rngs=nnx.Rngs(0)))
  return base.Generator(
      name=name,
      make_module=lambda rngs: module_cls(settings, rngs=rngs),
      tokenize=tokenize,
      latent_shape=shapes.latent_shape,
      image_shape=shapes.image_shape,
      load_weights=lambda abstract, mesh: load_weights(settings, abstract, loaders, mesh))
