"""Checkpoints of the training state, the data position and run metadata, written with orbax.

A step directory `<workdir>/checkpoints/<step>/` holds three orbax items:
  state       pytree of jax arrays (params, optimizer state, RNG key data, step), sharded
  data_state  JSON: the prompt loader position, so a resumed run sees the same prompts
  metadata    JSON: e.g. {"config_hash": ...}, to refuse resuming with a different config

Crash safety comes from orbax's atomic commit on local and POSIX filesystems: a step is written
into `<step>.orbax-checkpoint-tmp/`, `commit_success.txt` is written inside it, then the directory
is renamed to `<step>/`. Only directories named exactly `<step>` count as checkpoints, so a save
killed at any point leaves the previous step as `latest_step()`; the stale tmp directory is
removed when the next `Checkpointer` opens the directory (or overwritten by a save of that step).
Old steps beyond `max_to_keep` are deleted only after the new step is committed, so even
`max_to_keep=1` never has a moment without a restorable checkpoint.

Typed PRNG keys (`jax.random.key`) are stored as their raw key data (`pack_rng`) so the files
hold plain uint32 arrays whatever the orbax version; `restore` rewraps every leaf whose abstract
dtype is a key dtype (`unpack_rng`) with that dtype's implementation. Callers may equally store
`jax.random.key_data(key)` themselves and restore it as uint32.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

PyTree = Any

_STATE, _DATA, _META = "state", "data_state", "metadata"
# How many mismatching leaves an error lists before summarising the rest.
_MAX_LISTED = 20


class CheckpointMismatchError(ValueError):
  """The abstract tree given to `restore` does not describe the saved state."""


def pack_rng(key: jax.Array) -> jax.Array:
  """Raw data of a typed PRNG key array, storable like any uint32 array.

  Args:
    key: [...] typed key array (`jax.random.key`); legacy uint32 keys pass through unchanged.

  Returns:
    [..., *impl_shape] uint32 (e.g. [..., 2] for threefry), sharded like `key` plus unsharded
    trailing dimensions.
  """
  if _is_key_dtype(getattr(key, "dtype", None)):
    return jax.random.key_data(key)
  return key


def unpack_rng(data: jax.Array, impl: Any = None) -> jax.Array:
  """Inverse of `pack_rng`: wraps [..., *impl_shape] uint32 key data as a [...] typed key array.

  Args:
    data: [..., *impl_shape] uint32 key data.
    impl: PRNG implementation (name such as "threefry2x32" or a `jax.random.key_impl` result);
      None means jax's default implementation, which must match the one the data came from.
  """
  return jax.random.wrap_key_data(data, impl=impl)


def _is_key_dtype(dtype) -> bool:
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl(abstract_key) -> Any:
  """The PRNG implementation of an abstract typed key (public API only accepts traced keys)."""
  found = []

  def probe(key):
    found.append(jax.random.key_impl(key))
    return key

  jax.eval_shape(probe, jax.ShapeDtypeStruct(abstract_key.shape, abstract_key.dtype))
  return found[0]


def _rewrap_key(target, value: jax.Array) -> jax.Array:
  """Turns restored key data back into keys if `target` asks for a typed key array."""
  if not _is_key_dtype(target.dtype):
    return value
  key = unpack_rng(value, _key_impl(target))
  # Wrapping may label an equivalent sharding differently (P() vs P(None)); match the target's.
  return key if key.sharding == target.sharding else jax.device_put(key, target.sharding)


def _path_str(path: tuple[str, ...]) -> str:
  return "/".join(path) or "<root>"


def _to_json(value: Any, what: str) -> Any:
  """A deep copy through JSON: fails early, naming the item, and detaches from caller mutation."""
  try:
    return json.loads(json.dumps(value, allow_nan=False))
  except (TypeError, ValueError) as e:
    raise TypeError(f"Checkpointer.save: {what} must be JSON-serializable (finite floats, str "
                    f"keys); got {type(value).__name__}: {e}") from e


class Checkpointer:
  """Saves and restores (state, data_state, metadata) under `<workdir>/checkpoints`.

  Every process of a multi-host run must call `save`/`restore`/`wait` with the same arguments:
  arrays are written shard by shard by their owners, the JSON items by the primary process only
  (so `data_state` must be the same on all processes, e.g. a global position).

  Example:
    ckpt = Checkpointer(workdir, max_to_keep=2)
    ckpt.save(step, {"params": params, "rng": pack_rng(key)}, {"position": 7},
              metadata={"config_hash": h})
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    state, data_state, metadata = ckpt.restore(ckpt.latest_step(), abstract)
  """

  def __init__(self, workdir: str, max_to_keep: int | None = 3, save_interval_steps: int = 1,
               async_save: bool = True, read_only: bool = False):
    """Opens (creating if needed) `<workdir>/checkpoints`.

    Args:
      workdir: run directory; checkpoints go to its `checkpoints` subdirectory.
      max_to_keep: number of most recent steps kept; None keeps all.
      save_interval_steps: `save` writes only steps that are multiples of this unless forced.
      async_save: if True, `save` returns once arrays are copied to host memory and writes the
        files in a background thread (so the caller may donate or delete the arrays); call
        `wait()` before relying on the files.
      read_only: for readers next to a running job (sampling, evaluation): creates nothing and
        leaves `<step>.orbax-checkpoint-tmp` directories alone (they may be a save in flight);
        `save` is refused.
    """
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep={max_to_keep}: must be >= 1 (or None to keep all)")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps={save_interval_steps}: must be >= 1")
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.AnySavePolicy([
            ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
            # Saves the step at which jax's preemption sync point is reached (multi-host TPU).
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
        enable_async_checkpointing=async_save,
        # Removes `<step>.orbax-checkpoint-tmp` left behind by a killed save; only the workdir's
        # one writer may (for a reader it could be a save in flight).
        cleanup_tmp_directories=not read_only,
        create=not read_only,
    )
    self.read_only = read_only
    # Explicit handlers let `item_metadata` read a step written by an earlier process.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(_STATE, _DATA, _META),
        item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                       _DATA: ocp.JsonCheckpointHandler(),
                       _META: ocp.JsonCheckpointHandler()})
    self._closed = False

  # -- queries -----------------------------------------------------------------------------------
  def latest_step(self) -> int | None:
    """The newest committed step (or the step of a save still in flight), None if none exist."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps currently kept, ascending."""
    return sorted(self._manager.all_steps())

  def read_metadata(self, step: int | None = None) -> dict[str, Any] | None:
    """The metadata dict saved with `step` (default: latest); None if there is no checkpoint."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    self.wait()
    self._require_step(step)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{_META: ocp.args.JsonRestore()}))
    return dict(restored[_META] or {})

  def check_metadata(self, expected: dict[str, Any], step: int | None = None) -> None:
    """Raises if the checkpoint at `step` (default: latest) was saved with other metadata.

    Use it before resuming, e.g. `check_metadata({"config_hash": config_hash(config)})`, so a
    workdir is not silently continued under a different config. Only keys of `expected` are
    compared; a key missing from the saved metadata counts as different. No checkpoint: no-op.

    Raises:
      ValueError: listing every differing key with its saved and expected value.
    """
    saved = self.read_metadata(step)
    if saved is None:
      return
    missing = object()
    diffs = [f"{k}: saved {saved.get(k, '<missing>')!r}, expected {v!r}"
             for k, v in sorted(expected.items()) if saved.get(k, missing) != v]
    if diffs:
      step = self.latest_step() if step is None else step
      raise ValueError(
          f"checkpoint step {step} in {self.directory} was saved with different metadata: "
          + "; ".join(diffs) + ". Use a fresh workdir or restore the original config.")

  # -- save ----------------------------------------------------------------------------------------
  def save(self, step: int, state: PyTree, data_state: dict[str, Any],
           metadata: dict[str, Any] | None = None, force: bool = False) -> bool:
    """Saves one step, asynchronously if the checkpointer was built with `async_save`.

    Args:
      step: training step / iteration number; names the directory.
      state: pytree of jax arrays; typed PRNG key leaves are stored as `pack_rng` data.
      data_state: JSON-serializable data position (e.g. loader epoch and index).
      metadata: JSON-serializable run metadata checked on resume by `check_metadata`.
      force: save even if `step` is not a multiple of `save_interval_steps`.

    Returns:
      True if a save was started. False if skipped: `step` is not a multiple of
      `save_interval_steps` or not newer than `latest_step()` (without `force`), or `step` is
      already saved (an existing checkpoint is never overwritten, even with `force`).
    """
    step = int(step)
    if self.read_only:
      raise RuntimeError(f"Checkpointer.save: {self.directory} was opened read-only")
    if step in self._manager.all_steps():
      logging.warning("checkpoint step %d already exists in %s; not overwriting it", step,
                      self.directory)
      return False
    data_state = _to_json(data_state, "data_state")
    metadata = _to_json(metadata or {}, "metadata")
    state = jax.tree.map(pack_rng, state)
    return self._manager.save(step, force=force, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _DATA: ocp.args.JsonSave(data_state),
        _META: ocp.args.JsonSave(metadata),
    }))

  # -- restore -------------------------------------------------------------------------------------
  def restore(self, step: int, abstract_state: PyTree, retired: tuple[str, ...] = ()
              ) -> tuple[PyTree, dict[str, Any], dict[str, Any]]:
    """Restores `step` with every array created directly in its target sharding.

    Args:
      step: a step from `all_steps()` (e.g. `latest_step()`).
      abstract_state: pytree matching the saved state, with `jax.ShapeDtypeStruct` leaves
        carrying `.sharding` (jax.Array leaves work too: their shape/dtype/sharding are used).
        A leaf with a typed key dtype restores the saved key data rewrapped as that key type.
      retired: top-level keys that older versions saved and the state no longer has (with
        `abstract_state` a dict): where the checkpoint has them they are read, replicated,
        and dropped, so old checkpoints still restore.

    Returns:
      (state, data_state, metadata): state has the structure of `abstract_state`.

    Raises:
      FileNotFoundError: `step` is not a committed checkpoint.
      CheckpointMismatchError: the abstract tree differs from the saved one in structure,
        shape or dtype (dtypes are not cast silently), or a leaf lacks a sharding.
    """
    step = int(step)
    self.wait()  # a step this process is still writing is not readable yet
    self._require_step(step)
    abstract = jax.tree_util.tree_map_with_path(self._as_abstract_data, abstract_state)
    saved = self._manager.item_metadata(step)[_STATE].tree if retired else {}
    dropped = [k for k in retired if k in saved and k not in abstract]
    if dropped:
      replicated = jax.tree.leaves(abstract)[0].sharding  # single-device, or its mesh's P()
      if isinstance(replicated, NamedSharding):
        replicated = NamedSharding(replicated.mesh, PartitionSpec())
      abstract = dict(abstract, **{k: jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), saved[k])
          for k in dropped})
    self._check_against_saved(step, abstract)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(abstract),
          _DATA: ocp.args.JsonRestore(),
          _META: ocp.args.JsonRestore(),
      }))
    except ValueError as e:
      raise CheckpointMismatchError(
          f"restoring step {step} from {self.directory} failed: {e}") from e
    restored_state = restored[_STATE]
    if dropped:
      restored_state = {k: v for k, v in restored_state.items() if k not in dropped}
    state = jax.tree.map(_rewrap_key, abstract_state, restored_state)
    return state, dict(restored[_DATA] or {}), dict(restored[_META] or {})

  @staticmethod
  def _as_abstract_data(path, leaf) -> jax.ShapeDtypeStruct:
    """ShapeDtypeStruct of what is on disk for `leaf`: key dtypes become their uint32 data."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      raise CheckpointMismatchError(
          f"restore: abstract leaf {jax.tree_util.keystr(path)} = {leaf!r} has no sharding; "
          "build it as "
          "jax.ShapeDtypeStruct(shape, dtype, sharding=...) so arrays land in their target "
          "layout")
    if not _is_key_dtype(leaf.dtype):
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    if isinstance(sharding, NamedSharding):
      # Key data has trailing implementation dimensions, never sharded.
      extra = len(data.shape) - len(sharding.spec)
      sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec, *[None] * extra))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)

  def _check_against_saved(self, step: int, abstract: PyTree) -> None:
    """Compares paths, shapes and dtypes with the saved tree; orbax would cast dtypes silently."""
    saved_meta = self._manager.item_metadata(step)[_STATE]
    saved = {tuple(str(k) for k in path): m
             for path, m in ocp.tree.to_flat_dict(saved_meta.tree).items()}
    wanted = {ocp.tree.str_keypath(path): a
              for path, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    problems = []
    for path in sorted(wanted.keys() - saved.keys()):
      problems.append(f"{_path_str(path)}: in the abstract tree but not in the checkpoint")
    for path in sorted(saved.keys() - wanted.keys()):
      problems.append(f"{_path_str(path)}: in the checkpoint but not in the abstract tree")
    for path in sorted(wanted.keys() & saved.keys()):
      want, have = wanted[path], saved[path]
      have_shape = tuple(getattr(have, "shape", ()) or ())
      have_dtype = getattr(have, "dtype", None)
      if tuple(want.shape) != have_shape or (have_dtype is not None and want.dtype != have_dtype):
        problems.append(f"{_path_str(path)}: saved {have_dtype}{list(have_shape)}, requested "
                        f"{want.dtype}{list(want.shape)}")
    if problems:
      more = len(problems) - _MAX_LISTED
      listed = "\n  ".join(problems[:_MAX_LISTED]) + (f"\n  ... and {more} more" if more > 0
                                                        else "")
      raise CheckpointMismatchError(
          f"abstract state does not match checkpoint step {step} in {self.directory} "
          f"({len(problems)} problem(s)):\n  {listed}")

  def _require_step(self, step: int) -> None:
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"no committed checkpoint for step {step} in {self.directory}; "
                              f"available steps: {self.all_steps()}")

  # -- lifecycle -----------------------------------------------------------------------------------
  def wait(self) -> None:
    """Blocks until every started save is committed (re-raises a failed background save)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads; safe to call twice."""
    if not self._closed:
      self._closed = True
      self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def committed_steps(workdir: str) -> list[int]:
  """Committed checkpoint steps of a workdir, ascending, read from directory names only.

  Orbax writes a step under a temporary name and renames it when complete, so only finished
  checkpoints have all-digit names. Creates nothing; [] when there is no `checkpoints/`.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def load_numpy(workdir: str, step: int | None = None) -> tuple[int, PyTree]:
  """Reads a saved training state as numpy arrays on the host, without a mesh or a model.

  For inspection, export and tests; training restores with `Checkpointer.restore` instead,
  which places every array in its sharding.

  Args:
    workdir: the run's workdir (holding `checkpoints/`).
    step: the step to read; default the latest.

  Returns:
    (step, state) with state {'trainable', 'opt_state', 'step', ...} of numpy arrays.

  Raises:
    FileNotFoundError: no checkpoint (or not that step) in `workdir`.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  steps = committed_steps(workdir)
  if not steps or (step is not None and int(step) not in steps):
    raise FileNotFoundError(f"no committed checkpoint {'' if step is None else step} in "
                            f"{directory} (found steps {steps})")
  step = steps[-1] if step is None else int(step)
  path = os.path.join(directory, str(step), _STATE)
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree,
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
  return step, checkpointer.restore(path, target)
