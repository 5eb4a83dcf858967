"""Reward registry: rewards are chosen by name from `config.reward.names`.

A reward is a callable `fn(images, prompts, metadata) -> float32 [N]` with
  images:   uint8 [N, H, W, 3] (RGB),
  prompts:  N strings,
  metadata: N dicts (the prompt record's metadata, e.g. {'text', 'color'} for OCR-Color-10).
Per-image rewards subclass `PerImageReward` and implement `score_one`; the host runner then
spreads their images over its thread pool.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mgrpo_jax import registry_utils

_REWARDS = registry_utils.Registry("reward", "unknown reward {name!r}; available: {known}")
# Where each registered reward runs: "host" (the host pool, per image or per batch), "remote"
# (a batch call to a server, from a host thread) or "device" (a learned model jitted on the
# policy's mesh, built with `factory(reward_config=..., mesh=...)`).
PLACEMENTS = ("host", "remote", "device")
_PLACEMENT: dict[str, str] = {}


def register(name: str, placement: str = "host"):
  """Class or factory decorator `@register("ocr")`; kwargs of `get_reward` go to it.

  Args:
    name: the name configs select it by (config.reward.names).
    placement: where it runs, one of PLACEMENTS.
  """
  if placement not in PLACEMENTS:
    raise ValueError(f"reward {name!r}: placement must be one of {PLACEMENTS}, got "
                     f"{placement!r}")
  add = _REWARDS.register(name)

  def decorator(factory):
    add(factory)
    _PLACEMENT[name] = placement
    return factory

  return decorator


def available_rewards() -> list[str]:
  """Sorted names of the registered rewards."""
  return _REWARDS.names()


def reward_factory(name: str):
  """The class or function registered as `name` (what `get_reward` calls).

  Raises:
    ValueError: unknown name (the message lists the registered ones).
  """
  return _REWARDS.get(name)


def placement(name: str) -> str:
  """Where the reward registered as `name` runs (one of PLACEMENTS).

  Raises:
    ValueError: unknown name (the message lists the registered ones).
  """
  _REWARDS.get(name)
  return _PLACEMENT[name]


def get_reward(name: str, **kwargs):
  """Builds the reward registered as `name`.

  Raises:
    ValueError: unknown name (the message lists the registered ones).
  """
  return reward_factory(name)(**kwargs)


def check_batch(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict]) -> None:
  """Raises ValueError unless images is uint8 [N, H, W, 3] with N prompts and N metadata."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"reward images must be uint8 [N, H, W, 3], got {images.dtype} "
                     f"{images.shape}")
  if len(prompts) != len(images) or len(metadata) != len(images):
    raise ValueError(f"{len(images)} images but {len(prompts)} prompts and {len(metadata)} "
                     "metadata entries")


class PerImageReward:
  """A reward computed independently per image (`score_one`), so it parallelises over images."""

  per_image = True

  def score_one(self, image: np.ndarray, prompt: str, metadata: dict) -> float:
    """The reward of one uint8 [H, W, 3] image for its prompt and metadata."""
    raise NotImplementedError(f"{type(self).__name__} does not implement score_one")

  def __call__(self, images, prompts, metadata) -> np.ndarray:
    """uint8 [N, H, W, 3], N prompts, N metadata dicts -> float32 [N] (images one by one)."""
    check_batch(images, prompts, metadata)
    return np.asarray([self.score_one(im, p, m) for im, p, m in zip(images, prompts, metadata)],
                      np.float32)
