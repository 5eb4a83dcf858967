"""Test session setup: 8 simulated CPU devices, so multi-device code runs on any machine, and one
persistent compilation cache for the session.

XLA reads the flag when the backend starts, so it is set before anything imports jax.
Single-device tests are unaffected: unsharded arrays live on device 0.

The end-to-end tests build the same tiny trainer many times, in this process and in the
subprocesses they start (which inherit the environment). Most of a tiny run on a CPU is XLA
compilation, and a new Trainer compiles again because its jitted functions are new closures;
jax's persistent cache keys on the compiled program, so an identical later run loads every
executable instead. `test_killed_and_resumed_run_equals_uninterrupted` (three identical runs)
took 259 s alone with the cache off (`JAX_COMPILATION_CACHE_DIR= python -m pytest -q
tests/test_train.py -k killed_and_resumed`) and 110 s with it, on 2 cores. The cache lives in a
fresh temporary directory per session (never stale across jax versions) and is deleted at the
end; a user's own JAX_COMPILATION_CACHE_DIR wins (empty: off).
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="mgrpo_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  # Cache every program: the tiny model's compilations are each well under jax's 1 s default.
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
