"""End-to-end training on the tiny config: outputs, kill-and-resume, 1 vs 8 devices, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mgrpo_jax import policy as policy_lib
from mgrpo_jax import runtime as runtime_lib
from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax import train_step as train_step_lib
from mgrpo_jax import trainer as trainer_lib
from mgrpo_jax.config_utils import load_sibling
from mgrpo_jax.data import prompts as prompts_lib
from mgrpo_jax.data import synthetic_text
from mgrpo_jax.models import registry
from mgrpo_jax.sampling import rollout as rollout_lib
from mgrpo_jax.sampling import schedule
from mgrpo_jax.sampling.tree import tree_spec_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = os.path.join(os.path.dirname(ROOT), "shared", "datasets")


def tiny_config(**overrides):
  config = load_sibling(os.path.join(ROOT, "configs", "tiny_ocr_color.py"),
                        "tiny_ocr_color").get_config("runlocal")
  # Rewards that need no OCR keep these tests fast; the OCR rewards have their own tests.
  config.reward.names = ("jpeg_compressibility", "jpeg_incompressibility")
  config.reward.weights = (1.0, 0.5)
  config.log.progress = False
  # 8 simulated devices: 4-way data parallel (one prompt per shard) x 2-way tensor parallel.
  config.mesh.data, config.mesh.tensor = 4, 2
  for key, value in overrides.items():
    group, field = key.split(".")
    setattr(config[group], field, value)
  return config


needs_data = pytest.mark.skipif(not os.path.isdir(DATASETS) and "MGRPO_DATASETS" not in os.environ,
                                reason="../shared/datasets not present")


def final_params(workdir, config):
  trainer = trainer_lib.Trainer(config, workdir)
  try:
    return jax.tree.map(np.asarray, trainer.state.trainable), trainer.start_iteration
  finally:
    trainer.close()


@needs_data
@pytest.mark.slow
def test_tiny_run_writes_metrics_images_plot_and_checkpoints(tmp_path):
  config = tiny_config(**{"log.eval_at_start": True,
                          "log.eval_dataset": synthetic_text.prompt_csv("heldout")})
  metrics = trainer_lib.train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  # Step 0: the evaluation of the initial model alone; then one line per iteration, each with
  # its evaluation (eval_every = 1).
  assert [l["step"] for l in lines] == [0, 1, 2]
  assert sorted(lines[0]) == ["eval/jpeg_compressibility", "eval/jpeg_incompressibility", "step"]
  for line in lines:
    # JPEG sizes in kB: compressibility is minus incompressibility.
    assert line["eval/jpeg_compressibility"] == -line["eval/jpeg_incompressibility"] < 0
  assert sorted(os.listdir(tmp_path / "images")) == [f"eval_00000{i}.png" for i in range(3)]
  lines = lines[1:]
  for key in ("reward/jpeg_compressibility", "train/loss", "train/approx_kl", "train/clipfrac",
              "advantage/std", "nfe/per_prompt", "time/sample", "time/train"):
    assert key in lines[-1], key
  spec = tree_spec_from_config(config)
  assert lines[-1]["nfe/per_prompt"] == spec.nfe < lines[-1]["nfe/independent_per_prompt"]
  # The first update happens on fresh samples: PPO's ratio is 1 up to float rounding.
  assert abs(lines[0]["train/ratio_mean"] - 1.0) < 1e-4
  assert os.path.exists(tmp_path / "reward_curves.png")
  assert os.path.exists(tmp_path / "config.json")
  assert metrics["reward/jpeg_compressibility"] < 0

  # mgrpo-sample renders from the run's checkpoint.
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  out = tmp_path / "samples"
  res = subprocess.run(
      [sys.executable, "-m", "mgrpo_jax.sample",
       f"--config={os.path.join(ROOT, 'configs', 'tiny_ocr_color.py')}:runlocal",
       f"--workdir={tmp_path}", "--prompt=a red sign", "--prompt=a blue sign", f"--out={out}",
       "--config.reward.names=('jpeg_compressibility','jpeg_incompressibility')",
       "--config.reward.weights=(1.0,0.5)", "--config.mesh.data=4", "--config.mesh.tensor=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "from iteration 2" in res.stdout
  assert sorted(os.listdir(out)) == ["0000.png", "0001.png", "grid.png"]

  # mgrpo-eval evaluates an earlier checkpoint on a prompt file the run never trained on.
  heldout = synthetic_text.prompt_csv("heldout")
  res = subprocess.run(
      [sys.executable, "-m", "mgrpo_jax.evaluate",
       f"--config={os.path.join(ROOT, 'configs', 'tiny_ocr_color.py')}:runlocal",
       f"--checkpoint={tmp_path}", "--step=1", f"--config.data.dataset={heldout}",
       "--num_prompts=4", f"--out={tmp_path / 'eval'}",
       "--config.reward.names=('jpeg_compressibility','jpeg_incompressibility')",
       "--config.reward.weights=(1.0,0.5)"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  result = json.load(open(tmp_path / "eval" / "eval.json"))
  assert result["iteration"] == 1
  assert [p["prompt"] for p in result["per_prompt"]] == [
      r.prompt for r in prompts_lib.load_prompts(heldout)[:4]]
  assert result["overall"]["mean_jpeg_compressibility"] == pytest.approx(
      -result["overall"]["mean_jpeg_incompressibility"])


@needs_data
@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
  config = tiny_config(**{"train.num_iterations": 3})
  trainer_lib.train_and_evaluate(config, str(tmp_path / "straight"))
  straight, _ = final_params(str(tmp_path / "straight"), config)

  # Crash in the middle of the third iteration (after its sampling), then start again.
  original = trainer_lib.Trainer.train_iteration
  calls = {"n": 0}

  def crashing(self, iteration, timer):
    calls["n"] += 1
    if iteration == 2:
      self.sample_and_score(iteration, timer)
      raise KeyboardInterrupt("simulated kill")
    return original(self, iteration, timer)

  monkeypatch.setattr(trainer_lib.Trainer, "train_iteration", crashing)
  with pytest.raises(KeyboardInterrupt):
    trainer_lib.train_and_evaluate(config, str(tmp_path / "resumed"))
  monkeypatch.setattr(trainer_lib.Trainer, "train_iteration", original)
  trainer_lib.train_and_evaluate(config, str(tmp_path / "resumed"))
  resumed, start = final_params(str(tmp_path / "resumed"), config)
  assert start == 3
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  lines = [json.loads(l) for l in open(tmp_path / "resumed" / "metrics.jsonl")]
  assert [l["step"] for l in lines][-1] == 3


@pytest.mark.slow
def test_main_job_sampling_settings_train_the_tiny_model(tmp_path):
  """The main job's CPS with exact densities and exact KL, end to end on the random model
  (`runlocal` keeps Flow-GRPO's SDE for the other tests)."""
  full = load_sibling(os.path.join(ROOT, "configs", "tiny_ocr_color.py"),
                      "tiny_ocr_color").get_config()
  assert (full.sample.method, full.sample.cps_logprob, full.train.kl_mode,
          tuple(full.sample.sde_window)) == ("cps", "exact", "exact", (-1, -1))
  config = tiny_config(**{"sample.method": full.sample.method,
                          "sample.cps_logprob": full.sample.cps_logprob,
                          "train.kl_mode": full.train.kl_mode})
  trainer_lib.train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2]
  # Iteration 1 starts at the reference (LoRA B = 0): its first minibatch has ratio 1 and KL 0;
  # after iteration 1's update the adapters differ from the reference, so iteration 2's KL > 0.
  assert np.isfinite(lines[0]["train/loss"]) and np.isfinite(lines[1]["train/loss"])
  assert 0.0 < lines[1]["train/kl"] < 1e3
  for s in range(config.sample.num_steps - 1):  # every step but the last is trained
    assert f"train/ratio_mean_per_step/{s}" in lines[0], s
  assert f"train/ratio_mean_per_step/{config.sample.num_steps - 1}" not in lines[0]


