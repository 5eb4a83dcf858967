r"""Multi-GRPO on SD3.5-Medium for PickScore-25k without classifier-free guidance (Flow-GRPO-Fast).

  mgrpo-train --config configs/sd35m_pickscore_nocfg.py --workdir gs://BUCKET/runs/sd35m_pick_nocfg \
      --config.model.path=/path/to/stable-diffusion-3.5-medium \
      --config.reward.pickscore_path=/path/to/PickScore_v1
  mgrpo-train --plan --plan_devices=8 --config configs/sd35m_pickscore_nocfg.py   # shapes only

Flow-GRPO's recommended fast setting: no CFG in sampling, training or evaluation (one model call
per step instead of two), coefficients-preserving sampling (CPS) with a higher noise level, and
only a short window of SDE steps early in the trajectory (the rest ODE, only window steps
trained). Everything else is configs/sd35m_pickscore.py.

Fields cite their source: [FG] Flow-GRPO's config/grpo.py `pickscore_sd3_fast_nocfg`;
[ours] a choice of this library. Variant: `flat` (the Flow-GRPO-Fast baseline: 18 independent
trajectories, the 3-step window placed at random in [0, 5) every iteration).
"""

from mgrpo_jax.config_utils import apply_variants, load_sibling

pick = load_sibling(__file__, "sd35m_pickscore")


def get_config(arg=None):
  config = pick.get_config()
  apply_nocfg(config)
  # [FG] 18 images per prompt (`num_image_per_prompt = 18`) and 64 prompts per epoch
  # (32 GPUs x 9 images x 4 batches / 18). [ours] as a tree: 3 roots, x2 at step 1, x3 at
  # step 3 (3 * 2 * 3 = 18 leaves), both branch steps inside the SDE window.
  config.tree.num_roots = 3
  config.tree.branch_steps = (1, 3)
  config.tree.branch_factors = (2, 3)
  config.tree.group_size = 18  # the flat baseline (`:flat`)
  config.data.prompts_per_batch = 16
  config.sample.batches_per_iteration = 4
  # [FG] two optimizer updates per epoch (`gradient_accumulation_steps = num_batches // 2`):
  # 4 batches x 4 minibatches = 16 minibatches, accumulated 8 at a time.
  config.train.num_minibatches = 4
  config.train.grad_accum_steps = 8
  return apply_variants(config, arg, VARIANTS, "sd35m_pickscore_nocfg")


def apply_nocfg(config):
  """Flow-GRPO's `*_fast_nocfg` sampling and loss settings (shared with the OCR-Color config)."""
  # [FG] `guidance_scale = 1`, `eval_guidance_scale = 1`, `train.cfg = False`: this library
  # trains and evaluates with `sample.guidance_scale`, so 1.0 turns CFG off everywhere.
  config.sample.guidance_scale = 1.0
  # [FG] `sde_type = "cps"` with `noise_level = 0.8`; Flow-GRPO's CPS log-prob is the negative
  # mean squared error without constants (our `cps_logprob = "flow_grpo"`).
  config.sample.method = "cps"
  config.sample.noise_level = 0.8
  config.sample.cps_logprob = "flow_grpo"
  # [FG] `sde_window_size = 3` inside `sde_window_range = (0, num_steps // 2)`, placed at random
  # each epoch: the `flat` variant does exactly that (`sde_window_mode = "random"`). [ours] the
  # tree keeps the fixed window [1, 4) (the middle of the three placements in [0, 5)): its
  # branch steps must lie inside every position of a moving window, and the three positions
  # share only step 2.
  config.sample.sde_window = (1, 4)
  config.sample.sde_window_size = 3
  config.sample.sde_window_range = (0, config.sample.num_steps // 2)
  # [FG] PPO clip range 1e-5, no KL term (`beta = 0`), advantages divided by the std of all
  # samples (`global_std = True`).
  config.train.clip_range = 1e-5
  config.train.beta = 0.0
  config.advantage.std = "global"


def flat_random_window(config):
  """The Flow-GRPO-Fast baseline: independent trajectories, SDE window placed at random."""
  config.tree.mode = "flat"
  config.sample.sde_window_mode = "random"


VARIANTS = {"flat": flat_random_window}
