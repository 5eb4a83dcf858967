"""CLIP towers and preprocessing against transformers' torch CLIPModel and CLIPImageProcessor."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from mgrpo_jax.models import clip  # noqa: E402
from tests.parity import randomise_norms_and_biases, rel_err  # noqa: E402

TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, eos_token_id=99,
            bos_token_id=98, pad_token_id=0, hidden_act="gelu")
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, hidden_act="quick_gelu")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=TEXT, vision_config=VISION, projection_dim=24)).eval()
  randomise_norms_and_biases(model, extra=("class_embedding",))
  with torch.no_grad():
    model.logit_scale.fill_(3.1)
  directory = tmp_path_factory.mktemp("clip")
  model.save_pretrained(directory, safe_serialization=True)
  return model, str(directory)


def test_features_match_transformers(reference):
  model, directory = reference
  ours = clip.from_pretrained(directory)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 98, size=(3, 16))
  ids[0, 5], ids[1, 15], ids[2, 9] = 99, 99, 99
  ids[0, 6:] = 0
  pixels = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    text = model.get_text_features(input_ids=torch.from_numpy(ids))
    image = model.get_image_features(pixel_values=torch.from_numpy(pixels))
    text = getattr(text, "pooler_output", text).numpy()
    image = getattr(image, "pooler_output", image).numpy()
  assert rel_err(ours.text_features(jnp.asarray(ids)), text) < 1e-4
  assert rel_err(ours.image_features(jnp.asarray(pixels.transpose(0, 2, 3, 1))), image) < 1e-4
  assert float(ours.logit_scale[...]) == pytest.approx(3.1)


def test_preprocess_close_to_clip_image_processor():
  processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                              crop_size={"height": 32, "width": 32})
  # Smooth images (generated images are), 64 px -> 32 px: low-frequency sinusoids per channel.
  yy, xx = np.mgrid[0:64, 0:64] / 64.0
  images = np.stack([np.stack([127.5 + 100 * np.sin(2 * np.pi * (f * xx + g * yy) + c)
                               for c in range(3)], -1) for f, g in ((1, 2), (2, 1))])
  images = np.round(images).astype(np.uint8)
  expected = processor(images=list(images), return_tensors="np")["pixel_values"]
  got = np.asarray(clip.preprocess(jnp.asarray(images), 32)).transpose(0, 3, 1, 2)
  # PIL resamples to 8-bit values: one grey level is 1 / 255 / 0.27 = 0.015 after
  # normalisation. Allow two levels at most, and under half a level on average.
  diff = np.abs(got - expected)
  assert diff.max() < 2 * 0.0146, diff.max()
  assert diff.mean() < 0.5 * 0.0146, diff.mean()
