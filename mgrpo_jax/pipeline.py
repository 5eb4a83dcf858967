r"""Text-to-image inference for notebooks and scripts: a generator, optionally with a LoRA.

  pipe = mgrpo_jax.load_pipeline("configs/tiny_jpeg.py", lora="workdirs/tiny_jpeg")
  images = pipe(["a red apple", "a blue sign"], steps=40, guidance=4.5, seed=0)  # PIL images

`path_or_config` is a run config (`ml_collections.ConfigDict`), a config file
(`file.py[:variant]`), a training workdir (its `config.json`; the workdir is then also the
default `lora`), or a diffusers SD3 / FLUX directory or its Hub repo id (`mgrpo_jax.hub`).
`lora` is a training workdir (its latest checkpoint's adapters, the EMA copy when the run kept
one, as the trainer's evaluation does; full fine-tuning runs restore every weight) or a
diffusers / PEFT LoRA file or directory (`mgrpo_jax.export`).

Sampling is the trainer's evaluation path (deterministic ODE steps, classifier-free guidance,
images decoded on the device), jitted once per (batch size, steps, guidance) and sharded over the
local devices on the batch axis. Prompt lists of any length are padded with the last prompt to a
multiple of the device count; row i's noise depends only on (seed, i), so images equal the
trainer's `render` of the same prompts and seed. No optimizer state and no reference copy of
the weights are created.
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any, Sequence

import jax
import ml_collections
from flax import nnx

from mgrpo_jax import runtime as runtime_lib
from mgrpo_jax import sharding as sharding_lib

_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


def _inference_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config fields inference reads, with the base config's defaults (configs/base.py)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model
  config.lora = ml_collections.ConfigDict({
      "enabled": False, "rank": 8, "alpha": 16.0, "init_from": "",
      "targets": (r"attn\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj|"
                  r"to_add_out)$",)})
  # FLUX is guidance-distilled: one model call per step, no CFG (see models/flux.py).
  guidance = 1.0 if model.name == "flux" else 4.5
  config.sample = ml_collections.ConfigDict({
      "eval_num_steps": 28, "shift": 3.0, "guidance_scale": guidance, "negative_prompt": "",
      "method": "sde", "noise_level": 0.7, "cps_logprob": "flow_grpo", "same_latent": False})
  config.train = ml_collections.ConfigDict({"beta": 0.0})
  return config


def _config_from_path(path: str, model_overrides: dict[str, Any]) -> tuple[Any, str | None]:
  """-> (run config, default lora) for a config file, workdir, diffusers directory or Hub id."""
  from mgrpo_jax.models import registry  # pylint: disable=import-outside-toplevel
  file, _, variant = path.partition(":") if ".py" in path else (path, "", "")
  if file.endswith(".py"):
    if not os.path.isfile(file):
      raise FileNotFoundError(f"load_pipeline: config file {file} does not exist")
    from mgrpo_jax.config_utils import load_sibling  # pylint: disable=import-outside-toplevel
    name = os.path.splitext(os.path.basename(file))[0]
    return load_sibling(os.path.abspath(file), name).get_config(variant or None), None
  if os.path.isfile(os.path.join(path, "config.json")) and \
      os.path.isdir(os.path.join(path, "checkpoints")):
    with open(os.path.join(path, "config.json")) as f:
      return ml_collections.ConfigDict(json.load(f)), path
  directory = path
  if not os.path.isdir(path):
    from mgrpo_jax import hub  # pylint: disable=import-outside-toplevel
    if not hub.is_repo_id(path):
      raise FileNotFoundError(f"load_pipeline: {path!r} is neither a config file, a training "
                              "workdir, a diffusers directory nor a Hub repo id")
    directory = hub.pipeline_dir(path, "load_pipeline")
  index_path = os.path.join(directory, "model_index.json")
  if not os.path.isfile(index_path):
    raise FileNotFoundError(f"load_pipeline: {path} has no model_index.json (not a diffusers "
                            "pipeline directory) and no config.json + checkpoints/ (not a "
                            "training workdir)")
  with open(index_path) as f:
    pipeline = json.load(f).get("_class_name")
  if pipeline not in _PIPELINES:
    raise ValueError(f"load_pipeline: {path} is a {pipeline}; supported: {sorted(_PIPELINES)}")
  model = getattr(registry, f"{_PIPELINES[pipeline]}_model_config")(directory)
  for key, value in model_overrides.items():
    if key not in model:
      raise ValueError(f"load_pipeline: model override {key!r} is not a field of the "
                       f"{model.name} model config (fields: {sorted(model)})")
    model[key] = value
  return _inference_config(model), None


def _is_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def _targets_for_file(generator, model_name: str, lora_path: str) -> tuple[list[str], int]:
  """Exact module-path regexes of our Linear layers that the LoRA file adapts, and its rank."""
  from mgrpo_jax import export  # pylint: disable=import-outside-toplevel
  loaded = export.read_lora(lora_path)
  ranks = sorted({a.shape[0] for a, _, _ in loaded.values()})
  if len(ranks) > 1:
    raise export.LoraFormatError(f"{lora_path} mixes ranks {ranks}; load_pipeline needs one")
  abstract = nnx.eval_shape(lambda: generator.make_module(nnx.Rngs(0)))
  ours = {}
  for path, module in nnx.iter_modules(abstract):
    name = ".".join(str(p) for p in path)
    if isinstance(module, nnx.Linear) and name.startswith("transformer."):
      ours[export.diffusers_module(model_name, name)[len("transformer."):]] = name
  unmatched = sorted(set(loaded) - set(ours))
  if unmatched:
    raise export.LoraFormatError(f"LoRA {lora_path}: modules {unmatched[:10]} are not Linear "
                                 f"layers of this {model_name} model")
  return [f"^{re.escape(ours[m])}$" for m in sorted(loaded)], ranks[0]


class Pipeline:
  """A loaded generator (+ adapters): `pipe(prompts, steps, guidance, seed)` -> PIL images."""

  def __init__(self, runtime, lora_source: str | None, iteration: int | None):
    self.runtime = runtime  # a "sample" Runtime: no optimizer state
    self.config, self.generator, self.mesh = runtime.config, runtime.generator, runtime.mesh
    self.lora_source = lora_source
    self.iteration = iteration  # the workdir checkpoint's iteration, if loaded from one

  def __call__(self, prompts: str | Sequence[str], steps: int | None = None,
               guidance: float | None = None, seed: int = 0,
               negative_prompt: str | None = None, output_type: str = "pil",
               use_lora: bool = True):
    """Samples one image per prompt.

    Args:
      prompts: a prompt or a list of them (any length).
      steps: ODE steps (default `config.sample.eval_num_steps`).
      guidance: CFG scale, 1.0 = no CFG (default `config.sample.guidance_scale`).
      seed: noise seed; row i's noise is fixed by (seed, i).
      negative_prompt: CFG's negative prompt (default `config.sample.negative_prompt`).
      output_type: "pil" (list of PIL.Image) or "np" (uint8 [n, H, W, 3]).
      use_lora: False renders the base model (the adapters zeroed: same compiled function).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
      raise ValueError("pipeline: no prompts given")
    if output_type not in ("pil", "np"):
      raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
    trainable = self.runtime.trainable
    if not use_lora and self.config.lora.enabled:
      trainable = jax.tree.map(jax.numpy.zeros_like, trainable)
    images = self.runtime.render(trainable, prompts, seed, steps, guidance, negative_prompt)
    if output_type == "np":
      return images
    from PIL import Image  # pylint: disable=import-outside-toplevel
    return [Image.fromarray(image) for image in images]


