r"""Multi-GRPO with GRPO-Guard on SD3.5-Medium for OCR-Color-10 (text rendering).

  mgrpo-train --config configs/sd35m_ocr_color_guard.py --workdir gs://BUCKET/runs/sd35m_ocr_guard \
      --config.model.path=/path/to/stable-diffusion-3.5-medium \
      --config.data.dataset=/path/to/ocr_color_train.csv

GRPO-Guard (arXiv 2510.22319) normalises the importance ratio per denoising step (RatioNorm) and
reweights each step's policy loss by 1 / -dt; see mgrpo_jax/losses.py for the formulas and for
where this library's RatioNorm differs from the source (the per-step shift is estimated from the
minibatch instead of from stored sampling means). Everything not set here is
configs/sd35m_ocr_color.py.

Fields cite their source: [GG] Flow-GRPO's GRPO-Guard text-rendering run, config/grpo_guard.py
`general_ocr_sd3_rationorm` (run by scripts/multi_node/sd3_grpo_guard.sh with
scripts/train_sd3_GRPO_Guard.py); [ours] a choice of this library. The source trains on OCR
accuracy alone (with PickScore logged at weight 0); here the reward groups stay OCR-Color's text
accuracy and colour. It trains in fp16; this library in bf16.
Variants: those of configs/sd35m_ocr_color.py (`flat`, `mixing`, `pickscore`, `aesthetic`).
"""

from mgrpo_jax.config_utils import apply_variants, load_sibling

ocr = load_sibling(__file__, "sd35m_ocr_color")


def get_config(arg=None):
  config = ocr.get_config()
  # [GG] `rationorm = True`: RatioNorm and the 1 / -dt policy-loss weight both come with it.
  config.train.ratio_norm = True
  config.train.step_reweight = "inv_dt"
  # [GG] symmetric PPO clip 2e-6 (`clip_range = highclip_range = 2e-6`) on the normalised
  # ratio, learning rate 1e-4, no KL term (`beta = 0.0`).
  config.train.clip_range = 2e-6
  config.train.learning_rate = 1e-4
  config.train.beta = 0.0
  # [GG] advantages divided by each prompt group's own std (`global_std = False`), in the tree
  # and in the flat baseline.
  config.advantage.std = "group"
  # [GG] unchanged from the Flow-GRPO OCR run: 10 steps, CFG 4.5, noise level 0.7, 24 images
  # per prompt, 48 prompts per epoch, two updates per epoch, EMA, the last step not trained.
  return apply_variants(config, arg, VARIANTS, "sd35m_ocr_color_guard")


VARIANTS = dict(ocr.VARIANTS)
