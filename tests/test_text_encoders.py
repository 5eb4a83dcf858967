"""SD3's text encoders (CLIP text with projection, T5) against transformers' torch models.

Each torch model is the oracle: it is built from a tiny random config, saved with
`save_pretrained(safe_serialization=True)`, loaded by our torch-free loaders, and run on the same
ids. The prompt assembly is checked against diffusers' StableDiffusion3Pipeline recipe replayed on
the torch models' outputs.
"""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from mgrpo_jax import sharding as sharding_lib  # noqa: E402
from mgrpo_jax.models import text_encoders as te  # noqa: E402
from mgrpo_jax.models import weights  # noqa: E402
from tests.parity import randomise_norms_and_biases, rel_err  # noqa: E402

TOL = 1e-4
# CLIP-L style: quick_gelu and the legacy eos_token_id 2 (pool at the highest id).
CLIP_L = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, projection_dim=16,
              num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
              hidden_act="quick_gelu", eos_token_id=2, bos_token_id=0, pad_token_id=1)
# CLIP-G style: exact GELU and an explicit EOS id (pool at its first occurrence). The id sits
# mid-vocabulary so that "first EOS" and "highest id" pick different positions.
CLIP_G = dict(vocab_size=1000, hidden_size=40, intermediate_size=80, projection_dim=24,
              num_hidden_layers=3, num_attention_heads=5, max_position_embeddings=77,
              hidden_act="gelu", eos_token_id=500, bos_token_id=998, pad_token_id=1)
# T5 v1.1 (gated-gelu); d_model exceeds the CLIP widths' sum (72) as T5-XXL's 4096 does.
T5 = dict(vocab_size=100, d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=20,
          feed_forward_proj="gated-gelu", is_encoder_decoder=False)
