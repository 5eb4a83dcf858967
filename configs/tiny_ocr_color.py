r"""The CPU main job: the pretrained tiny text renderer learns OCR-Color with Multi-GRPO.

  mgrpo-train --config configs/tiny_ocr_color.py --workdir /tmp/mgrpo_tiny
  mgrpo-eval --config configs/tiny_ocr_color.py --checkpoint /tmp/mgrpo_tiny \
      --config.data.dataset=mgrpo_jax/assets/synthetic_ocr_color/heldout.csv
  mgrpo-train --config configs/tiny_ocr_color.py:runlocal --workdir /tmp/mgrpo_tiny_small

Generator: `tiny_text` (models/tiny_pixel.py), the SD3 MMDiT on 32x32 pixels pretrained for 2,500
steps on synthetic words with the glyph-weighted loss (`python -m mgrpo_jax.pretrain`, command in
the weights' config.json), weights shipped in the package. It already draws most words in
roughly the right colour, but misspells many and mixes colours (held-out OCR reward ~0.3,
text-colour reward ~0.65), so both rewards have room to rise.

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
  # Coefficients-preserving steps (CPS) on every step but the last, all of them trained, scored
  # as Gaussian densities with the exact KL (README, "The CPU main job", has the runs behind
  # each choice). Flow-GRPO's SDE (a = 0.7, 10 steps) leaves its noise in the final pixels of
  # this model: its training images score far below the model's ODE samples (first iteration's
  # OCR 0.15 against 0.47 for the same prompts), and held-out rewards fall. A window of early
  # steps only (SDE on steps 0-4, ODE after) lets the LoRA, which every step shares, drift at the
  # untrained late steps: after 12 iterations the held-out ODE samples carry visible noise.
  # CPS with Flow-GRPO's score -(x - mean)^2 makes the policy loss (~1e-5) tiny beside the KL
  # term (KL 0.09-1.3 at beta 0.04), which then pins the model to the reference; the exact
  # densities put both in the same units.
  config.sample.method = "cps"
  config.sample.cps_logprob = "exact"
  config.sample.sde_window = (-1, -1)
  config.train.kl_mode = "exact"
  config.sample.batches_per_iteration = 2
  # 12 iterations: 313 s of wall time on the 2-core development machine with nothing else
  # running (bench/main_job.py; README "The CPU main job").
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
  # Flow-GRPO's SDE, score and KL, as before the main job moved to exact-density CPS: the tests
  # built on this variant were written against them (tests/test_train.py runs the main job's
  # CPS settings on this model too).
  config.sample.method = "sde"
  config.sample.cps_logprob = "flow_grpo"
  config.train.kl_mode = "flow_grpo"
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
