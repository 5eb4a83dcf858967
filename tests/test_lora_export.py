"""LoRA export to / import from the diffusers-PEFT format, checked against diffusers and peft.

Adapters set to random values on a tiny random SD3 / FLUX directory are exported and loaded into
diffusers' torch pipeline with `load_lora_weights`; its ODE images on our noise must equal our
sampler's with the same adapters. PEFT files written by diffusers' and peft's own savers are
imported, and the updates `scale * A B` compared with peft's `get_delta_weight`.
"""

import copy
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from mgrpo_jax import checkpoint as ckpt_lib  # noqa: E402
from mgrpo_jax import export  # noqa: E402
from mgrpo_jax import policy as policy_lib  # noqa: E402
from mgrpo_jax import sharding as sharding_lib  # noqa: E402
from mgrpo_jax.models import flux_transformer, registry  # noqa: E402
from mgrpo_jax.sampling import rollout as rollout_lib  # noqa: E402
from mgrpo_jax.sampling import schedule  # noqa: E402
from mgrpo_jax.sampling.tree import TreeSpec  # noqa: E402
from tests import sd3_tiny  # noqa: E402

TARGETS = (r"attn\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",)
RANK, ALPHA = 4, 12.0  # scale 3: the folded scale is visible if a loader got it wrong
PROMPTS = ['a sign that reads "hello"', "a red apple on a table"]


def model_config(name, directory):
  config = getattr(registry, f"{name}_model_config")(directory)
  config.resolution = sd3_tiny.RESOLUTION
  config.max_sequence_length = sd3_tiny.T5_LENGTH
  config.dtype = config.param_dtype = "float32"
  return config


def run_config(rank=RANK, alpha=ALPHA):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.lora = ml_collections.ConfigDict(
      {"enabled": True, "rank": rank, "alpha": alpha, "targets": TARGETS, "init_from": ""})
  config.train = ml_collections.ConfigDict({"beta": 0.0})
  return config


def build(name, directory, config=None):
  """-> (generator, policy, trainable adapters, frozen base) on one device."""
  generator = registry.get_generator(model_config(name, directory))
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  graphdef, trainable, frozen = policy_lib.build_model_states(generator, config or run_config(),
                                                              mesh)
  return generator, policy_lib.Policy(graphdef, lora=True), trainable, frozen


def randomize(trainable, seed=0, std=0.3):
  leaves, treedef = jax.tree.flatten(trainable)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [std * jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves)])


def our_images(generator, policy, trainable, frozen, sigmas, scale, key, neg=True):
  T = len(sigmas) - 1
  spec = TreeSpec(T, 1, (), (), (False,) * T)  # ODE, one image per prompt
  sampler = rollout_lib.SamplerConfig(guidance_scale=scale)
  tokens = {k: jnp.asarray(v) for k, v in generator.tokenize(PROMPTS).items()}
  neg_tokens = {k: jnp.asarray(v) for k, v in generator.tokenize([""] * 2).items()}

  @jax.jit
  def run(trainable, frozen):
    model = policy.module(trainable, frozen)
    out = rollout_lib.rollout(policy.velocity_fn(trainable, frozen), model.encode_text(tokens),
                              model.encode_text(neg_tokens) if neg else None, key, spec,
                              sigmas, generator.latent_shape, sampler)
    return model.decode(out.final_latents[:, 0])

  noise = np.asarray(jax.random.normal(jax.random.fold_in(key, T),
                                       (2, 1) + generator.latent_shape))[:, 0]
  return np.asarray(run(trainable, frozen)), noise


def write_export(trainable, generator_name, out):
  tensors, metadata = export.to_diffusers(export.flat_adapters(trainable), generator_name, RANK,
                                          ALPHA)
  os.makedirs(out, exist_ok=True)
  save_file(tensors, os.path.join(out, export.LORA_FILE), metadata=metadata)
  return tensors


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("sd3"))
  return sd3_tiny.write_tiny_sd3(directory), directory


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("flux"))
  return sd3_tiny.write_tiny_flux(directory), directory


@pytest.fixture(scope="module")
def sd3_built(tiny_sd3):
  return build("sd3", tiny_sd3[1])


@pytest.fixture(scope="module")
def flux_built(tiny_flux):
  return build("flux", tiny_flux[1])


