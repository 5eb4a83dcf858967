r"""LoRA adapters to and from the diffusers / PEFT safetensors format.

  mgrpo-export --workdir W --out DIR [--ema] [--step N]

writes DIR/pytorch_lora_weights.safetensors, which diffusers loads with
`StableDiffusion3Pipeline.load_lora_weights(DIR)` / `FluxPipeline.load_lora_weights(DIR)`, and a
model card DIR/README.md (the run's config and its latest evaluation figures).

Format. Our adapter of a Linear is `y = x W + (alpha / r) (x A) B` with `A: [in, r]`,
`B: [r, out]` (`models/lora.py`); PEFT's is `y = x W^T + (lora_alpha / r) B_t (A_t x)` with
torch layouts `lora_A.weight: [r, in]`, `lora_B.weight: [out, r]`. Keys are diffusers module names
under the pipeline component, e.g. `transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight`.
The file stores `A_t = A^T` and `B_t = (alpha / r) B^T`, i.e. the scale is folded into
`lora_B` and the stored `lora_alpha` equals the rank (scale 1). That is what every loader
assumes when it finds no alpha (diffusers' PEFT path without metadata, ComfyUI and other
kohya-style readers), so the update is the same wherever the file goes; the file's
`lora_adapter_metadata` says so explicitly for diffusers >= 0.35.

Import (`read_lora` + `load_adapters`, used by `config.lora.init_from` and `load_pipeline`)
accepts diffusers files (`transformer.` prefix, alphas from `.alpha` tensors or the metadata),
PEFT adapter directories / files (`base_model.model.` prefix, `adapter_config.json` with
`lora_alpha`, `r`, `rank_pattern`, `alpha_pattern`, `use_rslora`) and unprefixed PEFT state dicts,
and rescales `B` so the imported update equals the file's under our own `alpha / r`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Any, Mapping

import numpy as np

LORA_FILE = "pytorch_lora_weights.safetensors"
PEFT_FILE = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
# Generators whose adapted modules have diffusers counterparts (both use SD3's tensor names).
EXPORTABLE = ("sd3", "flux")
_COMPONENT = "transformer"
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


class LoraFormatError(ValueError):
  """A LoRA file or adapter set that cannot be converted: the message names the keys."""


# ---- our adapters --------------------------------------------------------------------------------
def flat_adapters(state) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Adapters of an NNX state or a restored checkpoint tree, as host arrays by module path.

  Args:
    state: the trainable (or EMA) state: an `nnx.State` of `LoRAParam`s, or the nested dict
      `checkpoint.load_numpy` returns (leaves under a trailing 'value' key).

  Returns:
    {'transformer.transformer_blocks.0.attn.to_q': (A float32 [in, r], B float32 [r, out])}.

  Raises:
    LoraFormatError: a leaf that is not a lora_a / lora_b, or a module missing one of them.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  if isinstance(state, nnx.State):
    leaves = [(tuple(str(k) for k in path), v.get_value() if isinstance(v, nnx.Variable) else v)
              for path, v in nnx.to_flat_state(state)]
  else:
    leaves = [(tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), v)
              for path, v in jax.tree_util.tree_flatten_with_path(state)[0]]
  parts: dict[str, dict[str, np.ndarray]] = {}
  for path, value in leaves:
    if path and path[-1] == "value":
      path = path[:-1]
    if not path or path[-1] not in ("lora_a", "lora_b"):
      raise LoraFormatError(f"state leaf {'.'.join(path)} is not a LoRA adapter (lora_a / "
                            "lora_b); export needs a run trained with lora.enabled=True")
    parts.setdefault(".".join(path[:-1]), {})[path[-1]] = np.asarray(value, np.float32)
  incomplete = sorted(m for m, p in parts.items() if len(p) != 2)
  if incomplete:
    raise LoraFormatError(f"adapters without both lora_a and lora_b: {incomplete}")
  return {m: (p["lora_a"], p["lora_b"]) for m, p in sorted(parts.items())}


def diffusers_module(generator: str, path: str) -> str:
  """Our adapted module path -> diffusers' module name (with the component prefix).

  e.g. ('sd3', 'transformer.transformer_blocks.0.attn.to_out')
       -> 'transformer.transformer_blocks.0.attn.to_out.0'.

  Raises:
    LoraFormatError: a generator without diffusers counterpart, or an adapter outside the
      transformer (text-encoder adapters are not exported).
  """
  if generator not in EXPORTABLE:
    raise LoraFormatError(f"generator {generator!r} has no diffusers counterpart; LoRA "
                          f"export/import supports {list(EXPORTABLE)}")
  component, _, sub = path.partition(".")
  if component != _COMPONENT or not sub:
    raise LoraFormatError(f"adapter {path} is outside the transformer; only transformer "
                          "adapters are converted (set lora.targets to transformer modules)")
  from mgrpo_jax.models import sd3_transformer  # pylint: disable=import-outside-toplevel
  name, _ = sd3_transformer.checkpoint_name(sub + ".kernel")
  return f"{_COMPONENT}.{name[:-len('.weight')]}"


def to_diffusers(adapters: Mapping[str, tuple[np.ndarray, np.ndarray]], generator: str,
                 rank: int, alpha: float, dtype=np.float32
                 ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Our adapters -> (diffusers tensors, safetensors metadata); see the module docstring.

  Args:
    adapters: `flat_adapters` output.
    generator: `config.model.name`.
    rank, alpha: `config.lora.rank` / `alpha` the adapters were trained with.
    dtype: stored dtype.

  Returns:
    ({'transformer.<module>.lora_A.weight': [r, in], '...lora_B.weight': [out, r]}, metadata).
  """
  scale = float(alpha) / float(rank)
  tensors, targets = {}, []
  for path, (a, b) in adapters.items():
    if a.shape[1] != rank or b.shape[0] != rank:
      raise LoraFormatError(f"adapter {path} has rank {a.shape[1]}, config.lora.rank={rank}")
    name = diffusers_module(generator, path)
    targets.append(name[len(_COMPONENT) + 1:])
    tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.T).astype(dtype)
    tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray((scale * b).T).astype(dtype)
  # The LoraConfig diffusers builds for the transformer (keys prefixed by the component).
  peft_config = {"r": int(rank), "lora_alpha": int(rank), "target_modules": sorted(targets),
                 "init_lora_weights": "gaussian"}
  metadata = {"format": "pt", _METADATA_KEY: json.dumps(
      {f"{_COMPONENT}.{k}": v for k, v in peft_config.items()}, sort_keys=True)}
  return tensors, metadata


