r"""The CPU main job: the pretrained tiny text renderer learns OCR-Color with Multi-GRPO.

  mgrpo-train --config configs/tiny_ocr_color.py --workdir /tmp/mgrpo_tiny
  mgrpo-eval --config configs/tiny_ocr_color.py --checkpoint /tmp/mgrpo_tiny \
      --config.data.dataset=mgrpo_jax/assets/synthetic_ocr_color/heldout.csv
  mgrpo-train --config configs/tiny_ocr_color.py:runlocal --workdir /tmp/mgrpo_tiny_small

Generator: `tiny_text` (models/tiny_pixel.py), the SD3 MMDiT on 32x32 pixels pretrained for 5,000
steps on synthetic words (`python -m mgrpo_jax.pretrain`), weights shipped in the package. It
already draws most words in roughly the right colour, but misspells many and mixes colours
(held-out OCR reward ~0.3, text-colour reward ~0.6), so both rewards have room to rise.

Prompts: `mgrpo_jax/assets/synthetic_ocr_color/train.csv` (1,840 OCR-Color-10 style prompts,
'... reads "WORD". The color of the text "WORD" is red.', written deterministically by
`python -m mgrpo_jax.data.synthetic_text`); evaluate on `heldout.csv` (40 (word, colour) pairs
never seen in pretraining or here). Rewards: `ocr` and `text_color`, weight 1 each.

Variant `runlocal`: the random tiny model (`tiny`, 2 blocks) on the same prompts with fewer
steps: a smoke run for tests, not a learning run.
"""

from mgrpo_jax.config_utils import apply_variants, load_sibling
from mgrpo_jax.data import synthetic_text
from mgrpo_jax.models import registry

base = load_sibling(__file__, "base")


def get_config(arg=None):
  config = base.get_config()
  # The pretrained pixel-space text renderer shipped with the package.
  config.model = registry.tiny_text_model_config()
  # Synthetic OCR-Color-10 style training prompts shipped with the package (a path, so nothing
  # needs $MGRPO_DATASETS); held-out prompts for mgrpo-eval are beside it.
  config.data.dataset = synthetic_text.prompt_csv("train")
  config.data.split = "train"
  config.data.prompts_per_batch = 4
  # Two reward groups: text accuracy and text colour.
  config.reward.names = ("ocr", "text_color")
  config.reward.weights = (1.0, 1.0)
  # Tree: one root, x2 at step 0 and x2 at step 2 -> 4 leaves per prompt.
  config.tree.mode = "tree"
  config.tree.num_roots = 1
  config.tree.branch_steps = (0, 2)
  config.tree.branch_factors = (2, 2)
  # 10 steps with CFG 4.5 and shift 3: the setting the base model's held-out rewards are quoted
  # at (`python -m mgrpo_jax.pretrain --eval`).
  config.sample.num_steps = 10
  config.sample.eval_num_steps = 10
  config.sample.guidance_scale = 4.5
  # Train on the first 5 steps only (where the word and its colour are decided); halves the
  # train step's cost.
  config.sample.sde_window = (0, 5)
  config.sample.batches_per_iteration = 2
  # 12 iterations: 4.7 to 8.6 minutes of wall time on the 2-core development machine with other
  # test jobs beside it (bench/main_job.py; README "The CPU main job").
  config.train.num_iterations = 12
  config.train.num_minibatches = 2
  config.train.learning_rate = 1e-3
  config.train.clip_range = 0.2
  # Evaluation before training, every 4 iterations and at the end, on all 40 held-out prompts
  # (never seen in pretraining or here): eval/ocr and eval/text_color in metrics.jsonl, grids
  # in images/, both drawn in reward_curves.png.
  config.log.eval_every = 4
  config.log.eval_at_start = True
  config.log.eval_dataset = synthetic_text.prompt_csv("heldout")
  config.log.num_eval_prompts = 40
  config.log.checkpoint_every = 12
  return apply_variants(config, arg, VARIANTS, "tiny_ocr_color")


def _runlocal(config):
  """The random tiny model (2 blocks) on the same prompts, a few steps: a smoke run for tests."""
  config.model = registry.default_tiny_model_config()
  config.sample.num_steps = 4
  config.sample.eval_num_steps = 4
  config.sample.sde_window = (-1, -1)
  config.tree.branch_steps = (0, 1)
  config.sample.batches_per_iteration = 1
  config.train.num_iterations = 2
  config.train.num_minibatches = 1
  config.log.eval_every = 1
  config.log.eval_at_start = False
  config.log.eval_dataset = ""
  config.log.num_eval_prompts = 4
  config.log.checkpoint_every = 1


VARIANTS = {"runlocal": _runlocal}
