"""Tiny generator, byte tokenizer, LoRA injection and the registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mgrpo_jax  # noqa: F401  (sharding defaults)
from mgrpo_jax import policy as policy_lib
from mgrpo_jax.models import lora as lora_lib
from mgrpo_jax.models import registry
from mgrpo_jax.models.tokenizer import ByteTokenizer

TARGETS = (r"attn\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",)


def test_byte_tokenizer_by_hand():
  tok = ByteTokenizer(6)
  ids = tok(["ab", "", "héllo!"])["input_ids"]
  assert ids.dtype == np.int32 and ids.shape == (3, 6)
  # 'a' = 97, 'b' = 98 -> +3; BOS 1, EOS 2, PAD 0.
  np.testing.assert_array_equal(ids[0], [1, 100, 101, 2, 0, 0])
  np.testing.assert_array_equal(ids[1], [1, 2, 0, 0, 0, 0])
  # 'h' 'é'(0xC3 0xA9) 'l' then truncated to 4 bytes, EOS kept.
  np.testing.assert_array_equal(ids[2], [1, 104 + 3, 0xC3 + 3, 0xA9 + 3, 108 + 3, 2])
  assert tok.decode(ids[0]) == "ab"
  with pytest.raises(TypeError):
    tok("not a list")


def test_lora_linear_matches_numpy():
  base = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
  base.bias[...] = jnp.arange(3, dtype=jnp.float32)
  layer = lora_lib.LoRALinear(base, rank=2, alpha=6.0, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(5, 2)), rng.normal(size=(2, 3))
  layer.lora_a[...] = jnp.asarray(a, jnp.float32)
  layer.lora_b[...] = jnp.asarray(b, jnp.float32)
  x = rng.normal(size=(4, 5)).astype(np.float32)
  w = np.asarray(layer.kernel[...], np.float64)
  expected = x @ w + np.arange(3) + (6.0 / 2) * (x @ a @ b)
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


def _tiny_inputs(generator, batch=2):
  tokens = {k: jnp.asarray(v) for k, v in generator.tokenize(["a red sign", "blue"]).items()}
  x = jax.random.normal(jax.random.key(3), (batch,) + generator.latent_shape)
  return tokens, x, jnp.array([0.3, 0.9])


def test_tiny_model_shapes_and_ranges():
  generator = registry.get_generator(registry.default_tiny_model_config())
  model = generator.make_module(nnx.Rngs(0))
  tokens, x, sigma = _tiny_inputs(generator)
  cond = model.encode_text(tokens)
  assert cond["hidden"].shape == (2, 32, 64) and cond["pooled"].shape == (2, 64)
  v = model.velocity(x, sigma, cond)
  assert v.shape == x.shape and v.dtype == jnp.float32
  images = model.decode(x)
  assert images.shape == (2,) + generator.image_shape
  assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
  # The text encoder ignores padding: the pooled embedding is the mean over real tokens only, so
  # a prompt encodes the same whatever else is in the batch.
  alone = model.encode_text({"input_ids": tokens["input_ids"][1:]})
  np.testing.assert_allclose(alone["pooled"][0], cond["pooled"][1], rtol=1e-6, atol=1e-6)


def test_apply_lora_keeps_base_paths_and_outputs():
  generator = registry.get_generator(registry.default_tiny_model_config())
  model = generator.make_module(nnx.Rngs(0))
  tokens, x, sigma = _tiny_inputs(generator)
  base_paths = {p for p, _ in nnx.to_flat_state(nnx.state(model))}
  before = model.velocity(x, sigma, model.encode_text(tokens))
  adapted = lora_lib.apply_lora(model, TARGETS, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  # 2 blocks x (4 image + 3 context projections) + the first block's context output projection;
  # the last block is context_pre_only and has no to_add_out.
  assert len(adapted) == 15
  assert all(".attn." in p for p in adapted)
  graphdef, adapters, base = lora_lib.split_lora(model)
  assert {p for p, _ in nnx.to_flat_state(base)} == base_paths
  assert len(jax.tree.leaves(adapters)) == 2 * len(adapted)
  after = model.velocity(x, sigma, model.encode_text(tokens))
  np.testing.assert_array_equal(after, before)  # B = 0 at init

  # With non-zero adapters the output moves; zeroing them (the KL reference) restores the base.
  moved = jax.tree.map(lambda a: a + 0.05, adapters)
  policy = policy_lib.Policy(graphdef, lora=True)
  cond = model.encode_text(tokens)
  v_policy = policy.velocity_fn(moved, base)(x, sigma, cond)
  v_ref = policy.velocity_fn(moved, base, reference=True)(x, sigma, cond)
  assert float(jnp.abs(v_policy - before).max()) > 1e-3
  np.testing.assert_array_equal(v_ref, before)

  # Merging folds the adapters into the kernels without changing outputs.
  merged = nnx.merge(graphdef, moved, base)
  lora_lib.merge_lora(merged)
  np.testing.assert_allclose(merged.velocity(x, sigma, cond), v_policy, rtol=1e-4, atol=1e-5)


def test_apply_lora_unmatched_target_is_named():
  model = registry.make_module(registry.default_tiny_model_config())
  with pytest.raises(ValueError, match="match no Linear layer"):
    lora_lib.apply_lora(model, (r"attn\.nope$",), 4, 8.0, rngs=nnx.Rngs(0))


def test_registry_errors_name_the_problem():
  config = registry.default_tiny_model_config()
  config.name = "sd9"
  with pytest.raises(ValueError, match="sd9.*tiny"):
    registry.get_generator(config)
  config = registry.default_tiny_model_config()
  config.num_layerz = 3
  with pytest.raises(ValueError, match="num_layerz"):
    registry.get_generator(config)
  config = registry.default_tiny_model_config()
  config.latent_size = 15
  with pytest.raises(ValueError, match="latent_size=15"):
    registry.get_generator(config)


def test_sharded_init_places_adapters_by_logical_axes():
  from mgrpo_jax import sharding as sharding_lib
  import ml_collections
  config = ml_collections.ConfigDict({
      "seed": 0, "model": registry.default_tiny_model_config(),
      "lora": {"enabled": True, "targets": TARGETS, "rank": 4, "alpha": 8.0},
      "train": {"beta": 0.04}})
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  generator = registry.get_generator(config.model)
  _, trainable, frozen = policy_lib.build_model_states(generator, config, mesh)
  a = trainable["transformer"]["transformer_blocks"][0]["attn"]["to_q"]["lora_a"][...]
  b = trainable["transformer"]["transformer_blocks"][0]["attn"]["to_q"]["lora_b"][...]
  k = frozen["transformer"]["transformer_blocks"][0]["attn"]["to_q"]["kernel"][...]
  assert a.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert b.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
  assert k.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert float(jnp.abs(b).max()) == 0.0
