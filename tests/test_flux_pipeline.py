"""A tiny random FLUX.1 directory: our sampler equals diffusers' FluxPipeline, and trains end to end."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mgrpo_jax import policy as policy_lib  # noqa: E402
from mgrpo_jax import sharding as sharding_lib  # noqa: E402
from mgrpo_jax import trainer as trainer_lib  # noqa: E402
from mgrpo_jax.config_utils import load_sibling  # noqa: E402
from mgrpo_jax.models import flux_transformer, registry  # noqa: E402
from mgrpo_jax.sampling import rollout as rollout_lib  # noqa: E402
from mgrpo_jax.sampling import schedule  # noqa: E402
from mgrpo_jax.sampling.tree import TreeSpec  # noqa: E402
from tests import sd3_tiny  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = os.path.join(os.path.dirname(ROOT), "shared", "datasets")


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("flux"))
  pipe = sd3_tiny.write_tiny_flux(directory)
  return pipe, directory


def model_config(directory):
  config = registry.flux_model_config(directory)
  config.resolution = sd3_tiny.RESOLUTION
  config.max_sequence_length = sd3_tiny.T5_LENGTH
  config.dtype = config.param_dtype = "float32"
  return config


def test_sampler_matches_flux_pipeline(tiny_flux):
  pipe, directory = tiny_flux
  generator = registry.get_generator(model_config(directory))
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  graphdef, state = nnx.split(nnx.eval_shape(lambda: generator.make_module(nnx.Rngs(0))))
  state = generator.load_weights(state, mesh)
  policy = policy_lib.Policy(graphdef, lora=False)

  prompts = ['a sign that reads "hello"', "a red apple on a table"]
  T = 4
  sigmas = generator.sigmas(T)
  spec = TreeSpec(T, 1, (), (), (False,) * T)  # ODE sampling, one image per prompt
  sampler = rollout_lib.SamplerConfig(guidance_scale=1.0)  # distilled guidance: one call a step
  tokens = {k: jnp.asarray(v) for k, v in generator.tokenize(prompts).items()}
  key = jax.random.key(3)

  @jax.jit
  def ours(state, tokens):
    model = policy.module(state, None)
    out = rollout_lib.rollout(policy.velocity_fn(state, None), model.encode_text(tokens), None,
                              key, spec, sigmas, generator.latent_shape, sampler)
    return model.decode(out.final_latents[:, 0])

  images = np.asarray(ours(state, tokens))
  noise = np.asarray(jax.random.normal(jax.random.fold_in(key, T),
                                       (2, 1) + generator.latent_shape))[:, 0]
  with torch.no_grad():
    expected = pipe(prompt=prompts, num_inference_steps=T, guidance_scale=3.5,
                    height=sd3_tiny.RESOLUTION, width=sd3_tiny.RESOLUTION,
                    latents=torch.from_numpy(np.asarray(flux_transformer.pack(noise))),
                    max_sequence_length=sd3_tiny.T5_LENGTH, output_type="np").images
  assert images.shape == expected.shape == (2, sd3_tiny.RESOLUTION, sd3_tiny.RESOLUTION, 3)
  err = np.abs(images - expected).max() / np.abs(expected).max()
  print(f"FLUX pipeline max relative error {err:.2e}")
  assert err < 1e-3, err
  assert np.abs(expected[0] - expected[1]).max() > 1e-2  # the prompts matter


@pytest.mark.parametrize("seq_len, steps", [(64, 4), (1024, 10), (4096, 28)])
def test_schedule_matches_flux_scheduler(seq_len, steps):
  """flux_sigmas == FlowMatchEulerDiscreteScheduler with FluxPipeline's sigmas and mu."""
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
      shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
      base_image_seq_len=256, max_image_seq_len=4096)
  mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq_len - 256)  # calculate_shift, written out
  scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
  np.testing.assert_allclose(schedule.flux_sigmas(steps, seq_len), scheduler.sigmas.numpy(),
                             atol=1e-6)


def test_bad_directories_are_named(tiny_flux, tmp_path):
  _, directory = tiny_flux
  with pytest.raises(FileNotFoundError, match="model_index.json"):
    registry.get_generator(model_config(str(tmp_path / "nowhere")))
  index = json.load(open(os.path.join(directory, "model_index.json")))
  (tmp_path / "model_index.json").write_text(json.dumps({**index, "_class_name": "Other"}))
  with pytest.raises(ValueError, match="expected FluxPipeline"):
    registry.get_generator(model_config(str(tmp_path)))
  (tmp_path / "model_index.json").write_text(json.dumps(index))
  with pytest.raises(FileNotFoundError, match="transformer"):
    registry.get_generator(model_config(str(tmp_path)))
  # Every component but the scheduler's config: its absence is named, not defaulted.
  import shutil
  for name in os.listdir(directory):
    if name != "model_index.json":
      shutil.copytree(os.path.join(directory, name), tmp_path / name)
  os.remove(tmp_path / "scheduler" / "scheduler_config.json")
  with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
    registry.get_generator(model_config(str(tmp_path)))
  (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
      {"use_dynamic_shifting": True, "shift_terminal": 0.02}))
  with pytest.raises(ValueError, match="shift_terminal"):
    registry.get_generator(model_config(str(tmp_path)))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(DATASETS) and "MGRPO_DATASETS" not in os.environ,
                    reason="../shared/datasets not present")
def test_training_loop_runs_on_tiny_flux(tiny_flux, tmp_path):
  _, directory = tiny_flux
  config = load_sibling(os.path.join(ROOT, "configs", "tiny_ocr_color.py"),
                        "tiny_ocr_color").get_config("runlocal")
  config.model = model_config(directory)
  config.sample.guidance_scale = 1.0
  config.reward.names, config.reward.weights = ("jpeg_compressibility",), (1.0,)
  config.log.progress = False
  config.mesh.data, config.mesh.tensor = 4, 2
  metrics = trainer_lib.train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2]
  assert abs(lines[0]["train/ratio_mean"] - 1.0) < 1e-4
  assert np.isfinite(metrics["train/loss"])
