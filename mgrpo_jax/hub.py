"""Hugging Face Hub repo ids wherever a model directory is expected.

`config.model.path`, `config.reward.pickscore_path` and `config.reward.clip_path` accept either a
local directory or a Hub id (`org/name`, optionally `org/name@revision`). An id is resolved to a
local snapshot with `huggingface_hub.snapshot_download`, which honours `HF_HOME` /
`HF_HUB_CACHE` (where the cache lives), `HF_HUB_OFFLINE=1` (the cached snapshot of the revision,
no network) and `HF_TOKEN` / `huggingface-cli login` (gated repos such as SD3.5 and FLUX.1-dev).

Only what the loaders read is fetched: for a diffusers pipeline, `model_index.json` and, inside
each component folder it lists, JSON configs, tokenizer files and `.safetensors` weights; for a
transformers model (the reward CLIPs), the same file kinds at the top level. Pickles
(`*.bin`, `*.pt`, `*.ckpt`, ...), ONNX / Flax / TF exports and precision variants
(`*.fp16.safetensors`) are never downloaded, nor are the single-file checkpoints that repos like
stable-diffusion-3.5-medium keep beside the diffusers folders (`sd3.5_medium.safetensors`,
`text_encoders/*.safetensors`): those match no component-folder pattern.
"""

from __future__ import annotations

import json
import os
import re

# Files a component folder (or a transformers model directory) needs.
_COMPONENT_FILES = ("*.json", "*.safetensors", "*.txt", "*.model")
# Never fetched, even inside a component folder.
IGNORE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.msgpack", "*.h5",
                   "*.onnx", "*.onnx_data", "*.pb", "*.gguf", "*.fp16.*", "*.fp16-*", "*.bf16.*",
                   "*.fp8.*")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[\w./-]+)?")


def is_repo_id(path: str) -> bool:
  """True for `org/name[@revision]` that is not an existing local path."""
  return bool(path) and not os.path.exists(path) and _REPO_ID.fullmatch(path) is not None \
      and not path.startswith((".", "/"))


def _split(repo: str) -> tuple[str, str | None]:
  name, _, revision = repo.partition("@")
  return name, revision or None


def _download(repo: str, what: str, **kwargs) -> str:
  from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
  from huggingface_hub.errors import (  # pylint: disable=import-outside-toplevel
      LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
  name, revision = _split(repo)
  try:
    return snapshot_download(name, revision=revision, ignore_patterns=list(IGNORE_PATTERNS),
                             **kwargs)
  except LocalEntryNotFoundError as e:
    raise FileNotFoundError(
        f"{what}={repo}: not in the Hugging Face cache ({_cache_dir()}) and cannot be "
        f"downloaded{' (HF_HUB_OFFLINE is set)' if _offline() else ''}: {e}") from e
  except (RepositoryNotFoundError, RevisionNotFoundError) as e:
    raise FileNotFoundError(f"{what}={repo}: no such Hub repo or revision (gated repos need "
                            f"HF_TOKEN or `huggingface-cli login`): {e}") from e


def _cache_dir() -> str:
  from huggingface_hub import constants  # pylint: disable=import-outside-toplevel
  return constants.HF_HUB_CACHE


def _offline() -> bool:
  from huggingface_hub import constants  # pylint: disable=import-outside-toplevel
  return bool(constants.HF_HUB_OFFLINE)


def pipeline_dir(path: str, what: str = "config.model.path") -> str:
  """A diffusers pipeline directory for `path`: itself if local, else the Hub snapshot.

  Downloads `model_index.json` first, then only the component folders it names.

  Raises:
    FileNotFoundError: an id that is neither cached (offline) nor on the Hub, naming `what`.
  """
  if not is_repo_id(path):
    return path
  index_dir = _download(path, what, allow_patterns=["model_index.json"])
  index_path = os.path.join(index_dir, "model_index.json")
  if not os.path.isfile(index_path):
    raise FileNotFoundError(f"{what}={path}: the Hub repo has no model_index.json (not a "
                            "diffusers pipeline)")
  with open(index_path) as f:
    index = json.load(f)
  return _download(path, what, allow_patterns=pipeline_allow_patterns(index))


def pipeline_allow_patterns(index: dict) -> list[str]:
  """Download patterns of a pipeline: model_index.json and its components' folders' files."""
  components = sorted(k for k, v in index.items() if not k.startswith("_") and
                      isinstance(v, list) and v and v[0] is not None)
  return ["model_index.json"] + [f"{c}/{p}" for c in components for p in _COMPONENT_FILES]


def model_dir(path: str, what: str) -> str:
  """A transformers model directory (e.g. a reward CLIP) for `path`: itself or the snapshot."""
  if not is_repo_id(path):
    return path
  return _download(path, what, allow_patterns=list(_COMPONENT_FILES))
