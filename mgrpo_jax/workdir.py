"""A workdir across runs: one writer at a time, and resuming only the same experiment.

Lock. A training run holds `WORKDIR/lock` for its whole life: an exclusive `flock` on the file,
which holds the holder's host, PID, start time and command as JSON. A second run on the same
workdir fails at once with `WorkdirLocked` naming the holder. The kernel drops a `flock` when its
process dies (kill -9 included), so a lock file that still names a holder but is not locked is
stale: the next run takes it over and says whose it was. A clean exit empties the file. On a
filesystem without `flock` (some network mounts) the file's content decides instead: a holder on
this host that no longer runs is stale; one on another host must be removed by hand.
In a multi-host run only process 0 takes the lock (one per workdir, not per process); every
process learns the outcome, so all of them stop when the workdir is taken. `mgrpo-train` takes
it for its whole process (`hold_for_process`) before building a model or reading weights; a
`Trainer` takes it itself (`lock_for_run`) unless its process already holds it that way.

Resume. A checkpoint's metadata holds the resolved config (`config_record`). `check_resume`
compares it field by field with the config of the run that wants to continue: fields that do not
change the experiment (`RESUMABLE_FIELDS`) may differ, any other difference is refused naming
each field with its saved and new value.
"""

from __future__ import annotations

import atexit
import datetime
import errno
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

import numpy as np

LOCK_NAME = "lock"

# Config fields a resumed run may change: the run's length, logging / evaluation / checkpoint
# cadence, the host reward pool, and the device mesh (a checkpoint restores into any
# sharding). Everything else defines the experiment.
RESUMABLE_FIELDS = ("train.num_iterations", "log.*", "reward.num_workers", "reward.pool",
                    "mesh.*")


class WorkdirLocked(RuntimeError):
  """Another run holds the workdir (the message names its host and PID)."""


class ResumeMismatchError(ValueError):
  """The workdir's checkpoint belongs to a different experiment (changed fields are named)."""


# ---- lock ----------------------------------------------------------------------------------------
def _holder_record() -> dict[str, Any]:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": " ".join(sys.argv)}


def _parse_holder(text: str) -> dict[str, Any] | None:
  """The holder written in a lock file; None for an empty (released) file."""
  if not text.strip():
    return None
  try:
    holder = json.loads(text)
  except ValueError:
    return {"unreadable": text[:200]}
  return holder if isinstance(holder, dict) else {"unreadable": text[:200]}


def describe_holder(holder: dict[str, Any] | None) -> str:
  """'host H, PID P (this process), since T, running `cmd`' from a lock file's record."""
  if not holder:
    return "another process (it has not written its name yet)"
  if "unreadable" in holder:
    return f"an unknown holder (lock file content {holder['unreadable']!r})"
  here = holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()
  text = f"host {holder.get('host')}, PID {holder.get('pid')}" + (" (this process)" if here else "")
  if holder.get("started"):
    text += f", since {holder['started']}"
  if holder.get("command"):
    text += f", running `{holder['command']}`"
  return text


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


