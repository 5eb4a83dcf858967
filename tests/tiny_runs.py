"""The short tiny-model training run that feature tests (GRPO-Guard, SDE windows, pruning) share."""

import os

from mgrpo_jax.config_utils import load_sibling
from mgrpo_jax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_run_config(num_steps: int = 4, iterations: int = 2, eight_devices: bool = True):
  """configs/tiny_jpeg.py on the random 2-block tiny model: `num_steps` sampling and evaluation
  steps, one batch and one minibatch per iteration, `iterations` iterations with one evaluation
  and checkpoint at the end, 8 simulated devices as data 4 x tensor 2 (else the config's mesh).
  The tree stays tiny_jpeg's (x2 at steps 0 and 2) unless the caller changes it."""
  config = load_sibling(os.path.join(ROOT, "configs", "tiny_jpeg.py"), "tiny_jpeg").get_config()
  config.model = registry.default_tiny_model_config()
  config.sample.num_steps = config.sample.eval_num_steps = num_steps
  config.sample.batches_per_iteration = 1
  config.train.num_iterations = iterations
  config.train.num_minibatches = 1
  config.log.eval_every = config.log.checkpoint_every = iterations
  config.log.num_eval_prompts = 4
  config.log.progress = False
  if eight_devices:
    config.mesh.data, config.mesh.tensor = 4, 2
  return config