def relative_error(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.slow
def test_sd3_export_loads_in_diffusers_with_equal_images(tiny_sd3, sd3_built, tmp_path):
  pipe, _ = tiny_sd3
  generator, policy, trainable, frozen = sd3_built
  trainable = randomize(trainable)
  T, scale = 4, 4.5
  images, noise = our_images(generator, policy, trainable, frozen,
                             schedule.flow_match_sigmas(T, 3.0), scale, jax.random.key(7))
  tensors = write_export(trainable, "sd3", str(tmp_path))
  assert "transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight" in tensors
  assert tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"].shape == (32, RANK)

  def render():
    with torch.no_grad():
      return pipe(prompt=PROMPTS, negative_prompt=[""] * 2, num_inference_steps=T,
                  guidance_scale=scale, height=sd3_tiny.RESOLUTION, width=sd3_tiny.RESOLUTION,
                  latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()),
                  max_sequence_length=sd3_tiny.T5_LENGTH, output_type="np").images

  base = render()
  pipe.load_lora_weights(str(tmp_path))
  try:
    expected = render()
  finally:
    pipe.unload_lora_weights()
  err = relative_error(images, expected)
  print(f"SD3 LoRA export: diffusers vs ours max relative error {err:.2e}; "
        f"LoRA effect {relative_error(base, expected):.2e}")
  assert err < 1e-3, err
  assert relative_error(base, expected) > 100 * err  # the adapters change the images


@pytest.mark.slow
def test_flux_export_loads_in_diffusers_with_equal_images(tiny_flux, flux_built, tmp_path):
  pipe, _ = tiny_flux
  generator, policy, trainable, frozen = flux_built
  trainable = randomize(trainable, seed=1)
  T = 4
  images, noise = our_images(generator, policy, trainable, frozen, generator.sigmas(T), 1.0,
                             jax.random.key(3), neg=False)
  tensors = write_export(trainable, "flux", str(tmp_path))
  assert "transformer.single_transformer_blocks.1.attn.to_q.lora_A.weight" in tensors

  def render():
    with torch.no_grad():
      return pipe(prompt=PROMPTS, num_inference_steps=T, guidance_scale=3.5,
                  height=sd3_tiny.RESOLUTION, width=sd3_tiny.RESOLUTION,
                  latents=torch.from_numpy(np.asarray(flux_transformer.pack(noise))),
                  max_sequence_length=sd3_tiny.T5_LENGTH, output_type="np").images

  base = render()
  pipe.load_lora_weights(str(tmp_path))
  try:
    expected = render()
  finally:
    pipe.unload_lora_weights()
  err = relative_error(images, expected)
  print(f"FLUX LoRA export: diffusers vs ours max relative error {err:.2e}; "
        f"LoRA effect {relative_error(base, expected):.2e}")
  assert err < 1e-3, err
  assert relative_error(base, expected) > 100 * err


def _torch_lora(transformer, lora_config, seed):
  """A copy of the torch transformer with a PEFT adapter whose A and B are random."""
  model = copy.deepcopy(transformer)
  model.add_adapter(lora_config)
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
  return model


