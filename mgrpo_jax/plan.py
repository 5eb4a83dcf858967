"""The launch plan: a run's shapes and costs, and everything that would fail later, up front.

`mgrpo-train --plan` prints it without loading weights or sampling, and every run performs the
same checks before its weights load. The model is resolved on abstract shapes only
(`nnx.eval_shape`; the SD3/FLUX pipelines from their config files), so the plan of an SD3.5-M
or FLUX.1-dev run takes seconds on a laptop; with `config.model.path` empty it is planned on the
published architecture (`models/reference_configs.py`) and the empty path is reported.

  plan = make_plan(config)            # never raises for config problems: it lists them
  print(plan.format())
  plan.raise_if_problems()            # PlanError naming every offending field
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mgrpo_jax import advantages as adv_lib
from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax.sampling import rollout as rollout_lib
from mgrpo_jax.sampling.tree import tree_spec_from_config


class PlanError(ValueError):
  """Config problems found by the plan; the message lists each with the field it names."""


@dataclasses.dataclass
class Plan:
  """Rows of the plan table and the problems found.

  Attributes:
    rows: (quantity, value) pairs in print order.
    problems: "field: what is wrong" lines; empty when the run can start.
    facts: machine-readable numbers (for tests and tools): nfe, transitions, updates, ...
  """

  rows: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  problems: list[str] = dataclasses.field(default_factory=list)
  facts: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def ok(self) -> bool:
    return not self.problems

  def add(self, name: str, value: Any) -> None:
    self.rows.append((name, str(value)))

  def problem(self, field: str, message: str) -> None:
    self.problems.append(f"{field}: {message}")

  def format(self) -> str:
    width = max((len(k) for k, _ in self.rows), default=0)
    lines = [f"  {k.ljust(width)}  {v}" for k, v in self.rows]
    if self.problems:
      lines.append(f"  PROBLEMS ({len(self.problems)}):")
      lines += [f"    - {p}" for p in self.problems]
    else:
      lines.append("  checks: all passed")
    return "\n".join(lines)

  def raise_if_problems(self) -> None:
    if self.problems:
      raise PlanError("the config cannot run:\n  - " + "\n  - ".join(self.problems))


def _mesh_sizes(mesh_config, num_devices: int, plan: Plan) -> tuple[int, int, int] | None:
  sizes = [int(mesh_config.get(a, 1)) for a in sharding_lib.MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    plan.problem("mesh", f"at most one axis may be -1, got {dict(zip(sharding_lib.MESH_AXES, sizes))}")
    return None
  if any(s == 0 or s < -1 for s in sizes):
    plan.problem("mesh", f"axis sizes must be positive or -1, got {sizes}")
    return None
  fixed = math.prod(s for s in sizes if s != -1)
  if num_devices % fixed:
    plan.problem("mesh", f"{dict(zip(sharding_lib.MESH_AXES, sizes))} does not divide the "
                 f"{num_devices} devices")
    return None
  if free:
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    plan.problem("mesh", f"{dict(zip(sharding_lib.MESH_AXES, sizes))} uses {fixed} of the "
                 f"{num_devices} devices; set one axis to -1 to take the rest")
    return None
  return tuple(sizes)


def _tree_text(spec) -> str:
  parts = [f"{spec.num_roots} root{'s' if spec.num_roots > 1 else ''}"]
  parts += [f"x{k} at step {s}" for s, k in zip(spec.branch_steps, spec.branch_factors)]
  return ", ".join(parts)


def _count(state) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state)))


def _plan_rewards(config, plan: Plan, records) -> None:
  from mgrpo_jax import rewards as rewards_lib  # pylint: disable=g-import-not-at-top
  names, weights = tuple(config.reward.names), tuple(config.reward.weights)
  if len(names) != len(weights):
    plan.problem("reward.weights", f"{len(weights)} weights for the {len(names)} rewards {names}")
  if len(set(names)) != len(names):
    plan.problem("reward.names", f"a reward is listed twice: {names}")
  known = set(rewards_lib.available_rewards())
  placement = []
  for name in names:
    if name not in known:
      plan.problem("reward.names", f"unknown reward {name!r}; known: {sorted(known)}")
      continue
    if rewards_lib.placement(name) == "device":
      placement.append(f"{name} (device)")
      needed = {"pickscore": ("pickscore_path",), "clipscore": ("clip_path",),
                "aesthetic": ("clip_path", "aesthetic_path")}[name]
      for key in needed:
        path = config.reward.get(key, "")
        if not path:
          plan.problem(f"reward.{key}", f"reward {name!r} needs a local directory (nothing is "
                       f"downloaded); it is empty")
        elif not os.path.exists(path):
          plan.problem(f"reward.{key}", f"{path} does not exist (needed by reward {name!r})")
    elif name == "remote":
      placement.append(f"{name} (remote)")
      if not os.environ.get("MGRPO_REWARD_URL"):
        plan.problem("reward.names", "reward 'remote' needs $MGRPO_REWARD_URL")
    else:
      placement.append(f"{name} (host)")
  if names:
    plan.add("rewards", ", ".join(f"{p} x{w:g}" for p, w in zip(placement, weights)))
  if records is not None and ({"ocr", "text_color"} & set(names)):
    from mgrpo_jax.rewards import text_color  # pylint: disable=g-import-not-at-top
    for i, r in enumerate(records):
      if not r.metadata.get("text"):
        plan.problem("data.dataset", f"prompt {i} ({r.prompt[:40]!r}...) has no target text, "
                     "which the ocr/text_color rewards need (use an OCR-Color-10 CSV)")
        break
      if "text_color" in names and r.metadata.get("color") not in text_color.COLORS:
        plan.problem("data.dataset", f"prompt {i} asks for colour {r.metadata.get('color')!r}, "
                     f"not one of {sorted(text_color.COLORS)}")
        break


def _load_records(config, plan: Plan):
  from mgrpo_jax.data import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  try:
    records, where = prompts_lib.load_dataset(config.data.dataset, config.data.split,
                                              tfds_data_dir=config.data.get("tfds_data_dir", ""))
  except (OSError, ValueError, ImportError) as e:  # ImportError: tfds: without the package
    plan.problem("data.dataset", str(e).splitlines()[0] if str(e) else type(e).__name__)
    return None
  plan.add("dataset", f"{where} ({len(records)} prompts)")
  if not records:
    plan.problem("data.dataset", f"{where} holds no prompts")
  return records


def _abstract_generator(config, plan: Plan, tmp: str):
  """(generator or None, model config used) on abstract shapes; reports path problems."""
  from mgrpo_jax.models import reference_configs, registry  # pylint: disable=g-import-not-at-top
  model_cfg = config.model
  name = model_cfg.get("name")
  if name in reference_configs.DEFAULT_FOR_GENERATOR and not model_cfg.get("path"):
    reference = reference_configs.DEFAULT_FOR_GENERATOR[name]
    plan.problem("model.path", f"empty: give the local diffusers directory of the checkpoint "
                 f"(planned here on the published {reference} architecture)")
    model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    model_cfg.path = reference_configs.write_config_directory(os.path.join(tmp, reference),
                                                              reference)
    return _generator_without_tokenizer(name, model_cfg, plan), model_cfg
  try:
    generator = registry.get_generator(model_cfg)
  except (OSError, ValueError, KeyError) as e:
    plan.problem("model", str(e).splitlines()[0])
    return None, model_cfg
  if name in reference_configs.DEFAULT_FOR_GENERATOR:
    _check_weight_files(model_cfg.path, plan)
  return generator, model_cfg


def _generator_without_tokenizer(name, model_cfg, plan):
  """A Generator of a config-only directory whose tokenizer returns dummy ids of the right shape."""
  from mgrpo_jax.models import base  # pylint: disable=g-import-not-at-top
  settings_mod = __import__(f"mgrpo_jax.models.{name}", fromlist=["x"])
  settings_cls = settings_mod.SD3Settings if name == "sd3" else settings_mod.FluxSettings
  model_cls = settings_mod.SD3Model if name == "sd3" else settings_mod.FluxModel
  try:
    settings = settings_cls(**{k: v for k, v in model_cfg.items() if k != "name"})
  except (OSError, ValueError, TypeError) as e:
    plan.problem("model", str(e).splitlines()[0])
    return None
  length = int(settings.max_sequence_length)
  keys = {"sd3": {"clip_l": 77, "clip_g": 77, "t5": length},
          "flux": {"clip": 77, "t5": length}}[name]
  tokenize = lambda prompts: {k: np.zeros((len(prompts), n), np.int32) for k, n in keys.items()}
  with sharding_lib.fast_module_tracing():
    shapes = nnx.eval_shape(lambda: model_cls(settings, rngs=nnx.Rngs(0)))
  return base.Generator(name=name, make_module=lambda rngs: model_cls(settings, rngs=rngs),
                        tokenize=tokenize, latent_shape=shapes.latent_shape,
                        image_shape=shapes.image_shape)


def _check_weight_files(path: str, plan: Plan) -> None:
  import json  # pylint: disable=g-import-not-at-top
  try:
    with open(os.path.join(path, "model_index.json")) as f:
      index = json.load(f)
  except (OSError, ValueError):
    return  # the generator has reported it
  for component, value in index.items():
    # Only networks with weights: not the scheduler or tokenizers, nor components the pipeline
    # lists as absent ([null, null], e.g. SD3's image_encoder).
    if (component.startswith("_") or not isinstance(value, list) or None in value
        or component == "scheduler" or component.startswith(("tokenizer", "feature_extractor"))):
      continue
    folder = os.path.join(path, component)
    if not os.path.isdir(folder) or not any(f.endswith((".safetensors", ".safetensors.index.json"))
                                            for f in os.listdir(folder)):
      plan.problem("model.path", f"{folder} has no .safetensors weights (only safetensors load; "
                   "convert .bin files first)")


def _plan_model(config, plan: Plan, generator, spec) -> None:
  from mgrpo_jax.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  use_lora = bool(config.lora.enabled)

  def make():
    model = generator.make_module(nnx.Rngs(0))
    if use_lora:
      lora_lib.apply_lora(model, tuple(config.lora.targets), int(config.lora.rank),
                          float(config.lora.alpha), rngs=nnx.Rngs(1))
    return model

  try:
    with sharding_lib.fast_module_tracing():
      abstract = nnx.eval_shape(make)
  except (ValueError, TypeError) as e:
    plan.problem("lora.targets" if use_lora else "model", str(e).splitlines()[0])
    return
  if use_lora:
    graphdef, trainable, frozen = lora_lib.split_lora(abstract)
    n_train, n_total = _count(trainable), _count(trainable) + _count(frozen)
  else:
    graphdef, state = nnx.split(abstract)
    trainable = state
    n_train = n_total = _count(state)
  plan.add("model", f"{config.model.name}: latents {generator.latent_shape}, images "
           f"{generator.image_shape}, {n_total / 1e6:,.1f} M parameters in all networks")
  plan.add("trained", f"{n_train / 1e6:,.2f} M parameters"
           + (f" (LoRA r={config.lora.rank}, alpha={config.lora.alpha:g})" if use_lora else
              " (full fine-tuning)"))
  plan.facts.update(parameters=n_total, trainable_parameters=n_train)
  # One prompt through the text encoders and one latent through the transformer, abstractly:
  # shape mismatches between the configured resolution, tokens and the model surface here.
  tokens = generator.tokenize(["plan"])
  tokens = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), tokens)
  if use_lora:
    frozen_abs = frozen
  else:
    frozen_abs = nnx.State({})

  def velocity(trainable, frozen, tokens):
    model = nnx.merge(graphdef, trainable, frozen) if use_lora else nnx.merge(graphdef, trainable)
    cond = model.encode_text(tokens)
    x = jnp.zeros((1,) + tuple(generator.latent_shape), jnp.float32)
    return model.velocity(x, jnp.full([1], 0.5, jnp.float32), cond)

  try:
    with sharding_lib.fast_module_tracing():
      out = jax.eval_shape(velocity, trainable, frozen_abs, tokens)
  except Exception as e:  # pylint: disable=broad-except  (any tracing error is a config error)
    plan.problem("model", f"one abstract denoising call failed: {type(e).__name__}: "
                 f"{str(e).splitlines()[0] if str(e) else ''}")
    return
  if tuple(out.shape[1:]) != tuple(generator.latent_shape):
    plan.problem("model", f"velocity shape {out.shape[1:]} != latent shape "
                 f"{generator.latent_shape}")
  del spec


def make_plan(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
              num_processes: int | None = None, check_model: bool = True) -> Plan:
  """Resolves `config` on abstract shapes and checks everything that would fail later.

  Args:
    config: a run's config.
    num_devices: devices of the run (default: this process's view, jax.device_count()).
    num_processes: processes of the run (default jax.process_count()).
    check_model: build the model abstractly (seconds); False skips it (config-only checks).

  Returns:
    The Plan (table rows and problems); it does not raise for config problems.
  """
  plan = Plan()
  num_devices = jax.device_count() if num_devices is None else int(num_devices)
  num_processes = jax.process_count() if num_processes is None else int(num_processes)

  spec = None
  try:
    spec = tree_spec_from_config(config)
  except ValueError as e:
    field = "tree.mode" if "tree.mode" in str(e) else ("tree" if config.tree.mode == "tree"
                                                      else "tree.group_size")
    plan.problem(field, str(e))
  try:
    sampler = rollout_lib.sampler_from_config(config)
    if sampler.method not in ("sde", "cps"):
      plan.problem("sample.method", f"{sampler.method!r} unknown; expected 'sde' or 'cps'")
  except ValueError as e:
    plan.problem("sample", str(e))
  adv_cfg = None
  try:
    adv_cfg = adv_lib.AdvantageConfig.from_config(config)
  except ValueError as e:
    plan.problem("advantage" if "advantage" in str(e) else "reward.weights", str(e))
  if adv_cfg is not None and spec is not None:
    try:
      adv_cfg.check_tree(spec)
    except ValueError as e:
      plan.problem("advantage.train_levels", str(e))

  P = int(config.data.prompts_per_batch)
  B = int(config.sample.batches_per_iteration)
  nmb = int(config.train.num_minibatches)
  epochs = int(config.train.inner_epochs)
  accum = max(int(config.train.grad_accum_steps), 1)
  if spec is not None:
    L, M = spec.num_leaves, spec.num_transitions
    if config.tree.mode == "tree":
      plan.add("tree", _tree_text(spec) + f", {spec.num_steps} steps")
      if int(config.tree.group_size) != L:
        plan.problem("tree.group_size", f"{config.tree.group_size} differs from the tree's {L} "
                     "leaves: in tree mode it only sizes the flat baseline (`:flat`), which "
                     "should sample as many images per prompt; set it to the leaf count")
    else:
      plan.add("tree", f"flat: {spec.num_roots} independent trajectories, {spec.num_steps} steps")
    plan.add("leaves per prompt", L)
    plan.add("NFE per prompt", f"{spec.nfe} (flat with {L} leaves: {spec.nfe_independent}; "
             f"ratio {spec.nfe / spec.nfe_independent:.3f})")
    plan.add("stored transitions", f"{M} per prompt, {M * P * B:,} per iteration "
             f"({B} batches x {P} prompts)")
    plan.facts.update(num_leaves=L, nfe=spec.nfe, nfe_flat=spec.nfe_independent,
                      transitions_per_prompt=M, transitions_per_iteration=M * P * B)
  if adv_cfg is not None:
    plan.add("advantages", f"{adv_cfg.mode}, temporal groups '{adv_cfg.scope}', std "
             f"'{adv_cfg.std}', clip {adv_cfg.clip:g}" +
             (", all-zero groups dropped" if adv_cfg.drop_zero_groups else "") +
             (f", branchings with spread < {adv_cfg.prune_spread:g} pruned"
              if adv_cfg.prune_spread > 0 else "") +
             (f", only levels {tuple(adv_cfg.train_levels)} trained"
              if adv_cfg.train_levels else ""))

  sizes = _mesh_sizes(config.mesh, num_devices, plan)
  if sizes is not None:
    data, fsdp, tensor = sizes
    plan.add("mesh", f"data {data} x fsdp {fsdp} x tensor {tensor} = {num_devices} devices, "
             f"{num_processes} process{'es' if num_processes > 1 else ''}")
    dp = data * fsdp
    if P % dp:
      plan.problem("data.prompts_per_batch", f"{P} is not divisible by the data x fsdp mesh "
                   f"size {dp} (each prompt's tree stays on one shard)")
    if P % num_processes:
      plan.problem("data.prompts_per_batch", f"{P} is not divisible by the {num_processes} "
                   "processes")
    if spec is not None and not P % dp:
      per_dev = P // dp
      plan.add("per device and batch", f"{per_dev} prompts = {per_dev * spec.num_leaves} "
               f"images sampled, {per_dev * spec.num_transitions} transitions stored")
      if 1 <= nmb <= spec.num_transitions:
        m = -(-spec.num_transitions // nmb)
        pad = nmb * m - spec.num_transitions
        plan.add("minibatch", f"{nmb} per batch, {per_dev * m} transitions per device "
                 f"({m} per prompt" + (f"; {pad} padding row{'s' if pad > 1 else ''} per "
                                       f"prompt" if pad else "") + ")")
        plan.facts.update(transitions_per_minibatch_per_device=per_dev * m, padding_rows=pad)
  if spec is not None and not 1 <= nmb <= spec.num_transitions:
    plan.problem("train.num_minibatches", f"{nmb} must be between 1 and the "
                 f"{spec.num_transitions} stored transitions per prompt")
  steps = B * nmb * epochs
  if steps % accum:
    plan.problem("train.grad_accum_steps", f"{accum} does not divide the {steps} minibatches of "
                 f"an iteration ({B} batches x {nmb} minibatches x {epochs} epochs): an "
                 "accumulation would straddle two iterations")
  else:
    plan.add("optimizer updates", f"{steps // accum} per iteration ({steps} minibatches"
             + (f", gradients of {accum} accumulated" if accum > 1 else "") + ")")
    plan.facts["updates_per_iteration"] = steps // accum

  records = _load_records(config, plan)
  _plan_rewards(config, plan, records)

  for field in ("sample.eval_num_steps", "log.eval_every", "log.num_eval_prompts",
                "log.checkpoint_every", "log.keep_checkpoints", "train.num_iterations"):
    group, key = field.split(".")
    if int(config[group][key]) < 1:
      plan.problem(field, f"must be >= 1, got {config[group][key]}")
  plan.add("iterations", f"{config.train.num_iterations}, evaluation every "
           f"{config.log.eval_every}" + (" and before training" if config.log.eval_at_start
                                         else "") +
           f" ({config.log.num_eval_prompts} prompts" +
           (f" of {os.path.basename(config.log.eval_dataset)}" if config.log.eval_dataset
            else "") + f", {config.sample.eval_num_steps} ODE steps), checkpoint every "
           f"{config.log.checkpoint_every}")

  if check_model:
    with tempfile.TemporaryDirectory() as tmp:
      generator, _ = _abstract_generator(config, plan, tmp)
      if generator is not None:
        _plan_model(config, plan, generator, spec)
  return plan