# ---- reading diffusers / PEFT files --------------------------------------------------------------
def _locate(path: str) -> tuple[str, dict[str, Any] | None]:
  """A file or directory -> (safetensors file, adapter_config.json contents or None)."""
  if os.path.isdir(path):
    for name in (LORA_FILE, PEFT_FILE):
      if os.path.isfile(os.path.join(path, name)):
        config_path = os.path.join(path, PEFT_CONFIG)
        config = json.load(open(config_path)) if os.path.isfile(config_path) else None
        return os.path.join(path, name), config
    raise FileNotFoundError(f"LoRA directory {path} has neither {LORA_FILE} nor {PEFT_FILE}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"LoRA file {path} does not exist")
  if not path.endswith(".safetensors"):
    raise LoraFormatError(f"LoRA file {path}: only .safetensors files are read (no pickles)")
  config_path = os.path.join(os.path.dirname(path), PEFT_CONFIG)
  config = json.load(open(config_path)) if os.path.isfile(config_path) else None
  return path, config


def _pattern_value(patterns: Mapping[str, Any], module: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name by regex suffix."""
  for key, value in (patterns or {}).items():
    key = key.lstrip("^")
    if re.fullmatch(rf"(.*\.)?{key}", module):
      return value
  return default


def read_lora(path: str) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
  """Reads a diffusers or PEFT LoRA file (or its directory) into torch-layout factors.

  Args:
    path: `pytorch_lora_weights.safetensors`, `adapter_model.safetensors`, or a directory
      holding one of them (a PEFT directory's `adapter_config.json` gives the alphas).

  Returns:
    {diffusers module name under the transformer, e.g. 'transformer_blocks.0.attn.to_q':
     (lora_A [r, in] float32, lora_B [out, r] float32, scale)} where the update of the module's
     torch weight is `scale * lora_B @ lora_A`.

  Raises:
    LoraFormatError: keys that are not LoRA A/B pairs (e.g. kohya lora_down/lora_up, DoRA),
      a component other than the transformer, or an A without its B.
  """
  from mgrpo_jax.models import weights  # pylint: disable=import-outside-toplevel
  file, peft_config = _locate(path)
  checkpoint = weights.SafetensorsFile(file)
  metadata = {}
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(file, framework="numpy") as f:
    raw = (f.metadata() or {}).get(_METADATA_KEY)
  if raw:
    metadata = {k[len(_COMPONENT) + 1:]: v for k, v in json.loads(raw).items()
                if k.startswith(_COMPONENT + ".")}
  config = peft_config or metadata or {}
  if config.get("use_dora"):
    raise LoraFormatError(f"{file}: DoRA adapters are not supported")
  factors: dict[str, dict[str, np.ndarray]] = {}
  alphas: dict[str, float] = {}
  bad = []
  for key in checkpoint.keys():
    name = key
    for prefix in ("base_model.model.", _COMPONENT + "."):
      if name.startswith(prefix):
        name = name[len(prefix):]
        break
    else:
      if name.split(".", 1)[0].startswith("text_encoder"):
        bad.append(f"{key} (text-encoder adapters are not supported)")
        continue
    m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", name)
    if m:
      factors.setdefault(m.group(1), {})[m.group(2)] = np.asarray(
          checkpoint.get(key), np.float32)
    elif name.endswith(".alpha") and checkpoint.info(key)[0] in ((), (1,)):
      alphas[name[:-len(".alpha")]] = float(np.asarray(checkpoint.get(key)).reshape(()))
    else:
      bad.append(key)
  if bad:
    raise LoraFormatError(f"{file}: keys that are not transformer LoRA A/B weights in the "
                          f"diffusers/PEFT format: {bad[:10]}{' ...' if len(bad) > 10 else ''}")
  incomplete = sorted(m for m, p in factors.items() if len(p) != 2)
  if incomplete:
    raise LoraFormatError(f"{file}: modules without both lora_A and lora_B: {incomplete[:10]}")
  if not factors:
    raise LoraFormatError(f"{file} holds no LoRA weights")
  out = {}
  for module, p in sorted(factors.items()):
    a, b = p["lora_A"], p["lora_B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
      raise LoraFormatError(f"{file}: {module} has lora_A {a.shape} and lora_B {b.shape}; "
                            "expected [r, in] and [out, r] (Linear layers only)")
    r = a.shape[0]
    if module in alphas:
      alpha = alphas[module]
    else:
      alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
      # Without rank_pattern/alpha_pattern a PEFT config's single lora_alpha goes with its r.
    rank = _pattern_value(config.get("rank_pattern"), module, config.get("r", r))
    if rank != r:
      raise LoraFormatError(f"{file}: {module} has rank {r}, its config says r={rank}")
    denominator = np.sqrt(r) if config.get("use_rslora") else r
    out[module] = (a, b, float(alpha) / float(denominator))
  return out


def load_adapters(adapter_state, generator: str, path: str, rank: int, alpha: float):
  """Replaces our adapters with a diffusers/PEFT LoRA's (`config.lora.init_from`).

  Each file module must match one of our adapters, with the same rank and in/out sizes; our
  `B` is set to `B_file^T * (file scale / (alpha / rank))`, so `(alpha / rank) A B` equals the
  file's update exactly. Adapters the file does not cover keep their values (B = 0 at init:
  no update), and are logged.

  Args:
    adapter_state: our trainable `nnx.State` of LoRAParams (arrays keep their shardings).
    generator: `config.model.name`.
    path: the file or directory (see `read_lora`).
    rank, alpha: `config.lora.rank` / `alpha`.

  Returns:
    The state with the file's adapters.

  Raises:
    LoraFormatError: file modules that match no adapter, or rank / shape mismatches (all named).
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  flat = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(adapter_state)}
  modules = sorted({".".join(key[:-1]) for key in flat if key[-1] in ("lora_a", "lora_b")})
  if len(modules) * 2 != len(flat):
    raise LoraFormatError("lora.init_from: the trainable state is not only LoRA adapters "
                          "(is lora.enabled True?)")
  # diffusers module name (without the component) -> our module path
  ours = {diffusers_module(generator, m)[len(_COMPONENT) + 1:]: m for m in modules}
  loaded = read_lora(path)
  unmatched = sorted(set(loaded) - set(ours))
  if unmatched:
    raise LoraFormatError(
        f"LoRA {path}: modules {unmatched[:10]}{' ...' if len(unmatched) > 10 else ''} match no "
        f"adapter of this model (its adapters look like {sorted(ours)[:4]}; check lora.targets "
        "and the model)")
  our_scale = float(alpha) / float(rank)
  new = {}
  problems = []
  for name, (a, b, scale) in loaded.items():
    prefix = tuple(ours[name].split("."))
    want_a = flat[prefix + ("lora_a",)].get_value().shape
    want_b = flat[prefix + ("lora_b",)].get_value().shape
    if a.shape[0] != rank:
      problems.append(f"{name}: file rank {a.shape[0]}, config.lora.rank={rank} (set "
                      f"--config.lora.rank={a.shape[0]})")
      continue
    if a.T.shape != tuple(want_a) or b.T.shape != tuple(want_b):
      problems.append(f"{name}: file lora_A {a.shape} / lora_B {b.shape}, the model's adapter "
                      f"needs [{rank}, {want_a[0]}] / [{want_b[1]}, {rank}]")
      continue
    new[prefix + ("lora_a",)] = a.T
    new[prefix + ("lora_b",)] = b.T * (scale / our_scale)
  if problems:
    raise LoraFormatError(f"LoRA {path} does not fit the model's adapters:\n  " +
                          "\n  ".join(problems))
  missing = sorted(set(ours) - set(loaded))
  if missing:
    logging.warning("LoRA %s covers %d of %d adapters; the other %d keep their initial values "
                    "(B = 0, no update), e.g. %s", path, len(loaded), len(ours), len(missing),
                    missing[:3])
  out = []
  for path_key, variable in nnx.to_flat_state(adapter_state):
    key = tuple(str(k) for k in path_key)
    if key in new:
      old = variable.get_value()
      value = jax.device_put(np.asarray(new[key], old.dtype), old.sharding) \
          if hasattr(old, "sharding") else np.asarray(new[key], old.dtype)
      variable = variable.replace(value)
    out.append((path_key, variable))
  return nnx.from_flat_state(out)


def init_from_config(trainable, config):
  """`config.lora.init_from`: the trainable adapters replaced by that LoRA's (else unchanged).

  Raises:
    ValueError: init_from set without LoRA; LoraFormatError / FileNotFoundError from the file.
  """
  path = config.lora.get("init_from", "")
  if not path:
    return trainable
  if not config.lora.enabled:
    raise ValueError(f"lora.init_from={path!r} needs lora.enabled=True")
  return load_adapters(trainable, config.model.name, path, int(config.lora.rank),
                       float(config.lora.alpha))


# ---- the model card ------------------------------------------------------------------------------
def _latest_eval(workdir: str) -> str | None:
  runs = sorted(d for d in os.listdir(workdir) if re.fullmatch(r"eval_\d+", d) and
                os.path.isfile(os.path.join(workdir, d, "eval.md")))
  return open(os.path.join(workdir, runs[-1], "eval.md")).read().strip() if runs else None


def _last_metrics(workdir: str) -> dict[str, float] | None:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return None
  lines = [l for l in open(path) if l.strip()]
  return json.loads(lines[-1]) if lines else None


def model_card(config: Mapping[str, Any], workdir: str, step: int, ema: bool) -> str:
  """README.md for the exported LoRA: how to load it, the training setup, eval figures."""
  model, lora = config["model"], config["lora"]
  pipeline = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[model["name"]]
  base = model.get("path", "")
  lines = ["---", "library_name: diffusers", "tags: [lora, text-to-image, mgrpo, grpo]"]
  if base and not os.path.isabs(base):
    lines.append(f"base_model: {base}")
  lines += ["---", "", f"# LoRA trained with mgrpo_jax (Multi-GRPO), iteration {step}"
            f"{' (EMA weights)' if ema else ''}", "",
            f"Base model: `{base}`. Rewards: {', '.join(config['reward']['names'])} "
            f"(weights {list(config['reward']['weights'])}); rollouts: "
            f"{config['tree']['mode']}; advantages: {config['advantage']['mode']}.", "",
            "```python", "import torch, diffusers",
            f"pipe = diffusers.{pipeline}.from_pretrained(\"{base or 'BASE_MODEL'}\", "
            "torch_dtype=torch.bfloat16)",
            "pipe.load_lora_weights(\"THIS_DIRECTORY\")", "```", "",
            f"Rank {lora['rank']}, trained with alpha {lora['alpha']}; the scale alpha / rank = "
            f"{float(lora['alpha']) / int(lora['rank']):g} is folded into `lora_B` (the file "
            "stores lora_alpha = rank), so loaders that ignore alphas apply it correctly.",
            f"Adapted modules: `{', '.join(lora['targets'])}`.", ""]
  evaluation = _latest_eval(workdir)
  if evaluation:
    lines += ["## Evaluation (mgrpo-eval)", "", evaluation, ""]
  metrics = _last_metrics(workdir)
  if metrics:
    lines += [f"## Last training iteration ({metrics.get('step')})", "", "| metric | value |",
              "| --- | --- |"]
    lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())
              if k.startswith("reward/") and isinstance(v, (int, float))]
    lines.append("")
  lines += ["## Config", "", "```json", json.dumps(config, indent=2, sort_keys=True), "```", ""]
  return "\n".join(lines)


