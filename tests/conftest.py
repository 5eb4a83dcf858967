"""Test session setup: 8 simulated CPU devices, so multi-device code runs on any machine.

XLA reads the flag when the backend starts, so it is set before anything imports jax.
Single-device tests are unaffected: unsharded arrays live on device 0.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
