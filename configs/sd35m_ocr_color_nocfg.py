r"""Multi-GRPO on SD3.5-Medium for OCR-Color-10 without classifier-free guidance (Flow-GRPO-Fast).

  mgrpo-train --config configs/sd35m_ocr_color_nocfg.py --workdir gs://BUCKET/runs/sd35m_ocr_nocfg \
      --config.model.path=/path/to/stable-diffusion-3.5-medium \
      --config.data.dataset=/path/to/ocr_color_train.csv

Flow-GRPO ships no CFG-free text-rendering config; this applies the settings its `*_fast_nocfg`
configs share ([FG] config/grpo.py `geneval_sd3_fast_nocfg` and `pickscore_sd3_fast_nocfg`: no
CFG, CPS with noise level 0.8, a 3-step SDE window in [0, 5), clip range 1e-5, beta 0, global std)
to configs/sd35m_ocr_color.py. The group size and prompts per epoch stay OCR-Color's 24 and 48,
which are also `geneval_sd3_fast_nocfg`'s. The tree uses the fixed window [1, 4) holding its branch
steps (1, 3); the `flat` variant places the window at random as the source does.

Variants: those of configs/sd35m_ocr_color.py (`flat`, `mixing`, `pickscore`, `aesthetic`).
"""

from mgrpo_jax.config_utils import apply_variants, load_sibling

ocr = load_sibling(__file__, "sd35m_ocr_color")
pick_nocfg = load_sibling(__file__, "sd35m_pickscore_nocfg")


def get_config(arg=None):
  config = ocr.get_config()
  pick_nocfg.apply_nocfg(config)
  return apply_variants(config, arg, VARIANTS, "sd35m_ocr_color_nocfg")


def _flat(config):
  """The Flow-GRPO-Fast baseline: independent trajectories, SDE window placed at random."""
  pick_nocfg.flat_random_window(config)


VARIANTS = dict(ocr.VARIANTS, flat=_flat)
