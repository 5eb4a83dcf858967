"""Generators by name: `config.model.name` selects a builder, the other fields are its arguments.

  config.model = registry.default_tiny_model_config()      # name='tiny' + TinyConfig fields
  generator = registry.get_generator(config.model)          # -> models.base.Generator

A builder takes the model's config group and returns a `Generator`; new architectures register
with `@register("name")`.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from flax import nnx

from mgrpo_jax import registry_utils
from mgrpo_jax.models import base
from mgrpo_jax.models import tiny_mmdit
from mgrpo_jax.models.tokenizer import ByteTokenizer

_GENERATORS = registry_utils.Registry(
    "generator", "config.model.name={name!r} is not a registered generator; known: {known}")
# `@register("name")` on a builder `model_config -> base.Generator`.
register = _GENERATORS.register


def available_generators() -> list[str]:
  return _GENERATORS.names()


def get_generator(model_config: ml_collections.ConfigDict) -> base.Generator:
  """Builds the generator named by `model_config.name`.

  Raises:
    ValueError: unknown name (lists the known ones) or fields the builder does not accept.
  """
  return _GENERATORS.get(model_config.get("name"))(model_config)


def _fields(model_config, cls) -> dict:
  known = {f.name for f in dataclasses.fields(cls)}
  given = {k: v for k, v in model_config.items() if k != "name"}
  unknown = sorted(set(given) - known)
  if unknown:
    raise ValueError(f"config.model has fields {unknown} that {cls.__name__} does not know "
                     f"(known: {sorted(known)})")
  return given


def _settings_config(name: str, settings_cls, path: str) -> ml_collections.ConfigDict:
  """A `config.model` group holding every field of a settings dataclass, with its default."""
  config = ml_collections.ConfigDict()
  config.name = name
  for field in dataclasses.fields(settings_cls):
    setattr(config, field.name, path if field.name == "path" else field.default)
  return config


def default_tiny_model_config() -> ml_collections.ConfigDict:
  """The tiny default generator's config group (every TinyConfig field, with its default)."""
  return _settings_config("tiny", tiny_mmdit.TinyConfig, "")


@register("tiny")
def _tiny(model_config) -> base.Generator:
  cfg = tiny_mmdit.TinyConfig(**_fields(model_config, tiny_mmdit.TinyConfig))
  return base.Generator(
      name="tiny",
      make_module=lambda rngs: tiny_mmdit.TinyT2I(cfg, rngs=rngs),
      tokenize=ByteTokenizer(cfg.text_length),
      latent_shape=cfg.latent_shape,
      image_shape=cfg.image_shape)


def tiny_text_model_config(path: str | None = None) -> ml_collections.ConfigDict:
  """The pretrained pixel-space text renderer's config group (`models/tiny_pixel.py`); `path`
  defaults to the weights shipped in the package ('' = random init)."""
  from mgrpo_jax.models import tiny_pixel  # pylint: disable=import-outside-toplevel
  return _settings_config("tiny_text", tiny_pixel.TinyPixelConfig,
                          tiny_pixel.ASSET_DIR if path is None else path)


@register("tiny_text")
def _tiny_text(model_config) -> base.Generator:
  from mgrpo_jax.models import tiny_pixel  # pylint: disable=import-outside-toplevel
  cfg = tiny_pixel.TinyPixelConfig(**_fields(model_config, tiny_pixel.TinyPixelConfig))
  if cfg.path:
    tiny_pixel.check_architecture(cfg)
  return base.Generator(
      name="tiny_text",
      make_module=lambda rngs: tiny_pixel.TinyPixelT2I(cfg, rngs=rngs),
      tokenize=tiny_pixel.PromptTokenizer(cfg.text_length),
      latent_shape=cfg.latent_shape,
      image_shape=cfg.image_shape,
      load_weights=(lambda abstract, mesh: tiny_pixel.load_weights(cfg, abstract, mesh))
      if cfg.path else None)


def sd3_model_config(path: str = "") -> ml_collections.ConfigDict:
  """The config group of an SD3 / SD3.5 generator read from a local diffusers directory."""
  from mgrpo_jax.models import sd3  # pylint: disable=import-outside-toplevel
  return _settings_config("sd3", sd3.SD3Settings, path)


def flux_model_config(path: str = "") -> ml_collections.ConfigDict:
  """The config group of a FLUX.1 generator read from a local diffusers directory."""
  from mgrpo_jax.models import flux  # pylint: disable=import-outside-toplevel
  return _settings_config("flux", flux.FluxSettings, path)


# The pipelines import torch-free but heavy modules; they load when first used.
@register("sd3")
def _sd3(model_config) -> base.Generator:
  from mgrpo_jax.models import sd3  # pylint: disable=import-outside-toplevel
  return sd3.make_generator(sd3.SD3Settings(**_fields(model_config, sd3.SD3Settings)))


@register("flux")
def _flux(model_config) -> base.Generator:
  from mgrpo_jax.models import flux  # pylint: disable=import-outside-toplevel
  return flux.make_generator(flux.FluxSettings(**_fields(model_config, flux.FluxSettings)))


def make_module(model_config, seed: int = 0) -> nnx.Module:
  """Convenience: the generator's module, random-initialised eagerly (tests, notebooks)."""
  return get_generator(model_config).make_module(nnx.Rngs(seed))
