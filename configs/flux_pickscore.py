r"""Multi-GRPO on FLUX.1-dev for PickScore-25k.

  mgrpo-train --config configs/flux_pickscore.py --workdir gs://BUCKET/runs/flux_pick \
      --config.model.path=/path/to/FLUX.1-dev \
      --config.reward.pickscore_path=/path/to/PickScore_v1

The SD3.5-M PickScore config with the model swapped for FLUX.1-dev and Flow-GRPO's FLUX
PickScore settings ([FG-FLUX]: `pickscore_flux` in Flow-GRPO's config/grpo.py and its
scripts/train_flux.py). Fields not set here (AdamW, advantage clip, two optimizer updates per
iteration, EMA with warm-up, the tree shape marked [ours]) come from configs/sd35m_ocr_color.py.
Variant: `flat` (the Flow-GRPO baseline).
"""

from mgrpo_jax.config_utils import apply_variants, load_sibling
from mgrpo_jax.models import registry

pick = load_sibling(__file__, "sd35m_pickscore")


def get_config(arg=None):
  config = pick.get_config()
  # [FG-FLUX] FLUX.1-dev at 512 px in bf16 (`mixed_precision = "bf16"`); its embedded (distilled)
  # guidance scale 3.5.
  config.model = registry.flux_model_config("")
  config.model.resolution = 512
  config.model.guidance = 3.5
  # [ours] as for SD3.5-M: rematerialise blocks (FLUX.1's 12B transformer needs it on any slice).
  config.model.remat = True
  # [FG-FLUX] LoRA r=64, alpha=128 on the attention projections of both streams and the
  # feed-forward layers of the double-stream blocks (train_flux.py: target_modules include
  # ff.net.0.proj / ff.net.2 / ff_context.*, here named ff.proj_in / ff.proj_out).
  config.lora.rank = 64
  config.lora.alpha = 128.0
  config.lora.targets = (
      r"attn\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",
      r"(ff|ff_context)\.(proj_in|proj_out)$")
  # [FG-FLUX] 6 sampling steps for training (the last not trained: timestep_fraction 0.99), 28
  # for evaluation; SDE noise level 0.9.
  config.sample.num_steps = 6
  config.sample.eval_num_steps = 28
  config.sample.noise_level = 0.9
  # FLUX.1-dev samples without classifier-free guidance (one model call per step); the schedule
  # and its resolution-dependent shift come from the checkpoint's scheduler_config.json.
  config.sample.guidance_scale = 1.0
  # [FG-FLUX] no KL term. Per-prompt statistics: Flow-GRPO's tracker is cleared every epoch, so
  # its groups are this iteration's images of each prompt -- our leaf groups; the std is that of
  # all samples (`global_std = True`) in the flat baseline, per temporal group in tree mode.
  config.train.beta = 0.0
  config.advantage.per_prompt_history = False
  return apply_variants(config, arg, VARIANTS, "flux_pickscore")


VARIANTS = dict(pick.VARIANTS)
