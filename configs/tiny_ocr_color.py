r"""Tiny random SD3-style model on OCR-Color-10 prompts: the CPU default and smoke test.

  mgrpo-train --config configs/tiny_ocr_color.py --workdir /tmp/mgrpo_tiny
  mgrpo-train --config configs/tiny_ocr_color.py:runlocal --workdir /tmp/mgrpo_tiny_small

A random 64 px model renders no legible text, so the OCR and colour rewards start at 0 for every
image; DDPO's JPEG compressibility (weight 0.1) gives the smoke run a reward with variance, so
the whole Multi-GRPO path (tree rollouts, three reward groups, temporal groups) is exercised.
Variant `runlocal` shrinks everything further for tests.
"""

from mgrpo_jax.config_utils import load_sibling

base = load_sibling(__file__, "base")


def get_config(arg=None):
  config = base.get_config()
  # OCR-Color-10 publishes only its test split; it doubles as training prompts for the demo.
  config.data.dataset = "ocr_color_10"
  config.data.split = "test"
  config.data.prompts_per_batch = 4
  # Three reward groups: text accuracy, text colour, and a weight-free image statistic.
  config.reward.names = ("ocr", "text_color", "jpeg_compressibility")
  config.reward.weights = (1.0, 1.0, 0.1)
  # Tree: one root, x2 at step 0 and x2 at step 2 -> 4 leaves per prompt.
  config.tree.mode = "tree"
  config.tree.num_roots = 1
  config.tree.branch_steps = (0, 2)
  config.tree.branch_factors = (2, 2)
  config.sample.num_steps = 6
  config.sample.eval_num_steps = 6
  config.sample.batches_per_iteration = 2
  config.train.num_iterations = 6
  config.train.num_minibatches = 2
  config.train.learning_rate = 1e-3
  config.train.clip_range = 0.2
  config.log.eval_every = 3
  if arg == "runlocal":
    config.sample.num_steps = 4
    config.sample.eval_num_steps = 4
    config.tree.branch_steps = (0, 1)
    config.sample.batches_per_iteration = 1
    config.train.num_iterations = 2
    config.train.num_minibatches = 1
    config.log.eval_every = 1
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of tiny_ocr_color; expected 'runlocal' or none")
  return config
