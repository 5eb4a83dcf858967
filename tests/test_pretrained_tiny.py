"""The pretrained tiny text renderer: shipped weights load, tokenizer, pretraining loss and resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from mgrpo_jax import pretrain
from mgrpo_jax.models import lora as lora_lib
from mgrpo_jax.models import registry
from mgrpo_jax.models import tiny_pixel
from mgrpo_jax.models.tokenizer import BOS_ID, EOS_ID, PAD_ID

SMALL = dict(image_size=8, patch_size=4, num_layers=1, num_heads=2, head_dim=8, text_length=16,
             text_layers=1, pooled_dim=8)


def test_shipped_weights_load_through_the_registry():
  path = tiny_pixel.ASSET_DIR
  assert os.path.getsize(os.path.join(path, "model.safetensors")) <= 20 * 2**20
  provenance = json.load(open(os.path.join(path, "config.json")))
  assert provenance["seed"] == 0 and provenance["steps"] == 2500
  assert provenance["command"].startswith("python -m mgrpo_jax.pretrain ")
  generator = registry.get_generator(registry.tiny_text_model_config())
  assert generator.latent_shape == (32, 32, 3) and generator.image_shape == (128, 128, 3)
  abstract = nnx.state(nnx.eval_shape(lambda: generator.make_module(nnx.Rngs(0))))
  state = generator.load_weights(abstract, None)
  # Every tensor equals the file read by the safetensors library itself, cast to float32.
  reference = load_file(os.path.join(path, "model.safetensors"))
  flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
  assert sorted(flat) == sorted(reference)
  for name, value in flat.items():
    assert value.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(value), reference[name].astype(np.float32))
  # Trained, not the zero init of adaLN-Zero.
  assert np.abs(reference["transformer.proj_out.kernel"]).max() > 1e-3


def test_registry_refuses_sizes_that_do_not_match_the_weights():
  config = registry.tiny_text_model_config()
  config.num_layers = 4
  with pytest.raises(ValueError, match=r"num_layers=4 \(weights: 5\)"):
    registry.get_generator(config)


def test_random_init_without_path():
  generator = registry.get_generator(registry.tiny_text_model_config(path=""))
  assert generator.load_weights is None


def test_tokenizer_reads_word_and_colour():
  tok = tiny_pixel.PromptTokenizer(16)
  ids = tok(['A sign that reads "CAT". The color of the text "CAT" is Red.', "plain", ""])
  ids = ids["input_ids"]
  expect = [BOS_ID] + [b + 3 for b in b"CAT|red"] + [EOS_ID]
  assert ids[0, :len(expect)].tolist() == expect and (ids[0, len(expect):] == PAD_ID).all()
  assert ids[1, :7].tolist() == [BOS_ID] + [b + 3 for b in b"plain"] + [EOS_ID]
  assert ids[2, :2].tolist() == [BOS_ID, EOS_ID] and (ids[2, 2:] == PAD_ID).all()
  assert tiny_pixel.condition_text('reads "HI" in blue') == "HI|"
  with pytest.raises(TypeError, match="list of prompts"):
    tok("one string")


def test_decode_is_a_bicubic_upscale_of_the_pixels():
  model = tiny_pixel.TinyPixelT2I(tiny_pixel.TinyPixelConfig(**SMALL), rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1.2, maxval=1.2)
  images = model.decode(x)
  assert images.shape == (2, 32, 32, 3)
  ref = np.clip(jax.image.resize(np.clip((np.asarray(x) + 1) / 2, 0, 1), (2, 32, 32, 3),
                                 "cubic"), 0, 1)
  np.testing.assert_allclose(np.asarray(images), ref, atol=1e-6)
  # A constant image stays that constant.
  np.testing.assert_allclose(model.decode(jnp.full((1, 8, 8, 3), 0.5)), 0.75, atol=1e-6)


def test_lora_targets_the_mmdit_attention():
  model = tiny_pixel.TinyPixelT2I(tiny_pixel.TinyPixelConfig(**SMALL), rngs=nnx.Rngs(0))
  # The default LoRA targets of configs/base.py.
  targets = (r"attn\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",)
  lora_lib.apply_lora(model, targets, 2, 4.0, rngs=nnx.Rngs(1))
  _, adapters, _ = lora_lib.split_lora(model)
  # One block, the last (context_pre_only, no to_add_out): 4 image-stream and 3 text-stream
  # projections, each with an A and a B matrix.
  assert len(jax.tree.leaves(adapters)) == 14


def test_flow_matching_loss_of_the_zero_init_model():
  # adaLN-Zero: the untrained model predicts zero velocity, so the loss is mean((eps - x0)^2)
  # with the eps the loss draws (numpy reference of the same draws).
  model = tiny_pixel.TinyPixelT2I(tiny_pixel.TinyPixelConfig(**SMALL), rngs=nnx.Rngs(0))
  x0 = np.linspace(-1, 1, 4 * 8 * 8 * 3, dtype=np.float32).reshape(4, 8, 8, 3)
  tokens = tiny_pixel.PromptTokenizer(16)(["a", "b", "c", ""])
  key = jax.random.key(3)
  graphdef, state = nnx.split(model)
  loss = jax.jit(lambda s, t, x, k: pretrain.flow_matching_loss(nnx.merge(graphdef, s), t, x, k))(
      state, tokens, jnp.asarray(x0), key)
  _, k_noise = jax.random.split(key)
  eps = np.asarray(jax.random.normal(k_noise, x0.shape))
  np.testing.assert_allclose(float(loss), np.mean((eps - x0) ** 2), rtol=1e-5)


def test_text_weighted_flow_matching_loss():
  # The zero-init model again (zero velocity): with per-pixel weights the loss is
  # sum_b,p w * mean_c (eps - x0)^2 / sum w, against numpy on the same draws.
  model = tiny_pixel.TinyPixelT2I(tiny_pixel.TinyPixelConfig(**SMALL), rngs=nnx.Rngs(0))
  x0 = np.linspace(-1, 1, 4 * 8 * 8 * 3, dtype=np.float32).reshape(4, 8, 8, 3)
  weights = 1.0 + 4.0 * (np.arange(4 * 8 * 8).reshape(4, 8, 8) % 5 == 0).astype(np.float32)
  tokens = tiny_pixel.PromptTokenizer(16)(["a", "b", "c", ""])
  key = jax.random.key(3)
  graphdef, state = nnx.split(model)
  loss = jax.jit(lambda s, w: pretrain.flow_matching_loss(nnx.merge(graphdef, s), tokens,
                                                          jnp.asarray(x0), key, w))
  _, k_noise = jax.random.split(key)
  sq = (np.asarray(jax.random.normal(k_noise, x0.shape), np.float64) - x0) ** 2
  expect = sum(weights[b, i, j] * sq[b, i, j, c] / 3 for b in range(4) for i in range(8)
               for j in range(8) for c in range(3)) / weights.sum()
  np.testing.assert_allclose(float(loss(state, jnp.asarray(weights))), expect, rtol=1e-5)
  # Uniform weights give the plain mean.
  np.testing.assert_allclose(float(loss(state, jnp.full((4, 8, 8), 2.5))), sq.mean(), rtol=1e-5)


def test_text_loss_mask_and_batch_weights():
  from mgrpo_jax.data import synthetic_text  # pylint: disable=g-import-not-at-top
  alpha = synthetic_text.glyph_alpha("FOX")
  mask = pretrain.text_loss_mask("FOX")
  # Reference: each pixel the largest coverage among itself and its 8 neighbours (in the image).
  n = alpha.shape[0]
  ref = np.zeros_like(alpha)
  for i in range(n):
    for j in range(n):
      ref[i, j] = alpha[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].max()
  np.testing.assert_array_equal(mask, ref)
  assert (mask >= alpha).all() and (mask > 0).sum() > (alpha > 0).sum()
  config = pretrain.default_config()
  config.train.batch_size = 4
  config.train.text_loss_weight = 0.0
  tokenizer = tiny_pixel.PromptTokenizer(16)
  ids, x0, weights = pretrain.batch_for_step(config, tokenizer, 7)
  assert weights is None and ids.shape == (4, 16) and x0.shape == (4, 32, 32, 3)
  config.train.text_loss_weight = 3.0
  ids_w, x0_w, weights = pretrain.batch_for_step(config, tokenizer, 7)
  np.testing.assert_array_equal(ids_w, ids)
  np.testing.assert_array_equal(x0_w, x0)
  _, _, pairs = synthetic_text.sample_batch(config.seed, 7, 4)
  np.testing.assert_allclose(weights, [1 + 3 * pretrain.text_loss_mask(w) for w, _ in pairs])
  config.train.text_loss_weight = -1.0
  with pytest.raises(ValueError, match="text_loss_weight must be >= 0"):
    pretrain.batch_for_step(config, tokenizer, 7)


def test_learning_rate_schedules():
  config = pretrain.default_config()
  config.train.learning_rate, config.train.warmup_steps, config.train.steps = 1e-3, 100, 1100
  constant = pretrain.learning_rate_schedule(config)
  # Linear warm-up, then the peak for ever (the shipped recipe).
  np.testing.assert_allclose([float(constant(s)) for s in (0, 50, 100, 1100, 5000)],
                             [0.0, 5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
  config.train.decay, config.train.final_lr_fraction = "cosine", 0.2
  cosine = pretrain.learning_rate_schedule(config)
  # After warm-up: end + (peak - end) (1 + cos(pi u)) / 2, u = (step - 100) / 1000.
  end = 2e-4
  expect = [0.0, 5e-4, 1e-3, end + 8e-4 * (1 + np.cos(np.pi * 0.25)) / 2, 6e-4, end, end]
  np.testing.assert_allclose([float(cosine(s)) for s in (0, 50, 100, 350, 600, 1100, 1500)],
                             expect, rtol=1e-5)
  config.train.decay = "linear"
  with pytest.raises(ValueError, match="config.train.decay must be"):
    pretrain.learning_rate_schedule(config)
  config.train.decay, config.train.steps = "cosine", 100
  with pytest.raises(ValueError, match="needs train.steps"):
    pretrain.learning_rate_schedule(config)


@pytest.mark.slow
def test_pretraining_resumes_exactly_and_exports_loadable_weights(tmp_path):
  config = pretrain.default_config()
  config.model.update(dict(SMALL, image_size=32, patch_size=8))  # the data is 32 px
  config.train.batch_size = 4
  config.train.steps = 3
  config.train.warmup_steps = 1
  config.log.log_every = 1
  config.log.checkpoint_every = 2
  straight = pretrain.train(config, str(tmp_path / "a"), "cmd")
  config.train.steps = 2
  pretrain.train(config, str(tmp_path / "b"))
  config.train.steps = 3
  resumed = pretrain.train(config, str(tmp_path / "b"))
  a = load_file(os.path.join(straight, "model.safetensors"))
  b = load_file(os.path.join(resumed, "model.safetensors"))
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  log = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
  assert [r["step"] for r in log] == [1, 2, 3]
  assert json.load(open(os.path.join(straight, "config.json")))["command"] == "cmd"
  # The exported directory loads as the generator's weights.
  model, cfg = pretrain.load_model(straight)
  assert cfg.num_layers == 1 and cfg.image_size == 32
  assert np.abs(np.asarray(model.transformer.proj_out.kernel[...])).max() > 0


def _small_run_config(steps: int, ema_decay: float = 0.0):
  config = pretrain.default_config()
  config.model.update(dict(SMALL, image_size=32, patch_size=8))  # the data is 32 px
  config.train.batch_size = 2
  config.train.steps = steps
  config.train.warmup_steps = 1
  # Large steps (the first step's rate is 0 in the warm-up) so the second moves the parameters
  # by far more than the float16 rounding of the exports.
  config.train.learning_rate = 1e-2
  config.train.ema_decay = ema_decay
  config.log.checkpoint_every = 1
  return config


@pytest.mark.slow
def test_pretraining_logs_the_text_weighted_loss(tmp_path):
  """The first step's logged loss (zero-init model: zero velocity) is numpy's mean of
  (eps - x0)^2 over the step's batch, weighted by 1 + 4 m with the text weight and plain without."""
  from mgrpo_jax.data import synthetic_text  # pylint: disable=g-import-not-at-top
  _, images, pairs = synthetic_text.sample_batch(0, 0, 2)
  x0 = images.astype(np.float64) * 2 - 1
  _, k_noise = jax.random.split(jax.random.fold_in(jax.random.key(0), 0))
  sq = ((np.asarray(jax.random.normal(k_noise, x0.shape), np.float64) - x0) ** 2).mean(-1)
  w = 1 + 4 * np.stack([pretrain.text_loss_mask(word) for word, _ in pairs]).astype(np.float64)
  for weight, expect in ((4.0, (w * sq).sum() / w.sum()), (0.0, sq.mean())):
    config = _small_run_config(1)
    config.train.text_loss_weight = weight
    config.log.log_every = 1
    pretrain.train(config, str(tmp_path / str(weight)))
    logged = json.loads(open(tmp_path / str(weight) / "log.jsonl").readline())["loss"]
    np.testing.assert_allclose(logged, expect, rtol=1e-5)
  assert abs((w * sq).sum() / w.sum() - sq.mean()) > 1e-2 * sq.mean()  # the two differ


