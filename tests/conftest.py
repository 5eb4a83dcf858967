"""Test session setup: 8 simulated CPU devices, so multi-device code runs on any machine, and one
persistent compilation cache for the session.

XLA reads the flag when the backend starts, so it is set before anything imports jax.
Single-device tests are unaffected: unsharded arrays live on device 0.

The end-to-end tests build the same tiny trainer many times, in this process and in the
subprocesses they start (which inherit the environment); on two CPU cores XLA compilation is
about three quarters of a 3-iteration tiny run (60 of 79 s), and a new Trainer compiles again
because its jitted functions are new closures. jax's persistent cache keys on the compiled
program, so a second identical run loads every executable instead (12.5 s against 70 s for the
second of two identical runs in one process). The cache lives in a fresh temporary directory
per session (never stale across jax versions) and is deleted at the end; a user's own
JAX_COMPILATION_CACHE_DIR wins.
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