# T5 v1.0 (relu, a single `wi`).
T5_V10 = dict(T5, d_model=32, feed_forward_proj="relu", relative_attention_num_buckets=16,
              relative_attention_max_distance=32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """Torch oracles and the directories they were saved to (T5 v1.1 in 20 kB shards)."""
  torch.manual_seed(0)
  build = {
      "clip_l": lambda: transformers.CLIPTextModelWithProjection(
          transformers.CLIPTextConfig(**CLIP_L, attn_implementation="sdpa")),
      "clip_g": lambda: transformers.CLIPTextModelWithProjection(
          transformers.CLIPTextConfig(**CLIP_G, attn_implementation="sdpa")),
      "t5": lambda: transformers.T5EncoderModel(transformers.T5Config(**T5)),
      "t5_v10": lambda: transformers.T5EncoderModel(transformers.T5Config(**T5_V10)),
  }
  refs, dirs = {}, {}
  for name, make in build.items():
    model = make().eval()
    # Fresh norms are 1 and biases 0: move them so that a dropped or swapped one shows.
    randomise_norms_and_biases(model, extra=("relative_attention_bias",))
    directory = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(directory, safe_serialization=True,
                          **({"max_shard_size": "20KB"} if name == "t5" else {}))
    refs[name], dirs[name] = model, directory
  assert os.path.exists(os.path.join(dirs["t5"], "model.safetensors.index.json"))
  return refs, dirs


def _clip_ids(eos: int, rng, b: int = 3, n: int = 77) -> np.ndarray:
  """Random ids [b, n] with EOS then padding (EOS repeated, or pad id 1), one row full."""
  ids = rng.integers(3, 900, size=(b, n))
  for row, length in enumerate((5, 20, n)[:b]):
    ids[row, length - 1] = eos
    ids[row, length:] = eos if eos != 2 else 1
  return ids


def _torch_clip(model, ids, mask=None):
  with torch.no_grad():
    return model(torch.from_numpy(ids), output_hidden_states=True,
                 attention_mask=None if mask is None else torch.from_numpy(mask))


@pytest.mark.parametrize("name", ["clip_l", "clip_g"])
def test_clip_matches_transformers(models, name):
  refs, dirs = models
  ref = refs[name]
  ours = te.load_clip_text(dirs[name])
  ids = _clip_ids(ref.config.eos_token_id, np.random.default_rng(1))
  out = _torch_clip(ref, ids)
  got = ours(jnp.asarray(ids))
  assert rel_err(got["last_hidden_state"], out.last_hidden_state.numpy()) < TOL
  assert len(got["hidden_states"]) == len(out.hidden_states) == CLIP_L["num_hidden_layers"] + 1
  for mine, theirs in zip(got["hidden_states"], out.hidden_states):
    assert rel_err(mine, theirs.numpy()) < TOL
  assert rel_err(got["penultimate"], out.hidden_states[-2].numpy()) < TOL
  assert rel_err(got["text_embeds"], out.text_embeds.numpy()) < TOL

  # The pooled position, by transformers' rule, independently of torch.
  eos = ref.config.eos_token_id
  where = ids.argmax(-1) if eos == 2 else (ids == eos).argmax(-1)
  if eos != 2:
    assert (where != ids.argmax(-1)).any()  # the two rules really differ on these ids
  np.testing.assert_array_equal(got["pooled"],
                                np.asarray(got["last_hidden_state"])[np.arange(3), where])


@pytest.mark.parametrize("name", ["clip_l", "clip_g"])
def test_clip_padding_mask_matches_transformers(models, name):
  refs, dirs = models
  ours = te.load_clip_text(dirs[name])
  eos = refs[name].config.eos_token_id
  ids = _clip_ids(eos, np.random.default_rng(4), n=24)
  mask = np.ones_like(ids)
  mask[0, 5:] = 0  # right padding
  mask[1, :4] = 0  # left padding: queries 0-3 see no key at all under the causal mask
  ids[1, 10] = eos
  out = _torch_clip(refs[name], ids, mask)
  got = ours(jnp.asarray(ids), jnp.asarray(mask))
  assert rel_err(got["last_hidden_state"], out.last_hidden_state.numpy()) < TOL
  assert rel_err(got["penultimate"], out.hidden_states[-2].numpy()) < TOL
  assert rel_err(got["text_embeds"], out.text_embeds.numpy()) < TOL


@pytest.mark.parametrize("name", ["t5", "t5_v10"])
def test_t5_matches_transformers(models, name):
  refs, dirs = models
  ours = te.load_t5_encoder(dirs[name])
  assert ours.config.gated == (name == "t5")
  ids = np.random.default_rng(2).integers(2, 100, size=(2, 40))
  ids[0, 30:] = 0  # padding, attended to as SD3 runs it
  with torch.no_grad():
    ref = refs[name](torch.from_numpy(ids)).last_hidden_state.numpy()
  assert rel_err(ours(jnp.asarray(ids)), ref) < TOL
  mask = (ids != 0).astype(np.int64)
  with torch.no_grad():
    ref_masked = refs[name](torch.from_numpy(ids),
                            attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  assert rel_err(ours(jnp.asarray(ids), jnp.asarray(mask)), ref_masked) < TOL


@pytest.mark.parametrize("stored", ["shared", "embed_tokens", "both"])
def test_t5_tied_token_table_under_either_name(models, tmp_path, stored):
  refs, dirs = models
  src = dirs["t5_v10"]
  tensors = load_file(os.path.join(src, "model.safetensors"))
  table = tensors.pop("shared.weight", None)
  table = tensors.pop("encoder.embed_tokens.weight", table)
  if stored in ("shared", "both"):
    tensors["shared.weight"] = table
  if stored in ("embed_tokens", "both"):
    tensors["encoder.embed_tokens.weight"] = table.copy()
  save_file(tensors, str(tmp_path / "model.safetensors"))
  shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
  ids = np.random.default_rng(5).integers(0, 100, size=(2, 12))
  with torch.no_grad():
    ref = refs["t5_v10"](torch.from_numpy(ids)).last_hidden_state.numpy()
  assert rel_err(te.load_t5_encoder(str(tmp_path))(jnp.asarray(ids)), ref) < TOL


def test_relative_position_buckets_by_hand():
  # 8 buckets, max distance 20: 4 per direction, exact below 2, log-spaced up to 20.
  b = te.relative_position_buckets(1, 8, 8, 20)[0]
  # Keys after the query get +4. Offsets 0, 1 are exact; offset r >= 2 goes to
  # 2 + floor(log(r / 2) / log(20 / 2) * 2): r = 2..6 -> 2 (log(3)/log(10)*2 = 0.95),
  # r = 7 -> 3 (log(3.5)/log(10)*2 = 1.09).
  assert list(b) == [0, 5, 6, 6, 6, 6, 6, 7]
  back = te.relative_position_buckets(8, 1, 8, 20)[:, 0]  # keys before the query: no offset
  assert list(back) == [0, 1, 2, 2, 2, 2, 2, 3]
  far = te.relative_position_buckets(1, 30, 8, 20)[0]
  assert far[25] == 4 + 3  # beyond max_distance: the last bucket


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (9, 40), (64, 256)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
  attention = transformers.models.t5.modeling_t5.T5Attention
  q, k = 300, 280
  rel = torch.arange(k)[None, :] - torch.arange(q)[:, None]
  ref = attention._relative_position_bucket(  # pylint: disable=protected-access
      rel, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance)
  np.testing.assert_array_equal(te.relative_position_buckets(q, k, num_buckets, max_distance),
                                ref.numpy())


def _pipeline_recipe(refs, ids_l, ids_g, ids_t5=None, t5_shape=None, clip_skip=None):
  """StableDiffusion3Pipeline.encode_prompt's assembly, replayed on the torch models."""
  layer = -2 if clip_skip is None else -(clip_skip + 2)
  with torch.no_grad():
    out_l = refs["clip_l"](torch.from_numpy(ids_l), output_hidden_states=True)
    out_g = refs["clip_g"](torch.from_numpy(ids_g), output_hidden_states=True)
    if ids_t5 is not None:
      t5_states = refs["t5"](torch.from_numpy(ids_t5))[0]
    else:  # the pipeline without text_encoder_3
      t5_states = torch.zeros(t5_shape)
    clip = torch.cat([out_l.hidden_states[layer], out_g.hidden_states[layer]], dim=-1)
    # F.pad with a negative width crops, which the pipeline inherits.
    clip = torch.nn.functional.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
    embeds = torch.cat([clip, t5_states], dim=-2).numpy()
    pooled = torch.cat([out_l.text_embeds, out_g.text_embeds], dim=-1).numpy()
  return embeds, pooled


def test_sd3_prompt_embedding_matches_pipeline_recipe(models):
  refs, dirs = models
  clip_l, clip_g = te.load_clip_text(dirs["clip_l"]), te.load_clip_text(dirs["clip_g"])
  t5 = te.load_t5_encoder(dirs["t5"])
  rng = np.random.default_rng(3)
  ids_l, ids_g = _clip_ids(2, rng), _clip_ids(CLIP_G["eos_token_id"], rng)
  ids_t5 = rng.integers(2, 100, size=(3, 16))
  args = [jnp.asarray(a) for a in (ids_l, ids_g, ids_t5)]

  embeds, pooled = te.encode_sd3_prompt(clip_l, clip_g, t5, *args)
  expected, expected_pooled = _pipeline_recipe(refs, ids_l, ids_g, ids_t5)
  assert embeds.shape == (3, 77 + 16, 96) and pooled.shape == (3, 16 + 24)
  assert embeds.dtype == pooled.dtype == jnp.float32
  assert rel_err(embeds, expected) < TOL
  assert rel_err(pooled, expected_pooled) < TOL
  np.testing.assert_array_equal(embeds[:, :77, 72:], 0.0)  # channel padding of the CLIP part

  # Jitted as the sampler runs it.
  jitted = nnx.jit(lambda a, b, c, x, y, z: te.encode_sd3_prompt(a, b, c, x, y, z))
  embeds_jit, pooled_jit = jitted(clip_l, clip_g, t5, *args)
  np.testing.assert_allclose(embeds_jit, embeds, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pooled_jit, pooled, rtol=1e-5, atol=1e-5)

  skipped, _ = te.encode_sd3_prompt(clip_l, clip_g, t5, *args, clip_skip=1)
  assert rel_err(skipped, _pipeline_recipe(refs, ids_l, ids_g, ids_t5, clip_skip=1)[0]) < TOL

  # Without T5: zeros of [B, max_sequence_length, joint_attention_dim].
  no_t5, pooled_no_t5 = te.encode_sd3_prompt(clip_l, clip_g, None, args[0], args[1],
                                             t5_width=96, t5_length=16)
  assert rel_err(no_t5, _pipeline_recipe(refs, ids_l, ids_g, t5_shape=(3, 16, 96))[0]) < TOL
  np.testing.assert_array_equal(no_t5[:, 77:], 0.0)
  np.testing.assert_array_equal(pooled_no_t5, pooled)
  # A joint width below the CLIP widths' sum crops, as diffusers' F.pad does.
  narrow, _ = te.encode_sd3_prompt(clip_l, clip_g, None, args[0], args[1], t5_width=50,
                                   t5_length=4)
  assert rel_err(narrow, _pipeline_recipe(refs, ids_l, ids_g, t5_shape=(3, 4, 50))[0]) < TOL

  with pytest.raises(ValueError, match="ids_t5"):
    te.encode_sd3_prompt(clip_l, clip_g, t5, args[0], args[1])
  with pytest.raises(ValueError, match="clip_skip=3"):
    te.encode_sd3_prompt(clip_l, clip_g, t5, *args, clip_skip=3)


def test_loads_sharded_on_8_device_mesh(models):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices; see tests/conftest.py")
  refs, dirs = models
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  clip = te.load_clip_text(dirs["clip_l"], mesh=mesh)
  q = clip.text_model.encoder.layers[0].self_attn.q_proj.kernel[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (8, 16)
  t5 = te.load_t5_encoder(dirs["t5"], mesh=mesh)
  wo = t5.encoder.block[0].layer[1].DenseReluDense.wo.kernel[...]
  assert wo.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert t5.shared.embedding[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")

  ids = _clip_ids(2, np.random.default_rng(6), b=2)
  assert rel_err(clip(jnp.asarray(ids))["text_embeds"], _torch_clip(refs["clip_l"], ids)
                 .text_embeds.numpy()) < TOL
  ids_t5 = np.random.default_rng(7).integers(0, 100, size=(2, 12))
  with torch.no_grad():
    ref = refs["t5"](torch.from_numpy(ids_t5)).last_hidden_state.numpy()
  assert rel_err(t5(jnp.asarray(ids_t5)), ref) < TOL


def test_bfloat16_weights_and_compute(models):
  refs, dirs = models
  clip = te.load_clip_text(dirs["clip_g"], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert clip.text_projection.kernel[...].dtype == jnp.bfloat16
  ids = _clip_ids(CLIP_G["eos_token_id"], np.random.default_rng(8))
  out = clip(jnp.asarray(ids))
  assert out["penultimate"].dtype == out["text_embeds"].dtype == jnp.float32
  assert rel_err(out["text_embeds"], _torch_clip(refs["clip_g"], ids).text_embeds.numpy()) < 3e-2
  t5 = te.load_t5_encoder(dirs["t5"], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  ids_t5 = np.random.default_rng(9).integers(0, 100, size=(2, 12))
  with torch.no_grad():
    ref = refs["t5"](torch.from_numpy(ids_t5)).last_hidden_state.numpy()
  assert rel_err(t5(jnp.asarray(ids_t5)), ref) < 3e-2


@pytest.mark.parametrize("ours,theirs", [(te.CLIPTextConfig, transformers.CLIPTextConfig),
                                         (te.T5Config, transformers.T5Config)])
def test_config_defaults_are_transformers_defaults(ours, theirs):
  # A config.json that omits a key must mean what it means to transformers.
  reference = theirs()
  for field in dataclasses.fields(ours):
    if field.name not in ("dtype", "param_dtype"):
      assert getattr(ours(), field.name) == getattr(reference, field.name), field.name


def _copy_with(src, dst, drop=(), add=None, config=None):
  """A copy of the single-file checkpoint `src` in a new directory `dst`, edited."""
  os.makedirs(dst)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  for name in drop:
    del tensors[name]
  tensors.update(add or {})
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(dict(cfg, **(config or {})), f)
  return str(dst)


def test_errors_name_the_problem(models, tmp_path):
  _, dirs = models
  src = dirs["clip_l"]
  missing = _copy_with(src, tmp_path / "missing",
                       drop=["text_model.encoder.layers.1.mlp.fc2.weight"])
  with pytest.raises(weights.CheckpointError, match=r"missing: text_model\.encoder\.layers\.1"
                     r"\.mlp\.fc2\.weight"):
    te.load_clip_text(missing)

  extra = _copy_with(src, tmp_path / "extra", add={
      "text_model.embeddings.position_ids": np.arange(77)[None],  # a buffer: skipped
      "text_model.stray.weight": np.zeros((2,), np.float32)})
  with pytest.raises(weights.CheckpointError, match=r"unexpected: text_model\.stray\.weight"):
    te.load_clip_text(extra)

  bad_act = _copy_with(src, tmp_path / "act", config={"hidden_act": "swish7"})
  with pytest.raises(ValueError, match="hidden_act='swish7'"):
    te.load_clip_text(bad_act)
  abstract = nnx.split(nnx.eval_shape(lambda: te.CLIPTextModelWithProjection(
      te.CLIPTextConfig(**{k: v for k, v in CLIP_L.items() if k not in ("bos_token_id",
                                                                         "pad_token_id")}),
      rngs=nnx.Rngs(0))))[1]
  with pytest.raises(ValueError, match="hidden_act='swish7'"):
    te.load_clip_text_state(bad_act, abstract)

  fewer = _copy_with(src, tmp_path / "layers", config={"num_hidden_layers": 4})
  with pytest.raises(weights.CheckpointError, match=r"missing: text_model\.encoder\.layers\.3\."):
    te.load_clip_text(fewer)

  for proj in ("gated-swish7", "fancy-gelu", "gated-gelu-x"):
    with pytest.raises(ValueError, match=f"feed_forward_proj='{proj}'"):
      te.T5Config.from_hf_config(dict(T5, feed_forward_proj=proj))
  with pytest.raises(ValueError, match="length 78 exceeds max_position_embeddings=77"):
    te.load_clip_text(src)(jnp.zeros((1, 78), jnp.int32))