class WorkdirLock:
  """Exclusive lock of one workdir by one process (see the module docstring).

  Usage:
    with WorkdirLock(workdir):
      ...  # the only writer of workdir
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self._file = None

  @property
  def held(self) -> bool:
    return self._file is not None

  def acquire(self) -> WorkdirLock:
    """Takes the lock or raises `WorkdirLocked` at once (never waits).

    Returns:
      self.

    Raises:
      WorkdirLocked: another live process holds it; the message names it.
    """
    if self._file is not None:
      return self
    os.makedirs(self.workdir, exist_ok=True)
    # "a+" neither truncates the holder's record nor fails when the file does not exist yet.
    f = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
      try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        f.seek(0)
        raise WorkdirLocked(self._busy_message(_parse_holder(f.read()))) from None
      except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
          raise
        self._check_record_without_flock(f)
      f.seek(0)
      stale = _parse_holder(f.read())
      if stale:
        logging.warning("%s: taking over a stale lock of %s, which is no longer running",
                        self.workdir, describe_holder(stale))
      f.seek(0)
      f.truncate()
      f.write(json.dumps(_holder_record()) + "\n")
      f.flush()
      os.fsync(f.fileno())
    except BaseException:
      f.close()
      raise
    self._file = f
    return self

  def _check_record_without_flock(self, f) -> None:
    """Filesystem without flock: the record decides; a live or remote holder keeps the lock."""
    f.seek(0)
    holder = _parse_holder(f.read())
    if not holder:
      return
    same_host = holder.get("host") == socket.gethostname()
    pid = holder.get("pid")
    if same_host and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid):
      return  # stale: its process is gone
    hint = "" if same_host else (
        f" This filesystem has no flock, so whether that process still runs cannot be checked "
        f"from here; if it does not, delete {self.path}.")
    raise WorkdirLocked(self._busy_message(holder) + hint)

  def _busy_message(self, holder) -> str:
    return (f"workdir {self.workdir} is in use by {describe_holder(holder)}: one run per "
            f"workdir. Wait for it to end, stop it, or use another --workdir (lock: {self.path})")

  def release(self) -> None:
    """Empties the record and drops the lock; safe to call twice."""
    if self._file is None:
      return
    f, self._file = self._file, None
    try:
      f.seek(0)
      f.truncate()
      f.flush()
    finally:
      f.close()  # closing drops the flock

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# Workdirs this process holds for its whole life (`hold_for_process`), by real path.
_PROCESS_HELD: dict[str, WorkdirLock | None] = {}


def lock_for_run(workdir: str) -> WorkdirLock | None:
  """Locks `workdir` for a (possibly multi-host) run: process 0 takes the lock, every process
  learns whether it got it.

  Returns:
    The held lock on process 0 (the caller releases it), None on the other processes or when
    this process already holds the workdir through `hold_for_process`.

  Raises:
    WorkdirLocked: on every process, when another run holds the workdir.
  """
  if os.path.realpath(workdir) in _PROCESS_HELD:
    return None
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return WorkdirLock(workdir).acquire()
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir).acquire()
    except WorkdirLocked as e:
      error = e
  ok = bool(multihost_utils.broadcast_one_to_all(np.int32(lock is not None)))
  if error is not None:
    raise error
  if not ok:
    raise WorkdirLocked(f"workdir {workdir} is in use by another run (process 0 could not lock "
                        f"{os.path.join(workdir, LOCK_NAME)}; its log names the holder)")
  return lock


def hold_for_process(workdir: str) -> None:
  """Locks `workdir` until this process exits (command-line runs); `Trainer`s of this process
  then use this lock instead of taking their own.

  Raises:
    WorkdirLocked: another run holds the workdir.
  """
  key = os.path.realpath(workdir)
  if key not in _PROCESS_HELD:
    lock = _PROCESS_HELD[key] = lock_for_run(workdir)
    if lock is not None:
      # Any exit but a kill empties the record, so the next run sees no stale lock.
      atexit.register(lock.release)


# ---- preemption ----------------------------------------------------------------------------------
class SigtermWatch:
  """`with SigtermWatch() as watch:` ... `watch.requested()`: True on every process once any
  process got SIGTERM, so all stop at the same iteration (a collective in multi-process runs:
  call it at the same point on every process). Outside the main thread no handler is installed
  (signals only reach the main thread); the previous handler is restored on exit."""

  def __init__(self):
    self._flag = False
    self._previous = None

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: finishing this iteration, then checkpointing and exiting")
    self._flag = True

  def __enter__(self) -> "SigtermWatch":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def requested(self) -> bool:
    import jax  # pylint: disable=import-outside-toplevel
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    flag = self._flag
    if jax.process_count() > 1:
      flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
    return flag


# ---- resume checks -------------------------------------------------------------------------------
def config_record(config) -> dict[str, Any]:
  """The resolved config as plain JSON (tuples become lists), as stored in checkpoint metadata."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def config_hash(config) -> str:
  """Short hash of the whole config (kept in checkpoint metadata beside `config_record`)."""
  return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_metadata(config) -> dict[str, Any]:
  """The metadata a training checkpoint stores for `check_resume`."""
  return {"config_hash": config_hash(config), "config": config_record(config)}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict) and tree:
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def config_changes(saved: dict[str, Any], current: dict[str, Any],
                   allowed: tuple[str, ...] = RESUMABLE_FIELDS) -> list[tuple[str, Any, Any]]:
  """Fields that differ between two `config_record`s, except the `allowed` ones.

  Args:
    saved, current: nested dicts of JSON values.
    allowed: dotted field names or fnmatch patterns (`log.*`) whose changes are ignored.

  Returns:
    Sorted (dotted field, saved value, current value); a field missing on one side has the
    value `MISSING` there.
  """
  a, b = _flatten(saved), _flatten(current)
  changes = []
  for field in sorted(a.keys() | b.keys()):
    old, new = a.get(field, MISSING), b.get(field, MISSING)
    if old != new and not any(fnmatch.fnmatchcase(field, p) for p in allowed):
      changes.append((field, old, new))
  return changes


class _Missing:
  def __repr__(self) -> str:
    return "<absent>"


MISSING = _Missing()


def check_resume(saved_metadata: dict[str, Any] | None, config, config_hash: str, step: int,
                 workdir: str) -> None:
  """Refuses to continue a checkpoint under a config that changes the experiment.

  Args:
    saved_metadata: the checkpoint's metadata ({'config': record, 'config_hash': h}); None or
      {} (no checkpoint, or one from before metadata was kept) passes.
    config: the new run's config.
    config_hash: the new config's hash (compared when the checkpoint predates 'config').
    step, workdir: for the message.

  Raises:
    ResumeMismatchError: naming every changed field with its saved and new value.
  """
  saved_metadata = saved_metadata or {}
  where = f"the checkpoint of iteration {step} in {workdir}"
  if "config" in saved_metadata:
    changes = config_changes(saved_metadata["config"], config_record(config))
    if changes:
      listed = "; ".join(f"{field}: saved {old!r}, now {new!r}" for field, old, new in changes)
      raise ResumeMismatchError(
          f"{where} was made by a different experiment: {listed}. Only "
          f"{', '.join(RESUMABLE_FIELDS)} may change when resuming; restore the other values "
          "or use a new --workdir")
  elif "config_hash" in saved_metadata and saved_metadata["config_hash"] != config_hash:
    raise ResumeMismatchError(
        f"{where} was saved with another config (hash {saved_metadata['config_hash']}, now "
        f"{config_hash}); it predates per-field metadata, so the changed fields cannot be "
        "named. Restore its config (WORKDIR/config.json) or use a new --workdir")


def finished_iteration(workdir: str, num_iterations: int) -> int | None:
  """The iteration of the workdir's latest checkpoint if it reaches `num_iterations`, else None.

  Reads only directory names (no lock, no orbax), so it is safe next to a running job.
  """
  from mgrpo_jax import checkpoint  # pylint: disable=import-outside-toplevel
  steps = checkpoint.committed_steps(workdir)
  return steps[-1] if steps and steps[-1] >= num_iterations else None
