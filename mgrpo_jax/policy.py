"""The policy: a generator module split into trainable and frozen states, and its optimizer.

Owns everything about the weights, nothing about sampling or the loss:
  build_model_states(generator, config, mesh) -> (graphdef, trainable, frozen), every array
      created in its sharding (LoRA: trainable = adapters, frozen = base weights; full
      fine-tuning: trainable = all weights, frozen = a copy kept as the KL reference);
  Policy(graphdef, lora): pure functions of (trainable, frozen); the reference policy is the
      same graph with the adapters zeroed (or the frozen copy);
  make_optimizer(config) / init_opt_state(tx, trainable, mesh): optax chain and its sharded state.
Sampling, evaluation and export build the states and the Policy without the optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax.models import lora as lora_lib


# ---- the policy as pure functions of (trainable, frozen) states ----------------------------------
@dataclasses.dataclass(frozen=True)
class Policy:
  """Pure-function view of a generator module split into trainable and frozen states.

  With LoRA, trainable = adapter weights and frozen = base weights; the reference policy is the
  same graph with the adapters zeroed. Without LoRA, trainable = all weights and frozen = a copy
  of the initial weights kept as the reference (empty when the KL weight is 0).
  """

  graphdef: Any
  lora: bool

  def module(self, trainable, frozen, reference=False):
    if self.lora:
      if reference:
        trainable = jax.tree.map(jnp.zeros_like, trainable)
      return nnx.merge(self.graphdef, trainable, frozen)
    return nnx.merge(self.graphdef, frozen if reference else trainable)

  def velocity_fn(self, trainable, frozen, reference=False):
    model = self.module(trainable, frozen, reference)
    return lambda x, sigma, cond: model.velocity(x, sigma, cond)


def build_model_states(generator, config, mesh):
  """Creates (graphdef, trainable, frozen) with every array born in its sharding."""
  seed = config.seed
  use_lora = bool(config.lora.enabled)
  keep_reference = (not use_lora) and config.train.beta > 0

  def make():
    model = generator.make_module(nnx.Rngs(seed))
    if use_lora:
      lora_lib.apply_lora(model, tuple(config.lora.targets), int(config.lora.rank),
                          float(config.lora.alpha), rngs=nnx.Rngs(seed + 1))
    return model

  def split(model):
    if use_lora:
      graphdef, trainable, frozen = lora_lib.split_lora(model)
    else:
      graphdef, trainable = nnx.split(model)
      frozen = trainable if keep_reference else nnx.State({})
    return graphdef, trainable, frozen

  with sharding_lib.fast_module_tracing():
    graphdef, _, _ = split(nnx.eval_shape(make))

  def init():
    _, trainable, frozen = split(make())
    return trainable, frozen

  # The frozen reference of full fine-tuning must not share buffers with the trainable state,
  # which the train step donates.
  copy = lambda state: jax.tree.map(jnp.copy, state)
  if generator.load_weights is None:
    trainable, frozen = sharding_lib.create_sharded(init, mesh)
    return graphdef, trainable, copy(trainable) if keep_reference else frozen
  # Real weights: nothing of the base is initialised randomly. Only the adapters are created (the
  # base's random init is dead code XLA drops); the rest streams from disk into its sharding.
  with sharding_lib.fast_module_tracing():
    abstract_trainable, abstract_frozen = jax.eval_shape(init)
  if use_lora:
    trainable = sharding_lib.create_sharded(lambda: init()[0], mesh)
    frozen = generator.load_weights(abstract_frozen, mesh)
  else:
    trainable = generator.load_weights(abstract_trainable, mesh)
    frozen = copy(trainable) if keep_reference else nnx.State({})
  return graphdef, trainable, frozen


# ---- the optimizer ----------------------------------------------------------------------------
def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW after global-norm clipping (`config.train`); `optax.MultiSteps` accumulates
  `train.grad_accum_steps` minibatches per update."""
  t = config.train
  tx = optax.chain(
      optax.clip_by_global_norm(t.max_grad_norm),
      optax.adamw(t.learning_rate, b1=t.b1, b2=t.b2, eps=t.adam_eps, weight_decay=t.weight_decay))
  if t.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=t.grad_accum_steps)
  return tx


def init_opt_state(tx, trainable, mesh):
  """Optimizer state created sharded: moments like their parameters, counters replicated."""
  abstract = jax.eval_shape(tx.init, trainable)
  param_shardings = jax.tree.map(lambda a: a.sharding, trainable)
  replicated = sharding_lib.replicated(mesh)
  shardings = optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract, param_shardings,
      transform_non_params=lambda _: replicated)
  return jax.jit(tx.init, out_shardings=shardings)(trainable)
