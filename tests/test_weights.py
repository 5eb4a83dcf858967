"""Safetensors reading without torch: single and sharded files, bf16, placement, named errors."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import save_file

from mgrpo_jax.models import weights


def write_sharded(tmp_path):
  a = np.arange(12, dtype=np.float32).reshape(3, 4)
  b = np.arange(16, dtype=np.float32).reshape(8, 2)
  save_file({"a.weight": a}, str(tmp_path / "model-00001-of-00002.safetensors"))
  save_file({"b.weight": b}, str(tmp_path / "model-00002-of-00002.safetensors"))
  index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                          "b.weight": "model-00002-of-00002.safetensors"}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  return a, b


def test_sharded_index_and_transforms(tmp_path):
  a, b = write_sharded(tmp_path)
  ckpt = weights.Checkpoint(str(tmp_path))
  assert ckpt.keys() == ["a.weight", "b.weight"]
  mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
  targets = {
      "a": ("a.weight", weights.linear_kernel,
            jax.ShapeDtypeStruct((4, 3), np.float32, sharding=NamedSharding(mesh, P()))),
      "b": ("b.weight", None,
            jax.ShapeDtypeStruct((8, 2), np.float32, sharding=NamedSharding(mesh, P("fsdp")))),
  }
  out = weights.load_tensors(ckpt, targets)
  np.testing.assert_array_equal(out["a"], a.T)
  np.testing.assert_array_equal(out["b"], b)
  assert len(out["b"].sharding.device_set) == 8
  assert out["b"].addressable_shards[0].data.shape == (1, 2)


def test_bfloat16_written_by_torch_reads_exactly(tmp_path):
  torch = pytest.importorskip("torch")
  from safetensors.torch import save_file as torch_save  # pylint: disable=import-outside-toplevel
  t = torch.randn(5, 3).bfloat16()
  torch_save({"w": t}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  got = weights.Checkpoint(str(tmp_path)).get("w")
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())


def test_problems_are_named(tmp_path):
  write_sharded(tmp_path)
  ckpt = weights.Checkpoint(str(tmp_path))
  targets = {
      "a": ("a.weight", None, jax.ShapeDtypeStruct((4, 3), np.float32)),
      "c": ("c.weight", None, jax.ShapeDtypeStruct((1,), np.float32)),
  }
  with pytest.raises(weights.CheckpointError) as e:
    weights.load_tensors(ckpt, targets, component="transformer")
  msg = str(e.value)
  assert "missing: c.weight" in msg and "unexpected: b.weight" in msg
  assert "a.weight is (3, 4)" in msg and "expects (4, 3)" in msg


def test_missing_directory_and_pickles_are_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    weights.Checkpoint(str(tmp_path / "nope"))
  (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
  with pytest.raises(FileNotFoundError, match="never pickles"):
    weights.Checkpoint(str(tmp_path))