def test_train_step_one_and_eight_devices_agree():
  config = tiny_config()
  generator = registry.get_generator(config.model)
  spec = tree_spec_from_config(config)
  sampler = rollout_lib.sampler_from_config(config)
  sigmas = schedule.flow_match_sigmas(config.sample.num_steps, config.sample.shift)
  prompts = [f'a sign that reads "test {i}"' for i in range(8)]
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    # One device against 4-way data x 2-way tensor parallelism.
    mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1} if len(devices) == 1
                                  else config.mesh, devices)
    graphdef, trainable, frozen = policy_lib.build_model_states(generator, config, mesh)
    # Traced under the mesh, as the trainer does, so the activation sharding hints apply.
    context = jax.set_mesh(mesh)
    context.__enter__()
    policy = policy_lib.Policy(graphdef, True)
    tokens = sharding_lib.global_batch(generator.tokenize(prompts), mesh)
    neg = sharding_lib.global_batch(generator.tokenize([""] * 8), mesh)
    sample = jax.jit(train_step_lib.make_sample_fn(policy, spec, sampler, sigmas,
                                                   generator.latent_shape))
    out, cond, neg_cond, _ = sample(trainable, frozen, tokens, neg, jax.random.key(0))
    # A perturbed adapter makes the gradient step non-trivial in both the policy and KL terms.
    trainable = jax.tree.map(lambda a: a + 0.01, trainable)
    # Plain SGD makes the new parameters an exact linear function of the gradient; Adam's first
    # step divides by |g| and turns float-rounding differences of near-zero gradient entries
    # into O(learning rate) differences, which says nothing about sharding.
    tx = optax.sgd(1.0)
    state = train_step_lib.TrainState(trainable, jax.jit(tx.init)(trainable),
                                      jnp.zeros([], jnp.int32))
    adv = jnp.asarray(np.linspace(-1, 1, out.log_probs.size).reshape(out.log_probs.shape))
    batch = train_step_lib.Minibatch(
        train_step_lib.Transitions.from_rollout(out, adv, jnp.ones_like(adv)), cond, neg_cond)
    step = jax.jit(train_step_lib.make_train_step(policy, tx, spec, sampler, sigmas, config.train))
    new_state, metrics = step(state, batch, frozen)
    results.append((jax.tree.map(np.asarray, new_state.trainable),
                    {k: np.asarray(v) for k, v in metrics.items()}))
    context.__exit__(None, None, None)
  (p1, m1), (p8, m8) = results
  for name in ("loss", "policy_loss", "kl", "grad_norm", "approx_kl"):
    np.testing.assert_allclose(m1[name], m8[name], rtol=1e-4, atol=1e-7, err_msg=name)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@needs_data