def _peft_deltas(model):
  """{module name: scale * B A} [out, in] as computed by peft's own layers."""
  from peft.tuners.lora import LoraLayer
  return {name: m.get_delta_weight("default").detach().numpy()
          for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _our_deltas(trainable, rank, alpha):
  return {export.diffusers_module("sd3", path)[len("transformer."):]: (alpha / rank * a @ b).T
          for path, (a, b) in export.flat_adapters(trainable).items()}


def test_import_of_diffusers_saved_lora(tiny_sd3, sd3_built, tmp_path):
  """A LoRA saved by StableDiffusion3Pipeline.save_lora_weights (rank 4, alpha 6, with
  metadata) imports into adapters with another alpha, giving peft's updates."""
  from peft.utils import get_peft_model_state_dict
  pipe, _ = tiny_sd3
  lora_config = peft.LoraConfig(r=RANK, lora_alpha=6, init_lora_weights="gaussian",
                                target_modules=r".*\.attn\.(to_q|to_k|to_v|to_out\.0)")
  model = _torch_lora(pipe.transformer, lora_config, seed=0)
  diffusers.StableDiffusion3Pipeline.save_lora_weights(
      str(tmp_path), transformer_lora_layers=get_peft_model_state_dict(model),
      transformer_lora_adapter_metadata=lora_config.to_dict())
  trainable = sd3_built[2]
  loaded = export.load_adapters(trainable, "sd3", str(tmp_path), RANK, ALPHA)
  ours = _our_deltas(loaded, RANK, ALPHA)
  expected = _peft_deltas(model)
  assert set(expected) <= set(ours) and len(expected) == 4 * 2  # 2 blocks x 4 modules
  for name, delta in expected.items():
    np.testing.assert_allclose(ours[name], delta, rtol=1e-5, atol=1e-6)
  untouched = set(ours) - set(expected)  # add_*_proj, to_add_out: still zero updates
  assert untouched and all(np.abs(ours[n]).max() == 0 for n in untouched)


def test_import_of_peft_directory_with_patterns(tiny_sd3, sd3_built, tmp_path):
  """peft's save_pretrained (adapter_config.json, base_model.model. keys) with rank/alpha
  patterns and rsLoRA scaling."""
  pipe, _ = tiny_sd3
  lora_config = peft.LoraConfig(r=RANK, lora_alpha=5, use_rslora=True,
                                alpha_pattern={"add_q_proj": 9}, init_lora_weights="gaussian",
                                target_modules=r".*\.attn\.(to_q|add_q_proj)")
  base = copy.deepcopy(pipe.transformer)
  model = peft.get_peft_model(base, lora_config)
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
  model.save_pretrained(str(tmp_path))
  assert os.path.isfile(tmp_path / "adapter_config.json")
  trainable = sd3_built[2]
  loaded = export.load_adapters(trainable, "sd3", str(tmp_path), RANK, ALPHA)
  ours = _our_deltas(loaded, RANK, ALPHA)
  expected = {k.removeprefix("base_model.model."): v for k, v in _peft_deltas(model).items()}
  assert len(expected) == 4
  for name, delta in expected.items():
    np.testing.assert_allclose(ours[name], delta, rtol=1e-5, atol=1e-6)


def test_export_round_trips_through_import(sd3_built, tmp_path):
  trainable = randomize(sd3_built[2], seed=2)
  write_export(trainable, "sd3", str(tmp_path))
  # Into adapters with another alpha (alpha only sets LoRALinear.scale): B is rescaled.
  loaded = export.load_adapters(sd3_built[2], "sd3", str(tmp_path), RANK, 2.0)
  ours, back = _our_deltas(trainable, RANK, ALPHA), _our_deltas(loaded, RANK, 2.0)
  for name in ours:  # float32 products of differently rounded factors
    np.testing.assert_allclose(back[name], ours[name], rtol=1e-5, atol=1e-6)
  for path, (a, _) in export.flat_adapters(trainable).items():
    np.testing.assert_array_equal(export.flat_adapters(loaded)[path][0], a)


def test_import_errors_are_named(sd3_built, tmp_path):
  trainable = sd3_built[2]
  a = np.zeros((RANK, 32), np.float32)
  b = np.zeros((32, RANK), np.float32)
  save_file({"transformer.transformer_blocks.0.attn.nowhere.lora_A.weight": a,
             "transformer.transformer_blocks.0.attn.nowhere.lora_B.weight": b},
            str(tmp_path / "unknown.safetensors"))
  with pytest.raises(export.LoraFormatError, match=r"attn\.nowhere.*match no adapter"):
    export.load_adapters(trainable, "sd3", str(tmp_path / "unknown.safetensors"), RANK, ALPHA)
  save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a[:2],
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b[:, :2]},
            str(tmp_path / "rank2.safetensors"))
  with pytest.raises(export.LoraFormatError, match=r"file rank 2, config.lora.rank=4"):
    export.load_adapters(trainable, "sd3", str(tmp_path / "rank2.safetensors"), RANK, ALPHA)
  save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a[:, :8],
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b},
            str(tmp_path / "shape.safetensors"))
  with pytest.raises(export.LoraFormatError, match=r"attn\.to_q: file lora_A \(4, 8\)"):
    export.load_adapters(trainable, "sd3", str(tmp_path / "shape.safetensors"), RANK, ALPHA)
  save_file({"lora_unet_blocks_0.lora_down.weight": a}, str(tmp_path / "kohya.safetensors"))
  with pytest.raises(export.LoraFormatError, match="lora_down"):
    export.read_lora(str(tmp_path / "kohya.safetensors"))
  os.mkdir(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="neither"):
    export.read_lora(str(tmp_path / "empty"))
  with pytest.raises(export.LoraFormatError, match="no diffusers counterpart"):
    export.diffusers_module("tiny", "transformer.blocks.0.attn.to_q")


