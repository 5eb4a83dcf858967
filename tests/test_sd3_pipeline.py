"""A tiny random SD3 directory: our sampler equals StableDiffusion3Pipeline, and trains end to end."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mgrpo_jax import policy as policy_lib  # noqa: E402
from mgrpo_jax import sharding as sharding_lib  # noqa: E402
from mgrpo_jax import trainer as trainer_lib  # noqa: E402
from mgrpo_jax.config_utils import load_sibling  # noqa: E402
from mgrpo_jax.models import registry  # noqa: E402
from mgrpo_jax.sampling import rollout as rollout_lib  # noqa: E402
from mgrpo_jax.sampling import schedule  # noqa: E402
from mgrpo_jax.sampling.tree import TreeSpec  # noqa: E402
from tests import sd3_tiny  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = os.path.join(os.path.dirname(ROOT), "shared", "datasets")


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("sd3"))
  pipe = sd3_tiny.write_tiny_sd3(directory)
  return pipe, directory


def model_config(directory):
  config = registry.sd3_model_config(directory)
  config.resolution = sd3_tiny.RESOLUTION
  config.max_sequence_length = sd3_tiny.T5_LENGTH
  config.dtype = config.param_dtype = "float32"
  return config


def test_sampler_matches_diffusers_pipeline(tiny_sd3):
  pipe, directory = tiny_sd3
  generator = registry.get_generator(model_config(directory))
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  graphdef, state = nnx.split(nnx.eval_shape(lambda: generator.make_module(nnx.Rngs(0))))
  state = generator.load_weights(state, mesh)
  policy = policy_lib.Policy(graphdef, lora=False)

  prompts = ['a sign that reads "hello"', "a red apple on a table"]
  T, scale = 4, 4.5
  sigmas = schedule.flow_match_sigmas(T, 3.0)
  spec = TreeSpec(T, 1, (), (), (False,) * T)  # deterministic (ODE) sampling, one image each
  sampler = rollout_lib.SamplerConfig(guidance_scale=scale)
  tokens = {k: jnp.asarray(v) for k, v in generator.tokenize(prompts).items()}
  neg = {k: jnp.asarray(v) for k, v in generator.tokenize([""] * 2).items()}
  key = jax.random.key(7)

  @jax.jit
  def ours(state, tokens, neg):
    model = policy.module(state, None)
    out = rollout_lib.rollout(policy.velocity_fn(state, None), model.encode_text(tokens),
                              model.encode_text(neg), key, spec, sigmas,
                              generator.latent_shape, sampler)
    return model.decode(out.final_latents[:, 0])

  images = np.asarray(ours(state, tokens, neg))
  # The same initial noise the rollout draws, handed to diffusers in NCHW.
  noise = np.asarray(jax.random.normal(jax.random.fold_in(key, T),
                                       (2, 1) + generator.latent_shape))[:, 0]
  with torch.no_grad():
    expected = pipe(prompt=prompts, negative_prompt=[""] * 2, num_inference_steps=T,
                    guidance_scale=scale, height=sd3_tiny.RESOLUTION, width=sd3_tiny.RESOLUTION,
                    latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()),
                    max_sequence_length=sd3_tiny.T5_LENGTH, output_type="np").images
  assert images.shape == expected.shape == (2, sd3_tiny.RESOLUTION, sd3_tiny.RESOLUTION, 3)
  err = np.abs(images - expected).max() / np.abs(expected).max()
  print(f"pipeline max relative error {err:.2e}")
  assert err < 1e-3, err
  assert np.abs(expected[0] - expected[1]).max() > 1e-2  # the prompts matter


def test_missing_component_and_path_are_named(tiny_sd3, tmp_path):
  config = model_config(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="model_index.json"):
    registry.get_generator(config)
  config = model_config("")
  with pytest.raises(ValueError, match="config.model.path is empty"):
    registry.get_generator(config)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(DATASETS) and "MGRPO_DATASETS" not in os.environ,
                    reason="../shared/datasets not present")
def test_training_loop_runs_on_tiny_sd3(tiny_sd3, tmp_path):
  _, directory = tiny_sd3
  config = load_sibling(os.path.join(ROOT, "configs", "tiny_ocr_color.py"),
                        "tiny_ocr_color").get_config("runlocal")
  config.model = model_config(directory)
  config.reward.names, config.reward.weights = ("jpeg_compressibility",), (1.0,)
  config.log.progress = False
  config.mesh.data, config.mesh.tensor = 4, 2
  metrics = trainer_lib.train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2]
  assert abs(lines[0]["train/ratio_mean"] - 1.0) < 1e-4
  assert np.isfinite(metrics["train/loss"])