def _restore_workdir(trainable, workdir: str, ema: bool | None, step: int | None = None):
  """The workdir checkpoint's (latest, or `step`) trainable (or EMA) weights placed like
  `trainable`."""
  from mgrpo_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  step, state = ckpt_lib.load_numpy(workdir, step)
  if ema and "ema" not in state:
    raise ValueError(f"load_pipeline(ema=True): {workdir}'s checkpoint of iteration {step} "
                     "has no EMA weights")
  saved = state["ema"] if (ema or (ema is None and "ema" in state)) else state["trainable"]
  flat_saved = {}
  for path, value in jax.tree_util.tree_flatten_with_path(saved)[0]:
    key = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    flat_saved[key[:-1] if key[-1] == "value" else key] = value
  out, problems = [], []
  for path, variable in nnx.to_flat_state(trainable):
    key = tuple(str(k) for k in path)
    target = variable.get_value()
    value = flat_saved.pop(key, None)
    if value is None or value.shape != target.shape:
      problems.append(f"{'.'.join(key)}: model {target.shape}, checkpoint "
                      f"{None if value is None else value.shape}")
      continue
    out.append((path, variable.replace(jax.device_put(value.astype(target.dtype),
                                                      target.sharding))))
  problems += [f"{'.'.join(k)}: in the checkpoint, not in the model" for k in flat_saved]
  if problems:
    raise ValueError(f"load_pipeline: {workdir}'s checkpoint does not fit the model:\n  " +
                     "\n  ".join(problems[:20]))
  return nnx.from_flat_state(out), step


