"""CLIP text (L/G style) and T5 encoders against transformers' torch models; SD3 prompt assembly."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from mgrpo_jax.models import text_encoders as te  # noqa: E402
from mgrpo_jax.models import weights  # noqa: E402
from tests.parity import randomise_norms_and_biases, rel_err  # noqa: E402

CLIP_L = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, projection_dim=16,
              num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
              hidden_act="quick_gelu", eos_token_id=2)
# CLIP-G style: exact GELU and an explicit EOS id (first occurrence is pooled).
CLIP_G = dict(vocab_size=1000, hidden_size=40, intermediate_size=80, projection_dim=24,
              num_hidden_layers=3, num_attention_heads=5, max_position_embeddings=77,
              hidden_act="gelu", eos_token_id=999, bos_token_id=998, pad_token_id=1)
T5 = dict(vocab_size=100, d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=20,
          feed_forward_proj="gated-gelu", is_encoder_decoder=False)


def _save(model, directory):
  model.save_pretrained(directory, safe_serialization=True)
  return str(directory)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  torch.manual_seed(0)
  clip_l = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**CLIP_L)).eval()
  clip_g = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**CLIP_G)).eval()
  t5 = transformers.T5EncoderModel(transformers.T5Config(**T5)).eval()
  for m in (clip_l, clip_g, t5):
    randomise_norms_and_biases(m)
  dirs = {name: _save(m, tmp_path_factory.mktemp(name))
          for name, m in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5))}
  return {"clip_l": clip_l, "clip_g": clip_g, "t5": t5}, dirs


def _clip_ids(eos, rng, b=3, n=77):
  ids = rng.integers(3, 900, size=(b, n))
  for row, length in enumerate((5, 20, 77)):  # EOS then padding, and one full row
    ids[row, length - 1] = eos
    ids[row, length:] = eos if eos == 2 else 1
  return ids


@pytest.mark.parametrize("name", ["clip_l", "clip_g"])
def test_clip_matches_transformers(models, name):
  torch_models, dirs = models
  ref = torch_models[name]
  ours = te.load_clip_text(dirs[name])
  ids = _clip_ids(ref.config.eos_token_id, np.random.default_rng(1))
  with torch.no_grad():
    out = ref(torch.from_numpy(ids), output_hidden_states=True)
  got = ours(jnp.asarray(ids))
  assert rel_err(got["last_hidden_state"], out.last_hidden_state.numpy()) < 1e-4
  assert rel_err(got["penultimate"], out.hidden_states[-2].numpy()) < 1e-4
  assert rel_err(got["text_embeds"], out.text_embeds.numpy()) < 1e-4


def test_t5_matches_transformers(models):
  torch_models, dirs = models
  ours = te.load_t5_encoder(dirs["t5"])
  ids = np.random.default_rng(2).integers(2, 100, size=(2, 40))
  ids[0, 30:] = 0  # padding, unmasked as SD3 runs it
  with torch.no_grad():
    ref = torch_models["t5"](torch.from_numpy(ids)).last_hidden_state.numpy()
  assert rel_err(ours(jnp.asarray(ids)), ref) < 1e-4
  mask = (ids != 0).astype(np.int64)
  with torch.no_grad():
    ref_masked = torch_models["t5"](torch.from_numpy(ids),
                                    attention_mask=torch.from_numpy(mask)).last_hidden_state
  assert rel_err(ours(jnp.asarray(ids), jnp.asarray(mask)), ref_masked.numpy()) < 1e-4


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


def test_sd3_prompt_embedding_matches_pipeline_recipe(models):
  torch_models, dirs = models
  clip_l, clip_g = te.load_clip_text(dirs["clip_l"]), te.load_clip_text(dirs["clip_g"])
  t5 = te.load_t5_encoder(dirs["t5"])
  rng = np.random.default_rng(3)
  ids_l, ids_g = _clip_ids(2, rng), _clip_ids(999, rng)
  ids_t5 = rng.integers(2, 100, size=(3, 16))
  embeds, pooled = te.encode_sd3_prompt(clip_l, clip_g, t5, jnp.asarray(ids_l),
                                        jnp.asarray(ids_g), jnp.asarray(ids_t5))
  # The recipe of diffusers' StableDiffusion3Pipeline.encode_prompt, on the torch models.
  with torch.no_grad():
    out_l = torch_models["clip_l"](torch.from_numpy(ids_l), output_hidden_states=True)
    out_g = torch_models["clip_g"](torch.from_numpy(ids_g), output_hidden_states=True)
    t5_states = torch_models["t5"](torch.from_numpy(ids_t5))[0]
    clip = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
    expected = torch.cat([clip, t5_states], dim=-2).numpy()
    expected_pooled = torch.cat([out_l.text_embeds, out_g.text_embeds], dim=-1).numpy()
  assert embeds.shape == (3, 77 + 16, 96)
  assert rel_err(embeds, expected) < 1e-4
  assert rel_err(pooled, expected_pooled) < 1e-4
  no_t5, _ = te.encode_sd3_prompt(clip_l, clip_g, None, jnp.asarray(ids_l), jnp.asarray(ids_g),
                                  t5_width=96, t5_length=16)
  np.testing.assert_array_equal(no_t5[:, 77:], 0.0)


def test_errors_name_the_problem(models, tmp_path):
  _, dirs = models
  src = dirs["clip_l"]
  tensors = load_file(os.path.join(src, "model.safetensors"))
  del tensors["text_model.encoder.layers.1.mlp.fc2.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  config = json.load(open(os.path.join(src, "config.json")))
  json.dump(config, open(tmp_path / "config.json", "w"))
  with pytest.raises(weights.CheckpointError, match=r"layers\.1\.mlp\.fc2\.weight"):
    te.load_clip_text(str(tmp_path))
  with pytest.raises(ValueError, match="hidden_act='swish7'"):
    te.CLIPTextConfig.from_hf_config(dict(config, hidden_act="swish7"))
