"""The one interface every text-to-image generator implements for the RL loop.

A generator is a Flax NNX module with three methods and a host-side tokenizer:

  tokenize(prompts)            host: list[str] -> dict of int32 numpy arrays [B, L]
  model.encode_text(tokens)    device: tokens -> Conditioning (pytree, leading axis B)
  model.velocity(x, sigma, c)  device: latents [B, h, w, c] f32, sigma [B] f32 in [0, 1],
                               Conditioning [B, ...] -> velocity [B, h, w, c] f32
  model.decode(latents)        device: latents [B, h, w, c] -> images [B, H, W, 3] f32 in [0, 1]

Latents are NHWC. `sigma` is the flow-matching noise level (x_sigma = (1 - sigma) x0 + sigma eps);
a model that expects diffusers' timesteps multiplies by 1000 itself.

The RL code never calls modules directly: it splits the module once into a graph definition and
states (`nnx.split`), and calls the pure functions below, so everything jits with explicit
shardings and the reference policy is the same graph with the LoRA state zeroed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import numpy as np
from flax import nnx

Conditioning = Any  # a pytree of arrays whose leaves all have the batch as leading axis


class FlowModel(Protocol):
  """What a generator module provides (see module docstring for shapes)."""

  latent_shape: tuple[int, int, int]  # (h, w, c) of one latent
  image_shape: tuple[int, int, int]  # (H, W, 3) of one decoded image

  def encode_text(self, tokens: dict[str, jax.Array]) -> Conditioning:
    ...

  def velocity(self, x: jax.Array, sigma: jax.Array, cond: Conditioning) -> jax.Array:
    ...

  def decode(self, latents: jax.Array) -> jax.Array:
    ...


@dataclasses.dataclass(frozen=True)
class Generator:
  """A constructed generator: how to build its module and tokenize its prompts.

  Attributes:
    name: registry name.
    make_module: `rngs -> FlowModel` building the module (random init). Called under
      `nnx.eval_shape` for abstract shapes and under `jax.jit` for sharded init.
    tokenize: host function `list[str] -> dict[str, np.ndarray]` (int32 [B, L] arrays).
    latent_shape: (h, w, c).
    image_shape: (H, W, 3).
    load_weights: optional `(abstract_state, shardings) -> state` that reads real weights from
      disk; None for random-init models.
    sigmas: optional `num_steps -> float32 [T + 1]` schedule of the checkpoint's own scheduler
      (FLUX's resolution-dependent shift); None means SD3's shifted schedule with
      `config.sample.shift` (`sampling.schedule.flow_match_sigmas`).
  """

  name: str
  make_module: Callable[[nnx.Rngs], FlowModel]
  tokenize: Callable[[list[str]], dict[str, np.ndarray]]
  latent_shape: tuple[int, int, int]
  image_shape: tuple[int, int, int]
  load_weights: Callable[..., Any] | None = None
  sigmas: Callable[[int], np.ndarray] | None = None
