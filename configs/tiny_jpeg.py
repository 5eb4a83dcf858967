r"""Tiny random model trained to make JPEG-compressible images: a reward it can actually move.

  mgrpo-train --config configs/tiny_jpeg.py --workdir /tmp/mgrpo_tiny_jpeg
  mgrpo-train --config configs/tiny_jpeg.py:flat --workdir /tmp/mgrpo_tiny_jpeg_flat

The OCR rewards of tiny_ocr_color.py stay at 0 on a random 64 px model, so that config checks
the plumbing, not learning. DDPO's JPEG compressibility responds to a LoRA on the tiny MMDiT
within a few dozen iterations on a CPU, which makes this the config for comparing rollout shapes
and advantage modes cheaply (bench/learning.py runs that comparison).
Variants: `flat` (Flow-GRPO: independent trajectories, same number of images per prompt),
`mixing` (tree, reward mixing instead of reward groups; with one reward they coincide).
"""

from mgrpo_jax.config_utils import apply_variants, load_sibling

tiny = load_sibling(__file__, "tiny_ocr_color")


def get_config(arg=None):
  config = tiny.get_config()
  config.reward.names = ("jpeg_compressibility",)
  config.reward.weights = (1.0,)
  # The tiny adapters need a larger step than SD3.5's 3e-4 to move in 40 iterations.
  config.train.learning_rate = 1e-2
  # No KL anchor: with beta 0.04 the 40-iteration run moves the reward a third as far.
  config.train.beta = 0.0
  config.train.num_iterations = 40
  # Flow-GRPO's SDE on the first 5 steps and its KL, the setting bench/learning.py's table was
  # measured in (tiny_ocr_color.py has since moved to exact-density CPS on every step).
  config.sample.method = "sde"
  config.sample.cps_logprob = "flow_grpo"
  config.sample.sde_window = (0, 5)
  config.train.kl_mode = "flow_grpo"
  config.log.eval_every = 20
  # Grids of 8 training prompts, as before the OCR default gained held-out evaluation.
  config.log.eval_at_start = False
  config.log.eval_dataset = ""
  config.log.num_eval_prompts = 8
  config.log.checkpoint_every = 20
  return apply_variants(config, arg, VARIANTS, "tiny_jpeg")


def _flat(config):
  config.tree.mode = "flat"
  config.tree.group_size = 4  # the tree's leaves per prompt


def _mixing(config):
  config.advantage.mode = "reward_mixing"


VARIANTS = {"flat": _flat, "mixing": _mixing}
