"""On-device CLIP rewards (PickScore, CLIPScore, aesthetic) against torch, and in the trainer."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from mgrpo_jax import sharding as sharding_lib  # noqa: E402
from mgrpo_jax import trainer as trainer_lib  # noqa: E402
from mgrpo_jax.config_utils import load_sibling  # noqa: E402
from mgrpo_jax.models import clip as clip_lib  # noqa: E402
from mgrpo_jax.rewards import convert_aesthetic  # noqa: E402
from mgrpo_jax.rewards import device as device_lib  # noqa: E402
from tests import sd3_tiny  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = os.path.join(os.path.dirname(ROOT), "shared", "datasets")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("clip"))
  model, tokenizer = sd3_tiny.write_tiny_clip(directory)
  return model, tokenizer, directory


def _mesh():
  return sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def _images(seed=0, p=8, l=2):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, size=(p, l, 64, 64, 3), dtype=np.uint8)


def _torch_embeddings(model, tokenizer, images, prompts):
  pixels = np.asarray(clip_lib.preprocess(jnp.asarray(images.reshape((-1,) + images.shape[2:])),
                                          32)).transpose(0, 3, 1, 2)
  ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
  with torch.no_grad():
    img = model.get_image_features(pixel_values=torch.from_numpy(pixels.copy()))
    txt = model.get_text_features(input_ids=torch.tensor(ids))
  img = getattr(img, "pooler_output", img).numpy()
  txt = getattr(txt, "pooler_output", txt).numpy()
  img = img / np.linalg.norm(img, axis=-1, keepdims=True)
  txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
  return img.reshape(images.shape[:2] + (-1,)), txt


@pytest.mark.parametrize("name", ["pickscore", "clipscore"])
def test_clip_rewards_match_torch(clip_dir, name):
  model, tokenizer, directory = clip_dir
  cfg = ml_collections.ConfigDict({"pickscore_path": directory, "clip_path": directory,
                                   "aesthetic_path": ""})
  mesh = _mesh()
  reward = device_lib.DeviceReward(name, cfg, mesh)
  images = _images()
  prompts = [f"a photo of thing {i}" for i in range(8)]
  scores = np.asarray(reward(sharding_lib.global_batch(images, mesh), prompts))
  img, txt = _torch_embeddings(model, tokenizer, images, prompts)
  cos = np.einsum("pld,pd->pl", img, txt)
  expected = np.exp(3.0) * cos / 26.0 if name == "pickscore" else cos
  assert scores.shape == (8, 2)
  np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)


def test_aesthetic_head_converted_from_torch(clip_dir, tmp_path):
  model, tokenizer, directory = clip_dir
  torch.manual_seed(1)
  layers = torch.nn.Sequential(torch.nn.Linear(24, 1024), torch.nn.Dropout(0.2),
                               torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
                               torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                               torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).eval()
  torch.save({f"layers.{k}": v for k, v in layers.state_dict().items()}, tmp_path / "head.pth")
  convert_aesthetic.convert(str(tmp_path / "head.pth"), str(tmp_path / "head"))
  cfg = ml_collections.ConfigDict({"pickscore_path": "", "clip_path": directory,
                                   "aesthetic_path": str(tmp_path / "head")})
  mesh = _mesh()
  reward = device_lib.DeviceReward("aesthetic", cfg, mesh)
  images = _images(2)
  scores = np.asarray(reward(sharding_lib.global_batch(images, mesh), ["x"] * 8))
  img, _ = _torch_embeddings(model, tokenizer, images, ["x"] * 8)
  with torch.no_grad():
    expected = layers(torch.from_numpy(img.reshape(-1, 24))).numpy().reshape(8, 2)
  np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
  torch.save({"layers.0.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
  with pytest.raises(ValueError, match=r"layers\.0\.weight has shape \(3, 3\)"):
    convert_aesthetic.convert(str(tmp_path / "bad.pth"), str(tmp_path / "bad"))


def test_missing_reward_model_path_is_named():
  cfg = ml_collections.ConfigDict({"pickscore_path": "", "clip_path": "", "aesthetic_path": ""})
  with pytest.raises(ValueError, match="config.reward.pickscore_path"):
    device_lib.DeviceReward("pickscore", cfg, _mesh())


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(DATASETS), reason="../shared/datasets not present")
def test_trainer_with_device_and_host_rewards(clip_dir, tmp_path):
  _, _, directory = clip_dir
  config = load_sibling(os.path.join(ROOT, "configs", "tiny_ocr_color.py"),
                        "tiny_ocr_color").get_config("runlocal")
  config.reward.names = ("pickscore", "jpeg_compressibility")
  config.reward.weights = (1.0, 0.1)
  config.reward.pickscore_path = directory
  config.data.prompts_per_batch = 8
  config.log.progress = False
  metrics = trainer_lib.train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2]
  assert np.isfinite(metrics["reward/pickscore"]) and metrics["reward/pickscore_std"] > 0
