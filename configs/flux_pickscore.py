r"""Multi-GRPO on FLUX.1-dev for PickScore-25k.

  mgrpo-train --config configs/flux_pickscore.py --workdir gs://BUCKET/runs/flux_pick \
      --config.model.path=/path/to/FLUX.1-dev \
      --config.reward.pickscore_path=/path/to/PickScore_v1

The SD3.5-M PickScore config with the model swapped for FLUX.1-dev and Flow-GRPO's FLUX
PickScore settings ([FG-FLUX]: `pickscore_flux` in Flow-GRPO's config/grpo.py). Fields not set
here (LoRA r=32 / alpha=64 on the attention projections, AdamW, clip range, advantage clip, the
tree shape marked [ours]) come from configs/sd35m_ocr_color.py; `:flat` gives the baseline.
"""

from mgrpo_jax.config_utils import load_sibling
from mgrpo_jax.models import registry

pick = load_sibling(__file__, "sd35m_pickscore")


def get_config(arg=None):
  config = pick.get_config(arg)
  # [FG-FLUX] FLUX.1-dev at 512 px in bf16; its embedded (distilled) guidance scale 3.5.
  config.model = registry.flux_model_config("")
  config.model.resolution = 512
  config.model.guidance = 3.5
  # [ours] as for SD3.5-M: rematerialise blocks (FLUX.1's 12B transformer needs it on any slice).
  config.model.remat = True
  # [FG-FLUX] 6 sampling steps for training, 28 for evaluation; SDE noise level 0.9.
  config.sample.num_steps = 6
  config.sample.eval_num_steps = 28
  config.sample.noise_level = 0.9
  # FLUX.1-dev samples without classifier-free guidance (one model call per step); the schedule
  # and its resolution-dependent shift come from the checkpoint's scheduler_config.json.
  config.sample.guidance_scale = 1.0
  # [FG-FLUX] no KL term, per-prompt statistics tracking, EMA of the trained weights.
  config.train.beta = 0.0
  config.advantage.per_prompt_history = True
  return config
