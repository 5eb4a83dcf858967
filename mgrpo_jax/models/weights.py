"""Reading diffusers / Hugging Face safetensors checkpoints into sharded NNX states, without torch.

A checkpoint directory holds either one `*.safetensors` file or shards listed by a
`*.safetensors.index.json` (`{"weight_map": {name: file}}`). Files are validated (header length,
JSON, dtypes, shapes against offsets, offsets against the file size and each other; errors name
file and tensor; then the `safetensors` package's reader) and memory-mapped (an 8-byte header
length, a JSON header of dtype/shape/offsets, raw little-endian data), so bfloat16 works with
numpy (via ml_dtypes) and nothing is unpickled. Each tensor is
placed with `jax.make_array_from_callback`, which copies to every device only the slice it
owns: the host never holds more than one tensor's pages, and a device never the full weights.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable, Iterable

import jax
import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model: names and shapes are in the message."""


# The safetensors format caps the JSON header at 100 MB (the reference reader refuses more).
_MAX_HEADER_BYTES = 100_000_000


class SafetensorsFile:
  """One memory-mapped .safetensors file, validated before anything is mapped.

  The header is checked here (its length against the file size, its JSON, every tensor's dtype,
  shape, and data offsets against its byte size, the file size and the other tensors) so that
  each error names the file and the tensor; the `safetensors` package's reader then checks the
  file as a whole. Tensors are read as numpy views of a memory map, so a transform (a transpose)
  and the per-device slicing of `place` touch only the pages each device needs.
  """

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise CheckpointError(f"{path} is not a safetensors file: {size} bytes, shorter than "
                              "the 8-byte header length")
      (header_len,) = struct.unpack("<Q", raw)
      if header_len > min(size - 8, _MAX_HEADER_BYTES):
        raise CheckpointError(
            f"{path} is not a valid safetensors file: its header length field says "
            f"{header_len} bytes but the file has {size - 8} after it (a corrupt or truncated "
            "file, or not safetensors)")
      try:
        header = json.loads(f.read(header_len))
      except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header (not JSON: {e})") from e
    if not isinstance(header, dict):
      raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, "
                            "expected an object of tensors")
    header.pop("__metadata__", None)
    self._data_start = 8 + header_len
    self.header = header
    self._validate(size - self._data_start)
    self._check_with_reference_reader()
    self._mmap = None

  def _validate(self, data_size: int) -> None:
    """Per-tensor checks of the header, each error naming the file and the tensor."""
    spans = []
    for name, entry in self.header.items():
      where = f"{self.path}: tensor {name}"
      if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(f"{where}: header entry {entry!r} lacks dtype, shape or "
                              "data_offsets")
      if entry["dtype"] not in _DTYPES:
        raise CheckpointError(f"{where} has unsupported dtype {entry['dtype']!r} (supported: "
                              f"{sorted(_DTYPES)})")
      shape, offsets = entry["shape"], entry["data_offsets"]
      if not isinstance(shape, list) or not all(
          isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{where} has an invalid shape {shape!r}")
      if (not isinstance(offsets, list) or len(offsets) != 2 or not all(
          isinstance(o, int) and not isinstance(o, bool) for o in offsets)
          or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where} has invalid data_offsets {offsets!r}")
      begin, end = offsets
      nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[entry["dtype"]]).itemsize
      if end - begin != nbytes:
        raise CheckpointError(
            f"{where}: {entry['dtype']}{shape} needs {nbytes} bytes but data_offsets "
            f"[{begin}, {end}) hold {end - begin}")
      if end > data_size:
        raise CheckpointError(
            f"{where}: its bytes [{begin}, {end}) lie past the end of the data section "
            f"({data_size} bytes); the file is truncated or corrupt")
      spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, end_b, b) in zip(spans, spans[1:]):
      if begin_b < end_a and begin_b < end_b:
        raise CheckpointError(f"{self.path}: tensors {a} and {b} overlap (bytes from {begin_b} "
                              f"to {min(end_a, end_b)})")

  def _check_with_reference_reader(self) -> None:
    """The `safetensors` package's own validation (offsets cover the data exactly, etc.)."""
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    try:
      with safe_open(self.path, framework="numpy"):
        pass
    except Exception as e:  # SafetensorError derives from Exception only
      raise CheckpointError(f"{self.path} is not a valid safetensors file: {e}") from e

  def keys(self) -> list[str]:
    return list(self.header)

  def info(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
    entry = self.header[name]
    return tuple(entry["shape"]), np.dtype(_DTYPES[entry["dtype"]])

  def get(self, name: str) -> np.ndarray:
    """The tensor as a read-only numpy view of the mapped file."""
    if name not in self.header:
      raise CheckpointError(f"{self.path}: no tensor {name}")
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    shape, dtype = self.info(name)
    start, stop = self.header[name]["data_offsets"]
    buf = self._mmap[self._data_start + start:self._data_start + stop]
    return buf.view(dtype).reshape(shape)


class Checkpoint:
  """All tensors of one component directory (e.g. `transformer/`), single file or sharded."""

  def __init__(self, directory: str):
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    names = sorted(os.listdir(directory))
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    self.files: dict[str, SafetensorsFile] = {}
    self.location: dict[str, str] = {}
    if index:
      index_path = os.path.join(directory, index[0])
      try:
        with open(index_path, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
          raise TypeError(f"weight_map is a {type(weight_map).__name__}")
      except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path} is not a safetensors index ({{\"weight_map\": "
                              f"{{tensor: file}}}} expected): {e!r}") from e
      for tensor, file in weight_map.items():
        if file not in self.files:
          path = os.path.join(directory, file)
          if not os.path.exists(path):
            raise FileNotFoundError(f"{index[0]} lists shard {file}, missing from {directory}")
          self.files[file] = SafetensorsFile(path)
        if tensor not in self.files[file].header:
          raise CheckpointError(f"{index_path} places tensor {tensor} in {file}, which does not "
                                "hold it")
        self.location[tensor] = file
    else:
      shards = [n for n in names if n.endswith(".safetensors")]
      if not shards:
        found = ", ".join(names) or "nothing"
        raise FileNotFoundError(f"no *.safetensors in {directory} (found: {found}); only "
                                "safetensors checkpoints are read, never pickles")
      for file in shards:
        self.files[file] = SafetensorsFile(os.path.join(directory, file))
        for tensor in self.files[file].keys():
          self.location[tensor] = file

  def keys(self) -> list[str]:
    return sorted(self.location)

  def __contains__(self, name: str) -> bool:
    return name in self.location

  def info(self, name: str):
    return self.files[self.location[name]].info(name)

  def get(self, name: str) -> np.ndarray:
    if name not in self.location:
      raise KeyError(f"tensor {name} not in checkpoint")
    return self.files[self.location[name]].get(name)


def read_config(directory: str, name: str = "config.json") -> dict[str, Any]:
  path = os.path.join(directory, name)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found (a diffusers/HF component needs its config.json)")
  with open(path) as f:
    return json.load(f)


# A mapping rule turns a checkpoint tensor into the layout of one state leaf.
Transform = Callable[[np.ndarray], np.ndarray]


def linear_kernel(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> flax kernel [in, out]."""
  return np.transpose(w)


def conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] -> flax kernel [kh, kw, in, out]."""
  return np.transpose(w, (2, 3, 1, 0))


def torch_name(path: str, kernel_transform: Transform | None = None,
               renames: Iterable[tuple[Any, str]] = ()) -> tuple[str, Transform | None]:
  """Our dotted state path -> (PyTorch tensor name, transform from torch's layout to ours).

  Flax leaves map as `kernel` -> `weight` (with `kernel_transform`, e.g. a transpose), `scale`
  and `embedding` -> `weight`, `bias` -> `bias`; `renames` are (compiled regex, replacement)
  pairs applied first for modules whose names differ.

  Raises:
    ValueError: a leaf with no torch counterpart.
  """
  name = path
  for pattern, repl in renames:
    name = pattern.sub(repl, name)
  stem, _, leaf = name.rpartition(".")
  if leaf == "bias":
    return name, None
  if leaf in ("scale", "embedding"):
    return stem + ".weight", None
  if leaf == "kernel":
    return stem + ".weight", kernel_transform
  raise ValueError(f"state path {path} has no PyTorch counterpart (leaf {leaf!r})")


def config_fields(cls, config: dict[str, Any], **overrides) -> Any:
  """`cls(**fields)` from a config.json dict: the dataclass's fields present in it, except the
  run-time `dtype` / `param_dtype`, which come from `overrides` (as do any others)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  names = [f.name for f in dataclasses.fields(cls) if f.name not in ("dtype", "param_dtype")]
  return cls(**{k: config[k] for k in names if k in config and k not in overrides}, **overrides)


def diffusers_arch_kwargs(config: dict[str, Any], class_name: str, fields: Iterable[str],
                          what: str) -> dict[str, Any]:
  """The architecture arguments (`fields` present) of a diffusers model's config.json dict.

  Keys starting with '_' (`_class_name`, `_diffusers_version`, `_name_or_path`) carry no
  architecture and are ignored, except that `_class_name`, when present, must be `class_name`.
  Any other key is an architecture argument: unknown ones are refused rather than silently
  dropped, since dropping one would build a different network.

  Args:
    config: the parsed config.json.
    class_name: the diffusers model class the implementation matches ("AutoencoderKL", ...).
    fields: the architecture keys the implementation knows.
    what: names the model in errors ("SD3 transformer", "VAE").

  Raises:
    ValueError: another `_class_name`, or unknown keys (listed with the known ones).
  """
  fields = tuple(fields)
  found = config.get("_class_name", class_name)
  if found != class_name:
    raise ValueError(f"{what} config _class_name={found!r}, expected {class_name!r}")
  unknown = sorted(k for k in config if not k.startswith("_") and k not in fields)
  if unknown:
    raise ValueError(f"{what} config has keys {unknown} this implementation does not know "
                     f"(known: {list(fields)})")
  return {k: config[k] for k in fields if k in config}


def place(array: np.ndarray, target: jax.ShapeDtypeStruct) -> jax.Array:
  """Puts a host tensor into `target`'s sharding and dtype, copying only each device's slice."""
  if tuple(array.shape) != tuple(target.shape):
    raise CheckpointError(f"shape {array.shape} does not match the model's {target.shape}")
  sharding = target.sharding
  if sharding is None:
    return jax.numpy.asarray(np.asarray(array).astype(target.dtype))
  return jax.make_array_from_callback(
      target.shape, sharding, lambda idx: np.asarray(array[idx]).astype(target.dtype))


def load_tensors(checkpoint: Checkpoint, targets: dict[str, tuple[str, Transform | None,
                                                                    jax.ShapeDtypeStruct]],
                 ignore_unexpected: Iterable[str] = (), component: str = "") -> dict[str, jax.Array]:
  """Loads and places every target tensor, with one error listing every problem by name.

  Args:
    checkpoint: the component's tensors.
    targets: state path -> (checkpoint tensor name, transform or None, abstract target with
      shape, dtype and sharding).
    ignore_unexpected: checkpoint tensor names (exact) that the model does not use on purpose.
    component: name for messages (e.g. "transformer").

  Returns:
    state path -> placed jax.Array.

  Raises:
    CheckpointError: missing tensors, unexpected tensors, or shape mismatches, all named.
  """
  problems, out, used = [], {}, set()
  for path, (name, transform, target) in targets.items():
    if name not in checkpoint:
      problems.append(f"missing: {name} (for {path})")
      continue
    used.add(name)
    array = checkpoint.get(name)
    if transform is not None:
      array = transform(array)
    if tuple(array.shape) != tuple(target.shape):
      problems.append(f"shape: {name} is {tuple(array.shape)} after conversion, {path} expects "
                      f"{tuple(target.shape)}")
      continue
    out[path] = place(array, target)
  unexpected = sorted(set(checkpoint.keys()) - used - set(ignore_unexpected))
  problems.extend(f"unexpected: {name}" for name in unexpected)
  if problems:
    head = f"{component} checkpoint does not match the model" if component else \
        "checkpoint does not match the model"
    shown = problems[:40]
    more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
    raise CheckpointError(head + ":\n  " + "\n  ".join(shown) + more)
  return out


def load_state(checkpoint: Checkpoint, abstract_state, name_fn: Callable[[str], tuple[str, Any]],
               component: str = "", mesh=None, rules=None,
               ignore_unexpected: Iterable[str] = ()):
  """Fills an NNX state from a checkpoint, mapping each dotted state path with `name_fn`.

  Args:
    checkpoint: the component's tensors.
    abstract_state: nnx.State whose leaves (ShapeDtypeStruct or arrays) give the target shape
      and dtype, and through `.sharding` the placement.
    name_fn: dotted state path -> (checkpoint tensor name, transform to our layout or None).
    component: name for error messages.
    mesh, rules: if given, place by the leaves' logical axis names mapped by `rules` (default
      `mgrpo_jax.sharding.LOGICAL_RULES`) instead of their `.sharding`.
    ignore_unexpected: checkpoint tensors the model does not use on purpose.

  Returns:
    An nnx.State of the same structure with loaded, placed arrays.

  Raises:
    CheckpointError: every missing, unexpected or wrongly shaped tensor, named.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  shardings = None
  if mesh is not None:
    from mgrpo_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
    shardings = dict(nnx.to_flat_state(sharding_lib.state_shardings(
        abstract_state, mesh, rules or sharding_lib.LOGICAL_RULES)))
  flat = nnx.to_flat_state(abstract_state)
  key = lambda path: ".".join(str(k) for k in path)
  targets = {}
  for path, variable in flat:
    leaf = variable.get_value() if isinstance(variable, nnx.Variable) else variable
    sharding = getattr(leaf, "sharding", None)
    if shardings is not None:
      s = shardings[path]
      sharding = s.get_value() if isinstance(s, nnx.Variable) else s
    name, transform = name_fn(key(path))
    targets[key(path)] = (name, transform, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                sharding=sharding))
  loaded = load_tensors(checkpoint, targets, ignore_unexpected=ignore_unexpected,
                        component=component)
  out = [(path, variable.replace(loaded[key(path)]) if isinstance(variable, nnx.Variable)
          else loaded[key(path)]) for path, variable in flat]
  return nnx.from_flat_state(out)


# ---- diffusers pipeline directories ---------------------------------------------------------------
def check_pipeline_dir(path: str, pipeline: str, resolution: int) -> None:
  """Checks `config.model.path` / `config.model.resolution` for a diffusers pipeline directory.

  Raises:
    ValueError: empty path, or a resolution not a multiple of 16.
    FileNotFoundError: no model_index.json.
  """
  if not path:
    raise ValueError(f"config.model.path is empty: give the local diffusers directory of the "
                     f"{pipeline} checkpoint or its Hugging Face Hub repo id")
  if not os.path.isfile(os.path.join(path, "model_index.json")):
    raise FileNotFoundError(f"config.model.path={path} has no model_index.json; expected a "
                            f"diffusers {pipeline} directory")
  if resolution % 16:
    raise ValueError(f"config.model.resolution={resolution} must be a multiple of 16")


def check_pipeline_components(path: str, pipeline: str, required: Iterable[str],
                              hints: dict[str, str] | None = None) -> None:
  """model_index.json names `pipeline` and every `required` component directory exists.

  `hints` add a remedy to a missing component's name in the message.

  Raises:
    ValueError: another pipeline class.
    FileNotFoundError: listing every missing component.
  """
  with open(os.path.join(path, "model_index.json")) as f:
    index = json.load(f)
  if index.get("_class_name", pipeline) != pipeline:
    raise ValueError(f"{path}/model_index.json is a {index.get('_class_name')}, expected "
                     f"{pipeline}")
  missing = [c + (hints or {}).get(c, "") for c in required
             if not os.path.isdir(os.path.join(path, c))]
  if missing:
    raise FileNotFoundError(f"{path} lacks component directories {missing}")


def load_components(path: str, abstract_state, loaders: dict[str, Callable[..., Any]], mesh,
                    pipeline: str):
  """Fills a generator's state component by component: `loaders[name](path/name, part, mesh=)`.

  Raises:
    ValueError: a state component with no loader.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  state = dict(abstract_state.items()) if hasattr(abstract_state, "items") else abstract_state
  unknown = sorted(set(state) - set(loaders))
  if unknown:
    raise ValueError(f"{pipeline} state has components {unknown} with no loader")
  return nnx.State({name: loaders[name](os.path.join(path, name), part, mesh=mesh)
                    for name, part in state.items()})
