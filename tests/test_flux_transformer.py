"""FLUX transformer parity with diffusers' FluxTransformer2DModel on tiny random checkpoints.

Each test builds a small random diffusers model, saves it as safetensors, loads it with our
torch-free loader and compares velocities: diffusers gets the latents packed as FluxPipeline
packs them, ids as FluxPipeline builds them, timestep = sigma and the guidance scale; we get
NHWC latents. Tolerance: float32 max abs error < 1e-4 * max |reference|.
"""

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from mgrpo_jax.models import flux_transformer as flux  # noqa: E402
from mgrpo_jax.models import lora  # noqa: E402
from mgrpo_jax.models import weights  # noqa: E402
from tests.parity import randomise_norms_and_biases, rel_err  # noqa: E402

RTOL = 1e-4
TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
            pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def save_reference(directory, seed=0, **overrides):
  torch.manual_seed(seed)
  model = diffusers.FluxTransformer2DModel(**{**TINY, **overrides}).eval()
  randomise_norms_and_biases(model)
  model.save_pretrained(str(directory), safe_serialization=True)
  return model


def make_inputs(batch=2, height=8, width=6, seq=5, seed=0):
  rng = np.random.default_rng(seed)
  c = TINY["in_channels"] // 4
  return dict(
      latents=rng.standard_normal((batch, height, width, c)).astype(np.float32),
      sigma=rng.uniform(0.05, 1.0, size=batch).astype(np.float32),
      context=rng.standard_normal((batch, seq, TINY["joint_attention_dim"])).astype(np.float32),
      pooled=rng.standard_normal((batch, TINY["pooled_projection_dim"])).astype(np.float32),
      guidance=np.full((batch,), 3.5, np.float32))


def reference_velocity(model, inputs, guidance=True):
  """diffusers on FluxPipeline's packing: NCHW -> [B, h/2*w/2, 4C] with channel order (c,dy,dx)."""
  x = torch.from_numpy(inputs["latents"].transpose(0, 3, 1, 2).copy())
  b, c, h, w = x.shape
  packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
  img_ids = torch.zeros(h // 2, w // 2, 3)
  img_ids[..., 1] += torch.arange(h // 2)[:, None]
  img_ids[..., 2] += torch.arange(w // 2)[None, :]
  with torch.no_grad():
    out = model(hidden_states=packed, encoder_hidden_states=torch.from_numpy(inputs["context"]),
                pooled_projections=torch.from_numpy(inputs["pooled"]),
                timestep=torch.from_numpy(inputs["sigma"]),
                guidance=torch.from_numpy(inputs["guidance"]) if guidance else None,
                img_ids=img_ids.reshape(-1, 3),
                txt_ids=torch.zeros(inputs["context"].shape[1], 3)).sample
  out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
  return out.numpy().transpose(0, 2, 3, 1)


def our_velocity(module, inputs, guidance=True):
  graphdef, state = nnx.split(module)
  fn = jax.jit(lambda s, x, t, c, p, g: nnx.merge(graphdef, s)(x, t, c, p, g))
  return np.asarray(fn(state, inputs["latents"], inputs["sigma"], inputs["context"],
                       inputs["pooled"], inputs["guidance"] if guidance else None))


@pytest.mark.parametrize("guidance", [True, False])
def test_matches_diffusers(tmp_path, guidance):
  model = save_reference(tmp_path, guidance_embeds=guidance)
  ours = flux.from_pretrained(str(tmp_path))
  inputs = make_inputs()
  err = rel_err(our_velocity(ours, inputs, guidance), reference_velocity(model, inputs, guidance))
  assert err < RTOL, err


def test_pack_is_pipeline_packing_and_inverts():
  x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
  t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  ref = t.view(2, 3, 2, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 6, 12).numpy()
  np.testing.assert_array_equal(np.asarray(flux.pack(x)), ref)
  np.testing.assert_array_equal(np.asarray(flux.unpack(flux.pack(x), 4, 6)), x)


def test_rope_tables_match_diffusers():
  from diffusers.models.transformers.transformer_flux import FluxPosEmbed
  ids = torch.cat([torch.zeros(3, 3), torch.from_numpy(flux.image_ids(2, 4)).float()])
  cos, sin = FluxPosEmbed(10000, [4, 6, 6])(ids)
  ours_cos, ours_sin = flux.rope_tables((4, 6, 6), 3, 2, 4)
  np.testing.assert_allclose(ours_cos, cos.numpy(), atol=1e-6)
  np.testing.assert_allclose(ours_sin, sin.numpy(), atol=1e-6)


def test_remat_and_lora_targets(tmp_path):
  """remat gives the same output; the default LoRA regex adapts the 8 attention projections of
  each double block and q/k/v of each single block (which has no to_out), and zero-initialised
  adapters leave the output unchanged."""
  model = save_reference(tmp_path)
  inputs = make_inputs(seed=1)
  ref = reference_velocity(model, inputs)
  remat = flux.from_pretrained(str(tmp_path), remat=True)
  assert rel_err(our_velocity(remat, inputs), ref) < RTOL
  adapted = lora.apply_lora(remat, [r"attn\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|"
                                    r"add_v_proj|to_add_out)$"], rank=2, alpha=4.0,
                            rngs=nnx.Rngs(0))
  assert len(adapted) == 8 * TINY["num_layers"] + 3 * TINY["num_single_layers"]
  assert "single_transformer_blocks.1.attn.to_v" in adapted
  assert rel_err(our_velocity(remat, inputs), ref) < RTOL


def test_config_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown_field"):
    flux.FluxTransformerConfig.from_diffusers_config({**TINY, "unknown_field": 1})
  with pytest.raises(ValueError, match="FluxTransformer2DModel"):
    flux.FluxTransformerConfig.from_diffusers_config({"_class_name": "SD3Transformer2DModel"})
  with pytest.raises(ValueError, match="axes_dims_rope"):
    flux.FluxTransformerConfig.from_diffusers_config({**TINY, "axes_dims_rope": (4, 4, 4)})
  save_reference(tmp_path, num_single_layers=1)
  config = flux.FluxTransformerConfig.from_diffusers_config(TINY)  # one more single block
  graphdef, state = nnx.split(nnx.eval_shape(lambda: flux.FluxTransformer(config,
                                                                          rngs=nnx.Rngs(0))))
  del graphdef
  with pytest.raises(weights.CheckpointError, match="single_transformer_blocks.1"):
    flux.load_flux_transformer(str(tmp_path), state)