def load_pipeline(path_or_config, lora: str | None = None, *, ema: bool | None = None,
                  step: int | None = None, devices: Sequence[jax.Device] | None = None,
                  **model_overrides) -> Pipeline:
  """Builds a `Pipeline` (see the module docstring).

  Args:
    path_or_config: a run ConfigDict, `file.py[:variant]`, a training workdir, or a diffusers
      SD3 / FLUX directory or Hub repo id.
    lora: a training workdir or a diffusers / PEFT LoRA file or directory; default none (a
      workdir given as `path_or_config` is its own default).
    ema: with a workdir LoRA, use its EMA weights (default: when the run kept them).
    step: with a workdir LoRA, the checkpoint's iteration (default the latest).
    devices: devices to shard the batch over (default this process's local devices).
    **model_overrides: fields of the model config when loading a diffusers directory or Hub id
      (e.g. resolution=1024, dtype="float32").

  Raises:
    FileNotFoundError / ValueError naming the bad path, field or tensor.
  """
  from mgrpo_jax import export  # pylint: disable=import-outside-toplevel
  from mgrpo_jax.models import registry  # pylint: disable=import-outside-toplevel
  if isinstance(path_or_config, ml_collections.ConfigDict):
    if model_overrides:
      raise ValueError("load_pipeline: model overrides apply to diffusers directories and Hub ids; "
                       "change the ConfigDict instead")
    config, default_lora = path_or_config, None
  elif isinstance(path_or_config, (str, os.PathLike)):
    config, default_lora = _config_from_path(os.fspath(path_or_config), model_overrides)
  else:
    raise TypeError(f"load_pipeline: expected a ConfigDict or a path, got "
                    f"{type(path_or_config).__name__}")
  config = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
  lora = default_lora if lora is None else os.fspath(lora)
  # Inference keeps no frozen reference copy of the weights (that is only for the KL term).
  config.train.beta = 0.0
  config.lora.init_from = ""
  generator = registry.get_generator(config.model)
  if lora is None:
    config.lora.enabled = False
  elif _is_workdir(lora):
    # The adapters' shapes come from the run that trained them (else from `config`).
    if os.path.isfile(os.path.join(lora, "config.json")):
      with open(os.path.join(lora, "config.json")) as f:
        trained = json.load(f)
      for key in ("enabled", "rank", "alpha", "targets"):
        config.lora[key] = trained["lora"][key]
  else:
    targets, rank = _targets_for_file(generator, config.model.name, lora)
    config.lora.enabled, config.lora.targets = True, tuple(targets)
    config.lora.rank, config.lora.alpha = rank, float(rank)
  devices = list(jax.local_devices() if devices is None else devices)
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
  runtime = runtime_lib.build_runtime(config, mesh, "sample")
  iteration = None
  if lora is not None and _is_workdir(lora):
    runtime.trainable, iteration = _restore_workdir(runtime.trainable, lora, ema, step)
  elif lora is not None:
    runtime.trainable = export.load_adapters(runtime.trainable, config.model.name, lora,
                                             config.lora.rank, config.lora.alpha)
  return Pipeline(runtime, lora, iteration)