# ---- the command ---------------------------------------------------------------------------------
def export(workdir: str, out: str, ema: bool = False, step: int | None = None) -> str:
  """Writes the run's adapters as `out/pytorch_lora_weights.safetensors` plus `out/README.md`.

  Reads only the checkpoint's arrays and `workdir/config.json` (no model weights, no device).

  Returns:
    The safetensors path.

  Raises:
    FileNotFoundError: no config.json or checkpoint; LoraFormatError: not a LoRA run, no EMA
      weights with `ema`, or a generator without diffusers counterpart.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  from mgrpo_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} does not exist (the trainer writes it; is {workdir} "
                            "a training workdir?)")
  config = json.load(open(config_path))
  if not config["lora"]["enabled"]:
    raise LoraFormatError(f"{workdir} was trained with lora.enabled=False: there are no "
                          "adapters to export")
  step, state = ckpt_lib.load_numpy(workdir, step)
  if ema and "ema" not in state:
    raise LoraFormatError(f"--ema: the checkpoint of iteration {step} in {workdir} has no EMA "
                          "weights (train.ema_decay was 0)")
  tensors, metadata = to_diffusers(flat_adapters(state["ema" if ema else "trainable"]),
                                   config["model"]["name"], int(config["lora"]["rank"]),
                                   float(config["lora"]["alpha"]))
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, LORA_FILE)
  save_file(tensors, path, metadata=metadata)
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write(model_card(config, workdir, step, ema))
  return path


def main(argv=None):
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(
      prog="mgrpo-export", description="Write a run's LoRA adapters in the diffusers format.")
  parser.add_argument("--workdir", required=True, help="the training run's workdir")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--ema", action="store_true", help="export the EMA weights")
  parser.add_argument("--step", type=int, default=None, help="iteration (default the latest)")
  args = parser.parse_args(argv)
  try:
    path = export(args.workdir, args.out, ema=args.ema, step=args.step)
  except (FileNotFoundError, LoraFormatError) as e:
    sys.exit(f"mgrpo-export: {e}")
  print(f"wrote {path}", flush=True)


def run():
  main()


if __name__ == "__main__":
  run()