def test_batch_not_divisible_by_mesh_is_a_clear_error(tmp_path):
  config = tiny_config(**{"data.prompts_per_batch": 3})
  with pytest.raises(ValueError, match="prompts_per_batch=3"):
    trainer_lib.Trainer(config, str(tmp_path))


def test_missing_prompt_file_is_named(tmp_path):
  config = tiny_config(**{"data.dataset": str(tmp_path / "missing.csv")})
  with pytest.raises(FileNotFoundError, match="missing.csv"):
    trainer_lib.Trainer(config, str(tmp_path / "w"))


def test_ema_follows_the_trained_weights_every_k_steps():
  config = tiny_config(**{"train.ema_decay": 0.9, "train.ema_every": 2})
  generator = registry.get_generator(config.model)
  spec = tree_spec_from_config(config)
  sampler = rollout_lib.sampler_from_config(config)
  sigmas = schedule.flow_match_sigmas(config.sample.num_steps, config.sample.shift)
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  graphdef, trainable, frozen = policy_lib.build_model_states(generator, config, mesh)
  policy = policy_lib.Policy(graphdef, True)
  tokens = sharding_lib.global_batch(generator.tokenize(["a", "b"]), mesh)
  sample = jax.jit(train_step_lib.make_sample_fn(policy, spec, sampler, sigmas,
                                                 generator.latent_shape))
  out, cond, neg_cond, _ = sample(trainable, frozen, tokens, tokens, jax.random.key(0))
  adv = jnp.asarray(np.linspace(-1, 1, out.log_probs.size).reshape(out.log_probs.shape))
  batch = train_step_lib.Minibatch(
      train_step_lib.Transitions.from_rollout(out, adv, jnp.ones_like(adv)), cond, neg_cond)
  tx = optax.sgd(1.0)
  ema0 = jax.tree.map(lambda a: a + 1.0, trainable)  # distinct from the weights
  state = train_step_lib.TrainState(trainable, tx.init(trainable), jnp.zeros([], jnp.int32),
                                    ema=ema0)
  step = jax.jit(train_step_lib.make_train_step(policy, tx, spec, sampler, sigmas, config.train))
  s1, _ = step(state, batch, frozen)
  s2, _ = step(s1, batch, frozen)
  # Step 1 is not a multiple of ema_every=2: unchanged; step 2: 0.9 ema + 0.1 weights.
  for e0, e1 in zip(jax.tree.leaves(ema0), jax.tree.leaves(s1.ema)):
    np.testing.assert_array_equal(e1, e0)
  for e0, w2, e2 in zip(jax.tree.leaves(ema0), jax.tree.leaves(s2.trainable),
                        jax.tree.leaves(s2.ema)):
    np.testing.assert_allclose(e2, 0.9 * np.asarray(e0) + 0.1 * np.asarray(w2), rtol=1e-6,
                               atol=1e-7)


def test_full_finetuning_keeps_a_separate_reference():
  config = tiny_config(**{"lora.enabled": False})
  generator = registry.get_generator(config.model)
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  _, trainable, frozen = policy_lib.build_model_states(generator, config, mesh)
  a, b = jax.tree.leaves(trainable)[0], jax.tree.leaves(frozen)[0]
  np.testing.assert_array_equal(a, b)
  # Separate buffers: donating the trainable state to the train step leaves the reference alive.
  assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()


