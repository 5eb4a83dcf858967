"""Hub repo ids as model paths, resolved offline from a cache laid out as huggingface_hub does."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from mgrpo_jax import hub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHA = "0123456789abcdef0123456789abcdef01234567"


def test_is_repo_id(tmp_path):
  assert hub.is_repo_id("stabilityai/stable-diffusion-3.5-medium")
  assert hub.is_repo_id("black-forest-labs/FLUX.1-dev@main")
  assert not hub.is_repo_id(str(tmp_path))  # an existing directory
  assert not hub.is_repo_id("/abs/path")
  assert not hub.is_repo_id("./rel/path")
  assert not hub.is_repo_id("a/b/c")
  assert not hub.is_repo_id("")
  (tmp_path / "org").mkdir()
  (tmp_path / "org" / "name").mkdir()
  cwd = os.getcwd()
  try:
    os.chdir(tmp_path)
    assert not hub.is_repo_id("org/name")  # a local directory wins over the Hub
  finally:
    os.chdir(cwd)


def test_allow_patterns_select_only_what_the_loaders_read():
  """huggingface_hub's own filter over the stable-diffusion-3.5-medium file list."""
  from huggingface_hub.utils import filter_repo_objects
  index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.31.0",
           "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
           "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
           "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
           "text_encoder_3": ["transformers", "T5EncoderModel"],
           "tokenizer": ["transformers", "CLIPTokenizer"],
           "tokenizer_2": ["transformers", "CLIPTokenizer"],
           "tokenizer_3": ["transformers", "T5TokenizerFast"],
           "transformer": ["diffusers", "SD3Transformer2DModel"],
           "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None]}
  wanted = [
      "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
      "text_encoder/model.safetensors", "text_encoder_2/config.json",
      "text_encoder_2/model.safetensors", "text_encoder_3/config.json",
      "text_encoder_3/model-00001-of-00002.safetensors",
      "text_encoder_3/model-00002-of-00002.safetensors",
      "text_encoder_3/model.safetensors.index.json", "tokenizer/merges.txt",
      "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
      "tokenizer/vocab.json", "tokenizer_3/spiece.model", "tokenizer_3/tokenizer.json",
      "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
      "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
  unwanted = [
      "sd3.5_medium.safetensors", "text_encoders/clip_g.safetensors",
      "text_encoders/t5xxl_fp8_e4m3fn.safetensors", "SD3.5M_example_workflow.json",
      "README.md", "mmdit-x.png", "transformer/diffusion_pytorch_model.bin",
      "vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/pytorch_model.bin",
      "text_encoder/flax_model.msgpack", "unet/diffusion_pytorch_model.safetensors"]
  kept = list(filter_repo_objects(wanted + unwanted,
                                  allow_patterns=hub.pipeline_allow_patterns(index),
                                  ignore_patterns=list(hub.IGNORE_PATTERNS)))
  assert sorted(kept) == sorted(wanted)


def _cache_repo(hub_cache, repo, source):
  """Copies `source` into `hub_cache` as huggingface_hub stores a snapshot of `repo`."""
  folder = os.path.join(hub_cache, "models--" + repo.replace("/", "--"))
  shutil.copytree(source, os.path.join(folder, "snapshots", SHA))
  os.makedirs(os.path.join(folder, "refs"))
  with open(os.path.join(folder, "refs", "main"), "w") as f:
    f.write(SHA)
  return os.path.join(folder, "snapshots", SHA)


@pytest.mark.slow
def test_repo_ids_resolve_offline_from_the_cache(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  from tests import sd3_tiny
  source = str(tmp_path / "tiny_sd3")
  sd3_tiny.write_tiny_sd3(source)
  hf_home = tmp_path / "hf"
  snapshot = _cache_repo(str(hf_home / "hub"), "tiny-org/tiny-sd3", source)
  clip = tmp_path / "clip"
  clip.mkdir()
  (clip / "config.json").write_text(json.dumps({"model_type": "clip"}))
  clip_snapshot = _cache_repo(str(hf_home / "hub"), "tiny-org/clip", str(clip))
  code = """
import json
from mgrpo_jax import hub
from mgrpo_jax.models import registry
config = registry.sd3_model_config("tiny-org/tiny-sd3")
config.resolution, config.max_sequence_length = 32, 16
generator = registry.get_generator(config)
print(json.dumps({"latent_shape": generator.latent_shape,
                  "model": hub.pipeline_dir("tiny-org/tiny-sd3"),
                  "clip": hub.model_dir("tiny-org/clip", "config.reward.clip_path")}))
from mgrpo_jax import pipeline
run_config, _ = pipeline._config_from_path("tiny-org/tiny-sd3", dict(resolution=32))
assert run_config.model.path == hub.pipeline_dir("tiny-org/tiny-sd3"), run_config.model.path
assert run_config.model.name == "sd3" and run_config.model.resolution == 32
try:
  hub.pipeline_dir("tiny-org/not-cached")
except FileNotFoundError as e:
  print("ERROR", e)
"""
  env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
  env.pop("HF_HUB_CACHE", None)
  res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  lines = res.stdout.strip().splitlines()
  out = json.loads(lines[-2])
  assert out["model"] == snapshot and out["clip"] == clip_snapshot
  assert out["latent_shape"] == [16, 16, 16]
  assert lines[-1].startswith("ERROR config.model.path=tiny-org/not-cached: not in the Hugging "
                              "Face cache") and "HF_HUB_OFFLINE is set" in lines[-1]