@pytest.mark.slow
def test_ema_exports_the_average_of_the_parameter_sequence(tmp_path):
  """The EMA export of a 2-step run against numpy's average of the raw exports of 0, 1, 2 steps
  (the raw trajectory does not depend on the EMA); resuming keeps the average."""
  d = 0.6
  raw = []  # the raw parameters after 0 (the initial ones), 1 and 2 steps
  for steps in (0, 1, 2):
    out = pretrain.train(_small_run_config(steps), str(tmp_path / f"raw{steps}"))
    raw.append(load_file(os.path.join(out, "model.safetensors")))
  p0 = raw.pop(0)
  ema = pretrain.train(_small_run_config(2, d), str(tmp_path / "ema"))
  got = load_file(os.path.join(ema, "model.safetensors"))
  # Resume: one step, then the second step from state.npz (which holds the average).
  pretrain.train(_small_run_config(1, d), str(tmp_path / "resumed"))
  resumed = load_file(os.path.join(pretrain.train(_small_run_config(2, d),
                                                  str(tmp_path / "resumed")),
                                   "model.safetensors"))
  assert sorted(got) == sorted(p0)
  moved = 0
  for name in p0:
    p0_, p1, p2 = (np.asarray(x[name], np.float64) for x in (p0, *raw))
    want = d * (d * p0_ + (1 - d) * p1) + (1 - d) * p2
    # Exports are float16: the reference's inputs and the export are each rounded once, so they
    # agree to two float16 spacings at the arrays' magnitude.
    tol = 2 * np.spacing(np.float16(max(np.abs(p0_).max(), np.abs(p2).max())))
    np.testing.assert_allclose(got[name], want, rtol=0, atol=float(tol), err_msg=name)
    np.testing.assert_array_equal(resumed[name], got[name], err_msg=name)
    moved += np.abs(p2 - p0_).max() > 20 * tol
  assert moved > 0  # the step moved parameters by far more than the tolerance
  assert json.load(open(os.path.join(ema, "config.json")))["ema_decay"] == d
  # A state written without the average does not resume a run with it.
  with pytest.raises(ValueError, match="ema_decay"):
    pretrain.train(_small_run_config(2, d), str(tmp_path / "raw1"))
  with pytest.raises(ValueError, match="ema_decay must be"):
    pretrain.make_ema_update(1.0)