@needs_data
@pytest.mark.slow
def test_checkpoint_written_with_the_old_rng_entry_still_restores(tmp_path):
  # Checkpoints written before the state became a TrainState also held a constant "rng" (the
  # key data of key(seed)); the trainer restores them and drops it.
  from mgrpo_jax import checkpoint as ckpt_lib
  from mgrpo_jax import workdir as workdir_lib
  config = tiny_config()
  trainer = trainer_lib.Trainer(config, str(tmp_path), compile_ahead=False)  # no training
  try:
    expected = jax.tree.map(lambda a: np.asarray(a) + 0.25, trainer.state.trainable)
    old = trainer.state.to_checkpoint()
    old["trainable"] = jax.tree.map(lambda a, e: jax.device_put(e, a.sharding),
                                    old["trainable"], expected)
    old["rng"] = jax.random.key_data(jax.random.key(config.seed))
    with ckpt_lib.Checkpointer(str(tmp_path / "old")) as ckpt:
      ckpt.save(3, old, trainer.loader.get_state(),
                metadata=workdir_lib.checkpoint_metadata(config), force=True)
  finally:
    trainer.close()
  params, start = final_params(str(tmp_path / "old"), config)
  assert start == 3
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(got, want)


def test_missing_checkpoint_step_is_named(tmp_path):
  # Rendering a chosen checkpoint goes through load_pipeline (mgrpo-sample, mgrpo-eval --step).
  from mgrpo_jax import checkpoint as ckpt_lib
  from mgrpo_jax import pipeline as pipeline_lib
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(2, {"step": jnp.zeros([], jnp.int32)}, {}, force=True)
  with pytest.raises(FileNotFoundError, match=r"no committed checkpoint 7 .*found steps \[2\]"):
    pipeline_lib.load_pipeline(tiny_config(), lora=str(tmp_path), step=7)


def test_text_cache_reproduces_the_uncached_run(tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("".join(f'a sign that reads "word {i}"\n' for i in range(4)))
  runs, compiled = {}, []
  listener = lambda event, duration, **kw: compiled.append(kw.get("fun_name")) \
      if event == "/jax/core/compile/backend_compile_duration" else None
  for size in (0, 16):
    config = tiny_config(**{"data.dataset": str(prompts), "train.num_iterations": 2,
                            "sample.text_cache_size": size})
    if size:
      jax.monitoring.register_event_duration_secs_listener(listener)
    try:
      trainer = trainer_lib.Trainer(config, str(tmp_path / f"cache{size}"))
      try:
        trainer.run()
        runs[size] = (jax.tree.map(np.asarray, trainer.state.trainable), trainer.text_cache)
      finally:
        trainer.close()
    finally:
      if size:
        jax.monitoring.unregister_event_duration_listener(listener)
  # With the cache the run samples from conditionings the cache hands over as host rows; the
  # ahead-of-time compilation (Runtime.compile_iteration) used their shardings, so each
  # function compiled once in the whole run, and the token sampler not at all.
  for name in ("jit(encode_fn)", "jit(sample_from_cond_fn)", "jit(train_step)"):
    assert compiled.count(name) == 1, (name, compiled)
  assert "jit(sample_fn)" not in compiled, compiled
  (plain, _), (cached, cache) = runs[0], runs[16]
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(cached)):
    np.testing.assert_array_equal(a, b)
  # 4 prompts, 2 iterations of 4: the second iteration and the negative prompt hit the cache.
  assert cache.misses == 4 + 1 and cache.hits == 4 + 1


@pytest.mark.slow  # ~35 s: builds the 8-device runtime
def test_shape_error_in_the_train_step_surfaces_before_any_sampling(tmp_path, monkeypatch):
  """A train step that cannot take the rollout's transitions (here a reshape to a wrong length,
  standing in for a shape bug) fails while the Trainer is built, with a message naming the train
  step and the rollout shape; no function was compiled, so nothing was sampled."""
  make_train_step = train_step_lib.make_train_step

  def broken(*args, **kwargs):
    step = make_train_step(*args, **kwargs)

    def bad_step(state, batch, frozen):
      latents = batch.transitions.latents
      latents.reshape((latents.size + 1,))  # the shape bug
      return step(state, batch, frozen)
    return bad_step

  monkeypatch.setattr(train_step_lib, "make_train_step", broken)
  compiled = []
  listener = lambda event, duration, **kw: compiled.append(kw.get("fun_name")) \
      if event == "/jax/core/compile/backend_compile_duration" else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    # The runlocal variant: 4 steps, x2 at steps 0 and 1, 4 prompts (one per data shard).
    with pytest.raises(runtime_lib.ShapeCheckError,
                       match=r"train step \(rollout: 4 steps, 1 roots, branching at \(0, 1\) "
                             r"x \(2, 2\), 4 leaves; 4 prompts x 1 batches\) does not trace: "
                             r"TypeError: cannot reshape"):
      trainer_lib.Trainer(tiny_config(), str(tmp_path))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not [name for name in compiled if "sample" in str(name)], compiled
