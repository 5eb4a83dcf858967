r"""Multi-GRPO on SD3.5-Medium for PickScore-25k (a single reward: temporal groups only).

  mgrpo-train --config configs/sd35m_pickscore.py --workdir gs://BUCKET/runs/sd35m_pick \
      --config.model.path=/path/to/stable-diffusion-3.5-medium \
      --config.reward.pickscore_path=/path/to/PickScore_v1

PickScore runs on the device (mgrpo_jax/rewards/device.py); its directory is the
`yuvalkirstain/PickScore_v1` CLIPModel with the tokenizer files of
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K` copied beside it. Everything else is the OCR-Color-10
config with Flow-GRPO's PickScore changes ([FG]: config/grpo.py `pickscore_sd3`).
Variant: `flat` (the Flow-GRPO baseline). With one reward, reward mixing and reward groups
coincide, so there is no `mixing` variant.
"""

from mgrpo_jax.config_utils import apply_variants, load_sibling

ocr = load_sibling(__file__, "sd35m_ocr_color")


def get_config(arg=None):
  config = ocr.get_config()
  # [FG] PickScore-25k train split (one prompt per line).
  config.data.dataset = "pickscore_25k"
  config.data.split = "train"
  config.log.eval_dataset = "pickscore_25k"  # its test split (set by sd35m_ocr_color)
  config.reward.names = ("pickscore",)
  config.reward.weights = (1.0,)
  # [FG] KL beta 0.01 for PickScore.
  config.train.beta = 0.01
  return apply_variants(config, arg, VARIANTS, "sd35m_pickscore")


VARIANTS = {"flat": ocr.VARIANTS["flat"]}