@pytest.mark.slow
def test_base_model_renders_training_words():
  from mgrpo_jax.data import synthetic_text as st  # pylint: disable=import-outside-toplevel
  from mgrpo_jax.rewards.ocr import OcrReward  # pylint: disable=import-outside-toplevel
  model, cfg = pretrain.load_model(tiny_pixel.ASSET_DIR)
  pairs = st.train_pairs()[::115]  # 16 pairs spread over the word list
  prompts = [st.prompt_for(w, c) for w, c in pairs]
  images = pretrain.sample_images(model, cfg, prompts, 0, 10, 4.5, 3.0, batch_size=16)
  ocr = OcrReward()
  scores = [ocr.score_one(im, p, {"text": w}) for im, p, (w, _) in zip(images, prompts, pairs)]
  # Text is there (pure noise or blank images score 0; the held-out mean is ~0.26).
  assert len(scores) == 16 and np.mean(scores) > 0.15


def _pretrain_curve():
  import importlib.util  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                      "pretrain_curve.py")
  spec = importlib.util.spec_from_file_location("pretrain_curve", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_pretrain_curve_names_a_workdir_without_exports(tmp_path):
  curve = _pretrain_curve()
  with pytest.raises(SystemExit, match="no weights_<step> exports.*export_every"):
    curve.main(["--workdir", str(tmp_path)])
  with pytest.raises(SystemExit, match="no workdir"):
    curve.main(["--workdir", str(tmp_path / "missing")])


@pytest.mark.slow
def test_pretrain_curve_scores_every_export(tmp_path):
  """Two steps with an export after each: one row per export, in step order, with the run's
  elapsed time from its log and rewards in [0, 1]."""
  config = pretrain.default_config()
  config.model.update(dict(SMALL, image_size=32, patch_size=8))
  config.train.batch_size = 2
  config.train.steps = 2
  config.train.warmup_steps = 1
  config.log.log_every = 1
  config.log.export_every = 1
  pretrain.train(config, str(tmp_path / "w"))
  out = tmp_path / "curve.json"
  _pretrain_curve().main(["--workdir", str(tmp_path / "w"), "--seeds", "0", "--no-shipped",
                          "--out", str(out)])
  rows = json.loads(out.read_text())["rows"]
  log = [json.loads(line) for line in open(tmp_path / "w" / "log.jsonl")]
  assert [r["step"] for r in rows] == [1, 2]
  # Named relative to the workdir: step 1's export, then the final export of step 2.
  assert [r["weights"] for r in rows] == ["weights_1", "weights"]
  for row, record in zip(rows, log):
    assert row["elapsed_min"] == pytest.approx(record["elapsed_s"] / 60)
    assert 0 <= row["ocr"][0] <= 1 and 0 <= row["text_color"][0] <= 1


def test_pretrain_step_bench_ways_compute_the_same_function(tmp_path):
  """bench/pretrain_step.py --quick: the plain loop, the scan and the rematerialised scan train
  the same model (3 blocks: a scan of 2 and the last block) to the same loss."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "steps.json"
  subprocess.run([sys.executable, os.path.join(root, "bench", "pretrain_step.py"), "--quick",
                  "--out", str(out)], check=True, cwd=root)
  result = json.loads(out.read_text())
  assert [r["way"] for r in result["runs"]] == ["loop", "scan", "scan_remat"]
  losses = [r["loss_after"] for r in result["runs"]]
  assert np.isfinite(losses).all()
  np.testing.assert_allclose(losses[1:], losses[0], rtol=1e-5)
  assert all(r["median_s"] > 0 for r in result["runs"])
