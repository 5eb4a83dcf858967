"""Tests for mgrpo_jax.checkpoint: round trips, retention, shardings, crash safety, errors."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mgrpo_jax import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def abstract_of(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def nested_state():
  params = {"dense": {"kernel": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7,
                      "bias": jnp.linspace(-1, 1, 4, dtype=jnp.bfloat16)},
            "layers": [jnp.full((2,), 3, jnp.int32), jnp.array([1.5, -2.5], jnp.bfloat16)]}
  return {
      "params": params,
      # optax states are NamedTuples: the restored tree must have the same node types.
      "opt_state": optax.adam(1e-3).init(params["dense"]),
      "rng": jax.random.key(42),
      "rng_rbg": jax.random.split(jax.random.key(7, impl="rbg"), 3),
      "rng_data": jax.random.key_data(jax.random.key(5)),
      "step": jnp.array(17, jnp.int32),
  }


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh interpreter with 8 simulated CPU devices."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def test_round_trip_nested_tree_with_keys(tmp_path):
  state = nested_state()
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(3, state, {"epoch": 1, "index": 40}, metadata={"config_hash": "abc"})
    ckpt.wait()
  # A new process-like instance reads what the first one wrote.
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() == 3
    restored, data_state, metadata = ckpt.restore(3, abstract_of(state))
  assert data_state == {"epoch": 1, "index": 40}
  assert metadata == {"config_hash": "abc"}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for want, got in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert got.dtype == want.dtype and got.shape == want.shape
    if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
      assert jax.random.key_impl(got) == jax.random.key_impl(want)
      want, got = jax.random.key_data(want), jax.random.key_data(got)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Restored keys draw the same numbers as the originals.
  np.testing.assert_array_equal(jax.random.uniform(restored["rng"], (3,)),
                                jax.random.uniform(state["rng"], (3,)))


def test_pack_unpack_rng_round_trip():
  key = jax.random.split(jax.random.key(1), 4)
  data = ckpt_lib.pack_rng(key)
  assert data.shape == (4, 2) and data.dtype == jnp.uint32
  back = ckpt_lib.unpack_rng(data)
  np.testing.assert_array_equal(jax.random.key_data(back), data)
  raw = jnp.arange(2, dtype=jnp.uint32)
  assert ckpt_lib.pack_rng(raw) is raw


def test_keeps_latest_n_and_honours_interval(tmp_path):
  state = {"w": jnp.ones((2,))}
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2, save_interval_steps=2)
  saved = [ckpt.save(s, state, {"s": s}) for s in range(1, 7)]
  assert saved == [False, True, False, True, False, True]
  ckpt.wait()
  assert ckpt.all_steps() == [4, 6]
  assert ckpt.save(7, state, {"s": 7}, force=True)
  assert not ckpt.save(7, state, {"s": 7}, force=True)  # an existing step is never overwritten
  ckpt.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "7"]
  with ckpt_lib.Checkpointer(str(tmp_path)) as reopened:
    assert reopened.latest_step() == 7
    assert reopened.restore(7, abstract_of(state))[1] == {"s": 7}


def test_restore_into_given_named_sharding(tmp_path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  state = {"x": jax.device_put(jnp.arange(8.0).reshape(2, 4), NamedSharding(mesh, P("data"))),
           "key": jax.random.key(0)}
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, state, {})
    target = {"x": jax.ShapeDtypeStruct((2, 4), jnp.float32, sharding=NamedSharding(mesh, P())),
              "key": jax.ShapeDtypeStruct((), state["key"].dtype,
                                          sharding=NamedSharding(mesh, P()))}
    restored, _, _ = ckpt.restore(1, target)
  assert restored["x"].sharding == target["x"].sharding
  assert restored["key"].sharding == target["key"].sharding
  np.testing.assert_array_equal(restored["x"], state["x"])


@pytest.mark.multidevice
def test_restore_reshards_across_eight_devices(tmp_path):
  result = run_python(f"""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mgrpo_jax import checkpoint as ckpt_lib
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("data",))
    values = np.arange(32, dtype=np.float32).reshape(8, 4)
    keys = jax.random.split(jax.random.key(3), 8)
    state = {{"x": jax.device_put(values, NamedSharding(mesh, P("data"))),
             "keys": jax.device_put(keys, NamedSharding(mesh, P("data")))}}
    ckpt = ckpt_lib.Checkpointer({str(tmp_path)!r})
    ckpt.save(1, state, {{}})
    for spec in (P(None), P("data")):
      sharding = NamedSharding(mesh, spec)
      target = {{"x": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sharding),
                "keys": jax.ShapeDtypeStruct((8,), keys.dtype, sharding=sharding)}}
      restored, _, _ = ckpt.restore(1, target)
      for name in ("x", "keys"):
        assert restored[name].sharding == sharding, (name, restored[name].sharding)
      np.testing.assert_array_equal(np.asarray(restored["x"]), values)
      np.testing.assert_array_equal(jax.random.key_data(restored["keys"]),
                                    jax.random.key_data(keys))
      rows = 8 if spec == P(None) else 1
      for shard in restored["x"].addressable_shards:
        assert shard.data.shape == (rows, 4), shard.data.shape
        np.testing.assert_array_equal(np.asarray(shard.data), values[shard.index])
    ckpt.close()
    print("OK")
  """)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-4000:]


def test_crash_mid_save_keeps_previous_step_restorable(tmp_path):
  # The writer dies after every file of step 2 is written but before orbax's commit rename:
  # the worst moment, and with max_to_keep=1 it also shows step 1 is not deleted beforehand.
  crash_exit = 17
  result = run_python(f"""
    import os
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from mgrpo_jax import checkpoint as ckpt_lib
    ckpt = ckpt_lib.Checkpointer({str(tmp_path)!r}, max_to_keep=1)
    ckpt.save(1, {{"w": jnp.full((64,), 1.0)}}, {{"index": 1}})
    ckpt.wait()
    commit = atomicity.AtomicRenameTemporaryPath.finalize
    async def die_before_commit(self):
      if self.get_final().name == "2":
        os._exit({crash_exit})
      return await commit(self)
    atomicity.AtomicRenameTemporaryPath.finalize = die_before_commit
    ckpt.save(2, {{"w": jnp.full((64,), 2.0)}}, {{"index": 2}})
    ckpt.wait()
  """)
  assert result.returncode == crash_exit, result.stderr[-4000:]
  root = tmp_path / "checkpoints"
  leftover = root / "2.orbax-checkpoint-tmp"
  assert sorted(os.listdir(root)) == ["1", "2.orbax-checkpoint-tmp"]
  assert (leftover / "state").is_dir()  # half-written: data present, never committed

  abstract = abstract_of({"w": jnp.zeros((64,))})
  with ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=1) as ckpt:
    assert ckpt.latest_step() == 1
    state, data_state, _ = ckpt.restore(1, abstract)
    np.testing.assert_array_equal(state["w"], np.full((64,), 1.0))
    assert data_state == {"index": 1}
    # The resumed run saves step 2 again over the stale temporary directory.
    assert ckpt.save(2, {"w": jnp.full((64,), 3.0)}, {"index": 2})
    ckpt.wait()
    assert ckpt.all_steps() == [2]
    np.testing.assert_array_equal(ckpt.restore(2, abstract)[0]["w"], np.full((64,), 3.0))
  assert sorted(os.listdir(root)) == ["2"]


def test_mismatched_abstract_tree_raises_naming_each_problem(tmp_path):
  state = {"a": jnp.zeros((2, 3)), "b": jnp.ones((3,), jnp.bfloat16), "c": jnp.int32(1)}
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  ckpt.save(1, state, {})
  sharding = state["a"].sharding
  wrong = {"a": jax.ShapeDtypeStruct((3, 3), jnp.float32, sharding=sharding),
           "b": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=sharding),  # no silent cast
           "d": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding)}
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as info:
    ckpt.restore(1, wrong)
  message = str(info.value)
  assert "step 1" in message and "4 problem(s)" in message
  assert "a: saved float32[2, 3], requested float32[3, 3]" in message
  assert "b: saved bfloat16[3], requested float32[3]" in message
  assert "d: in the abstract tree but not in the checkpoint" in message
  assert "c: in the checkpoint but not in the abstract tree" in message
  assert isinstance(info.value, ValueError)

  no_sharding = dict(abstract_of(state), a=jax.ShapeDtypeStruct((2, 3), jnp.float32))
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"\['a'\].*no sharding"):
    ckpt.restore(1, no_sharding)
  with pytest.raises(FileNotFoundError, match="step 5.*available steps: \\[1\\]"):
    ckpt.restore(5, abstract_of(state))
  ckpt.close()


def test_retired_keys_are_read_and_dropped(tmp_path):
  """A field that older versions saved (here a key's data, as the trainer's old "rng") restores
  only when named in `retired`; the other entries come back unchanged."""
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, {"w": jnp.arange(4.0), "rng": jax.random.key_data(jax.random.key(3)),
                  "nested": {"x": jnp.ones((2, 2))}}, {"index": 7})
    current = {"w": jnp.zeros(4), "nested": {"x": jnp.zeros((2, 2))}}
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match="rng: in the checkpoint but not in the abstract tree"):
      ckpt.restore(1, abstract_of(current))
    state, data, _ = ckpt.restore(1, abstract_of(current), retired=("rng", "not_saved"))
  assert sorted(state) == ["nested", "w"]
  np.testing.assert_array_equal(state["w"], [0.0, 1.0, 2.0, 3.0])
  np.testing.assert_array_equal(state["nested"]["x"], np.ones((2, 2)))
  assert data == {"index": 7}


def test_async_save_survives_donated_source_then_wait(tmp_path):
  x = jax.random.normal(jax.random.key(0), (512, 512))
  expected = np.asarray(x)
  abstract = abstract_of({"x": x})
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=True)
  assert ckpt.save(1, {"x": x}, {"index": 0})
  # A jitted step donating the state frees its buffers right after the save call returns.
  x.delete()
  ckpt.wait()
  assert os.listdir(tmp_path / "checkpoints") == ["1"]
  restored, _, _ = ckpt.restore(1, abstract)
  np.testing.assert_array_equal(np.asarray(restored["x"]), expected)
  ckpt.close()
  ckpt.close()  # idempotent


def test_check_metadata_lists_differing_keys(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  ckpt.check_metadata({"config_hash": "anything"})  # no checkpoint yet: nothing to compare
  ckpt.save(4, {"w": jnp.zeros(1)}, {}, metadata={"config_hash": "abc", "model": "tiny"})
  ckpt.check_metadata({"config_hash": "abc"})
  ckpt.check_metadata({"config_hash": "abc", "model": "tiny"})
  with pytest.raises(ValueError) as info:
    ckpt.check_metadata({"config_hash": "xyz", "model": "tiny", "seed": 1})
  message = str(info.value)
  assert "config_hash: saved 'abc', expected 'xyz'" in message
  assert "seed: saved '<missing>', expected 1" in message
  assert "model" not in message.split("metadata:")[1]
  assert ckpt.read_metadata(4) == {"config_hash": "abc", "model": "tiny"}
  ckpt.close()


def test_save_rejects_non_json_items_by_name(tmp_path):
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(TypeError, match="data_state must be JSON"):
      ckpt.save(1, {"w": jnp.zeros(1)}, {"rng": np.zeros(2)})
    with pytest.raises(TypeError, match="metadata must be JSON"):
      ckpt.save(1, {"w": jnp.zeros(1)}, {}, metadata={"loss": float("nan")})
    assert ckpt.latest_step() is None