def test_mgrpo_export_command(tiny_sd3, sd3_built, tmp_path):
  """mgrpo-export on a workdir (config.json + an orbax checkpoint as the trainer saves it)."""
  _, directory = tiny_sd3
  trainable = randomize(sd3_built[2], seed=3)
  workdir = tmp_path / "run"
  config = {"model": dict(model_config("sd3", directory)), "lora": dict(run_config().lora),
            "reward": {"names": ["ocr"], "weights": [1.0]}, "tree": {"mode": "tree"},
            "advantage": {"mode": "reward_groups"}}
  os.makedirs(workdir)
  (workdir / "config.json").write_text(json.dumps(config))
  (workdir / "metrics.jsonl").write_text(json.dumps({"step": 5, "reward/ocr": 0.25}) + "\n")
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  state = {"trainable": trainable, "step": jax.device_put(jnp.int32(5),
                                                          sharding_lib.replicated(mesh))}
  with ckpt_lib.Checkpointer(str(workdir)) as checkpointer:
    checkpointer.save(5, state, {})
  export.main(["--workdir", str(workdir), "--out", str(tmp_path / "out")])
  from safetensors.numpy import load_file
  written = load_file(str(tmp_path / "out" / export.LORA_FILE))
  tensors, _ = export.to_diffusers(export.flat_adapters(trainable), "sd3", RANK, ALPHA)
  assert sorted(written) == sorted(tensors)
  name = "transformer.transformer_blocks.1.attn.to_out.0"
  module = trainable["transformer"]["transformer_blocks"][1]["attn"]["to_out"]
  a, b = np.asarray(module["lora_a"].get_value()), np.asarray(module["lora_b"].get_value())
  np.testing.assert_array_equal(written[name + ".lora_A.weight"], a.T)
  np.testing.assert_allclose(written[name + ".lora_B.weight"], ALPHA / RANK * b.T, rtol=1e-7)
  card = (tmp_path / "out" / "README.md").read_text()
  assert "load_lora_weights" in card and "| reward/ocr | 0.25 |" in card
  with pytest.raises(SystemExit, match="no EMA weights"):
    export.main(["--workdir", str(workdir), "--out", str(tmp_path / "o2"), "--ema"])
  with pytest.raises(SystemExit, match="config.json does not exist"):
    export.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "o3")])


def test_init_from_config(sd3_built, tmp_path):
  """`config.lora.init_from` (what the trainer calls after building the adapters)."""
  trainable = randomize(sd3_built[2], seed=4)
  write_export(trainable, "sd3", str(tmp_path))
  config = run_config()
  config.model = ml_collections.ConfigDict({"name": "sd3"})
  assert export.init_from_config(sd3_built[2], config) is sd3_built[2]  # "" = unchanged
  config.lora.init_from = str(tmp_path / export.LORA_FILE)
  loaded = export.init_from_config(sd3_built[2], config)
  for path, (a, b) in export.flat_adapters(trainable).items():
    np.testing.assert_array_equal(export.flat_adapters(loaded)[path][0], a)
    np.testing.assert_allclose(export.flat_adapters(loaded)[path][1], b, rtol=1e-6)
  config.lora.enabled = False
  with pytest.raises(ValueError, match="needs lora.enabled=True"):
    export.init_from_config(sd3_built[2], config)


def test_flux_pickscore_targets_name_diffusers_linears(tiny_flux):
  """configs/flux_pickscore.py's targets (attention + feed-forward) map to torch Linear layers
  of diffusers' FluxTransformer2DModel, so exports of such runs load completely."""
  from flax import nnx
  from mgrpo_jax.config_utils import load_sibling
  from mgrpo_jax.models import lora
  pipe, directory = tiny_flux
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  targets = load_sibling(os.path.join(root, "configs", "flux_pickscore.py"),
                         "flux_pickscore").get_config().lora.targets
  generator = registry.get_generator(model_config("flux", directory))
  module = generator.make_module(nnx.Rngs(0))
  adapted = lora.apply_lora(module, tuple(targets), 2, 4.0, rngs=nnx.Rngs(1))
  names = {export.diffusers_module("flux", p)[len("transformer."):] for p in adapted}
  linears = {n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
  assert names <= linears, sorted(names - linears)
  assert {"transformer_blocks.0.ff.net.0.proj", "transformer_blocks.1.ff_context.net.2",
          "single_transformer_blocks.1.attn.to_k"} <= names
