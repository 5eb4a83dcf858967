"""One device mesh and one set of logical axis rules for the whole program.

Model code names array axes logically ('embed', 'mlp', 'heads', 'batch'); `LOGICAL_RULES` maps
them to the mesh axes ('data', 'fsdp', 'tensor'). Parameters are created directly in their
shardings: shapes come from `jax.eval_shape`, shardings from the logical names, and the init
function is jitted with those `out_shardings`, so no full copy of the weights ever lives on one
device.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Batches are split over data and fsdp (FSDP shards the batch too); weights over fsdp/tensor.
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """Mesh with axes (data, fsdp, tensor) from a config group {data, fsdp, tensor}; -1 = rest.

  Raises:
    ValueError: if the sizes do not multiply to the device count.
  """
  devices = jax.devices() if devices is None else devices
  sizes = [int(mesh_config[name]) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are not "
                       f"divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"have {len(devices)}")
  device_array = np.asarray(devices).reshape(sizes)
  return Mesh(device_array, MESH_AXES)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...], rules=LOGICAL_RULES
              ) -> jax.Array:
  """Pins an activation's sharding by logical axis names, inside `jax.set_mesh(mesh)`.

  Without these hints XLA may resolve a batch-sharded activation meeting an FSDP-sharded weight
  by gathering the batch instead of the weight, which multiplies activation memory by the
  device count. Outside a mesh context (single-device use, tests) it is the identity.
  """
  if jax.sharding.get_abstract_mesh().empty:
    return x
  spec = nn.logical_to_mesh_axes(logical_axes, rules)
  return jax.lax.with_sharding_constraint(x, spec)


def with_mesh(fn: Callable, mesh: Mesh) -> Callable:
  """Wraps `fn` (typically jitted) so it traces and runs inside `jax.set_mesh(mesh)`."""
  def wrapped(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)
  wrapped.__wrapped__ = fn
  return wrapped


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of an array whose leading axis is the (prompt) batch."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_size_multiple(mesh: Mesh) -> int:
  """The batch axis must be divisible by this (devices along data x fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


@contextlib.contextmanager
def fast_module_tracing():
  """Traces NNX module construction without jax's quadratic tracer error-message cost.

  Flax NNX probes `getattr(value, 'sharding', None)` on every RNG-counter update; on a tracer
  that raises an AttributeError whose message jax builds by walking the whole trace so far
  (`DynamicJaxprTracer._origin_msg`), so tracing a model's initialisation costs O(modules^2):
  65 s instead of 5.5 s for SD3.5-M's transformer on this 2-core machine. The message is only
  read when the attribute error escapes, which here it never does (`getattr` with a default
  swallows it), so it is skipped while the block runs.
  """
  try:
    from jax._src.interpreters import partial_eval as pe  # pylint: disable=g-import-not-at-top
    tracer = pe.DynamicJaxprTracer
    original = tracer._origin_msg  # pylint: disable=protected-access
  except (ImportError, AttributeError):  # another jax layout: nothing to skip
    yield
    return
  tracer._origin_msg = lambda self: ""  # pylint: disable=protected-access
  try:
    yield
  finally:
    tracer._origin_msg = original  # pylint: disable=protected-access


def state_shardings(abstract_state: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedShardings for an nnx.State (or pytree of them) from its logical axis metadata."""
  specs = nnx.get_partition_spec(abstract_state)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def create_sharded(init_fn: Callable[[], Any], mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """Runs `init_fn` (returning nnx.State trees) with every array created in its sharding."""
  with fast_module_tracing():
    abstract = jax.eval_shape(init_fn)
    shardings = state_shardings(abstract, mesh, rules)
    return jax.jit(init_fn, out_shardings=shardings)()


def global_batch(local: Any, mesh: Mesh) -> Any:
  """This process's rows of a batch (numpy, leading axis) -> global arrays sharded on the batch.

  On one host the local rows are the whole batch; on several, each host passes its own share and
  the global batch is their concatenation in process order.
  """
  def put(a):
    a = np.asarray(a)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, a.ndim), a)
  return jax.tree.map(put, local)


def local_rows(global_array: jax.Array) -> np.ndarray:
  """The rows of a batch-sharded global array that live on this process, as numpy."""
  if global_array.is_fully_addressable:
    return np.asarray(global_array)
  shards = sorted(global_array.addressable_shards, key=lambda s: s.index[0].start or 0)
  rows, seen = [], set()
  for s in shards:
    start = s.index[0].start or 0
    if start not in seen:  # replicas along other mesh axes hold the same rows
      seen.add(start)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows, axis=0)
