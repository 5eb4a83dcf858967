"""load_pipeline: the trainer's render of a checkpoint, any batch size, PIL output."""

import os

import jax
import numpy as np
import pytest

from mgrpo_jax.config_utils import load_sibling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = os.path.join(os.path.dirname(ROOT), "shared", "datasets")
PROMPTS = ['A sign that reads "OPEN"', "a red apple", "a blue door", "two cats", "a green hat"]


def tiny_config():
  config = load_sibling(os.path.join(ROOT, "configs", "tiny_jpeg.py"), "tiny_jpeg").get_config()
  config.log.progress = False
  config.data.prompts_per_batch = 8  # one prompt per simulated device
  config.mesh.data = -1
  config.sample.eval_num_steps = 3
  return config


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(DATASETS) and "MGRPO_DATASETS" not in os.environ,
                    reason="../shared/datasets not present")
def test_pipeline_equals_trainer_render(tmp_path):
  import mgrpo_jax
  from mgrpo_jax import trainer as trainer_lib
  config = tiny_config()
  workdir = str(tmp_path / "run")
  trainer = trainer_lib.Trainer(config, workdir, compile_ahead=False)  # renders, no training
  try:
    base = trainer.render(PROMPTS[:2], seed=3)  # adapters at init: B = 0
    # Non-zero adapters (B is zero at init), so the checkpoint differs from the base model.
    leaves, treedef = jax.tree.flatten(trainer.state.trainable)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    trainer.state = trainer.state.replace(trainable=jax.tree.unflatten(treedef, [
        jax.device_put(0.5 * jax.random.normal(k, x.shape, x.dtype), x.sharding)
        for k, x in zip(keys, leaves)]))
    trainer.save(1, force=True)
    expected = trainer.render(PROMPTS, seed=3)
  finally:
    trainer.close()

  pipe = mgrpo_jax.load_pipeline(config, lora=workdir)
  assert pipe.iteration == 1 and len(jax.tree.leaves(pipe.runtime.frozen)) > 0
  images = pipe(PROMPTS, seed=3, output_type="np")
  assert images.shape == expected.shape == (5,) + tuple(pipe.generator.image_shape)
  np.testing.assert_array_equal(images, expected)  # 5 prompts padded to 8 rows
  # A shorter batch (other padding) gives the same rows; PIL output.
  pil = pipe(PROMPTS[:3], seed=3)
  assert [im.size for im in pil] == [tuple(pipe.generator.image_shape[:2])] * 3
  np.testing.assert_array_equal(np.stack([np.asarray(im) for im in pil]), expected[:3])
  assert np.abs(base.astype(int) - expected[:2]).max() > 10  # the adapters matter
  np.testing.assert_array_equal(pipe(PROMPTS[:2], seed=3, output_type="np", use_lora=False),
                                base)
  # A workdir alone: its config.json, and itself as the LoRA.
  again = mgrpo_jax.load_pipeline(workdir)
  assert again.lora_source == workdir and again.iteration == 1
  assert again.config.lora.rank == config.lora.rank and again.config.lora.enabled


def test_bad_arguments_are_named(tmp_path):
  import mgrpo_jax
  with pytest.raises(FileNotFoundError, match="neither a config file.*nor a Hub repo id"):
    mgrpo_jax.load_pipeline(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="config file .*missing.py does not exist"):
    mgrpo_jax.load_pipeline(str(tmp_path / "missing.py"))
  with pytest.raises(TypeError, match="expected a ConfigDict or a path"):
    mgrpo_jax.load_pipeline(3)
  (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
  with pytest.raises(ValueError, match="is a StableDiffusionPipeline"):
    mgrpo_jax.load_pipeline(str(tmp_path))


def test_import_mgrpo_jax_stays_light():
  """`import mgrpo_jax` does not import the trainer or models (load_pipeline is lazy)."""
  import subprocess
  import sys
  code = ("import sys, mgrpo_jax; assert 'mgrpo_jax.trainer' not in sys.modules; "
          "assert 'mgrpo_jax.pipeline' not in sys.modules; "
          "assert callable(mgrpo_jax.load_pipeline); assert 'mgrpo_jax.pipeline' in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
