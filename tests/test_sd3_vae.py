"""SD3 VAE against diffusers' AutoencoderKL on a tiny random configuration written to disk."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from mgrpo_jax.models import sd3_vae, weights  # noqa: E402
from tests.parity import randomise_norms_and_biases, rel_err  # noqa: E402

TINY = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
            layers_per_block=1, latent_channels=16, norm_num_groups=4, sample_size=32,
            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
            use_post_quant_conv=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(**TINY).eval()
  randomise_norms_and_biases(vae)
  directory = tmp_path_factory.mktemp("vae")
  vae.save_pretrained(directory, safe_serialization=True)
  return vae, str(directory)


def test_decode_encode_match_diffusers(reference):
  vae, directory = reference
  ours = sd3_vae.from_pretrained(directory)
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, 16, 8, 8)).astype(np.float32)  # NCHW for torch
  image = rng.uniform(-1, 1, size=(2, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    dec = vae.decode(torch.from_numpy(z)).sample.numpy()
    dist = vae.encode(torch.from_numpy(image)).latent_dist
    mean, logvar = dist.mean.numpy(), dist.logvar.numpy()
    latents = torch.from_numpy(z)
    pipe_images = (vae.decode(latents / TINY["scaling_factor"] + TINY["shift_factor"]).sample
                   / 2 + 0.5).clamp(0, 1).numpy()
  nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
  assert rel_err(ours.decode(nhwc(z)), dec.transpose(0, 2, 3, 1)) < 1e-4
  our_mean, our_logvar = ours.encode(nhwc(image))
  assert rel_err(our_mean, mean.transpose(0, 2, 3, 1)) < 1e-4
  assert rel_err(our_logvar, logvar.transpose(0, 2, 3, 1)) < 1e-4
  assert rel_err(ours.latents_to_images(nhwc(z)), pipe_images.transpose(0, 2, 3, 1)) < 1e-4
  # images_to_latents inverts the pipeline's latent scaling of the posterior mean.
  back = ours.images_to_latents(nhwc(image) * 0.5 + 0.5)
  expected = (mean - TINY["shift_factor"]) * TINY["scaling_factor"]
  assert rel_err(back, expected.transpose(0, 2, 3, 1)) < 1e-4


def test_sharded_checkpoint_and_bf16(reference, tmp_path):
  vae, _ = reference
  vae.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
  assert any(f.endswith(".index.json") for f in os.listdir(tmp_path))
  ours = sd3_vae.from_pretrained(str(tmp_path), param_dtype=jnp.bfloat16)
  kernel = ours.decoder.conv_in.kernel[...]
  assert kernel.dtype == jnp.bfloat16
  expected = vae.decoder.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0)
  np.testing.assert_allclose(np.asarray(kernel, np.float32), expected, rtol=1e-2, atol=1e-3)


def test_missing_tensor_and_unknown_config_are_named(reference, tmp_path):
  _, directory = reference
  tensors = load_file(os.path.join(directory, "diffusion_pytorch_model.safetensors"))
  del tensors["decoder.mid_block.attentions.0.to_q.weight"]
  save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  config = json.load(open(os.path.join(directory, "config.json")))
  json.dump(config, open(tmp_path / "config.json", "w"))
  with pytest.raises(weights.CheckpointError, match=r"decoder\.mid_block\.attentions\.0\.to_q"):
    sd3_vae.from_pretrained(str(tmp_path))
  config["use_quant_conv"] = True
  with pytest.raises(ValueError, match="use_quant_conv"):
    sd3_vae.VAEConfig.from_diffusers_config(config)
  config["use_quant_conv"] = False
  config["wavelet_levels"] = 2
  with pytest.raises(ValueError, match="wavelet_levels"):
    sd3_vae.VAEConfig.from_diffusers_config(config)


def test_vae_shards_on_a_mesh(reference):
  from mgrpo_jax import sharding as sharding_lib
  _, directory = reference
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  ours = sd3_vae.from_pretrained(directory, mesh=mesh)
  assert ours.decoder.conv_in.kernel[...].sharding.mesh.shape["data"] == jax.device_count()
