r"""Renders images from a training run: `mgrpo-sample --config C --workdir W --prompt "..."`.

Loads the run's latest checkpoint from W (the same config it was trained with; a workdir
without a checkpoint is refused unless `--init` asks for the untrained model), samples each
prompt with the deterministic ODE sampler (`sample.eval_num_steps` steps, the config's CFG scale)
and writes one PNG per image plus a captioned grid to --out (default W/samples). Prompts come from
repeated --prompt flags and/or --prompts_file (one per line); with neither, the dataset's first
`log.num_eval_prompts` prompts.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from mgrpo_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (checkpoints).")
_PROMPTS = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "File with one prompt per line.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default WORKDIR/samples).")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_IMAGES_PER_PROMPT = flags.DEFINE_integer("images_per_prompt", 1, "Images per prompt.")
_INIT = flags.DEFINE_bool("init", False, "Sample the untrained model (a workdir with no "
                          "checkpoint).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from mgrpo_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from mgrpo_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from mgrpo_jax.data import prompts as prompts_lib  # pylint: disable=g-import-not-at-top

  from mgrpo_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore phase at INFO

  workdir = _WORKDIR.value
  steps = ckpt_lib.committed_steps(workdir)
  if not steps and not _INIT.value:
    cli.fail("mgrpo-sample", f"{workdir} holds no checkpoint (nothing in {workdir}/checkpoints); "
             "train first, check the --workdir path, or pass --init to sample the untrained "
             "model")
  if steps and _INIT.value:
    cli.fail("mgrpo-sample", f"--init samples the untrained model, but {workdir} holds "
             f"checkpoints {steps}; drop --init to sample them", cli.EXIT_USAGE)
  config = _CONFIG.value
  prompts = list(_PROMPTS.value)
  if _PROMPTS_FILE.value:
    prompts += [r.prompt for r in prompts_lib.load_prompt_lines(_PROMPTS_FILE.value)]
  if not prompts:  # the dataset's first prompts, read as the trainer reads them
    records, _ = prompts_lib.load_dataset(config.data.dataset, config.data.split,
                                          tfds_data_dir=config.data.get("tfds_data_dir", ""))
    prompts = [r.prompt for r in records[:config.log.num_eval_prompts]]
  repeated = [p for p in prompts for _ in range(_IMAGES_PER_PROMPT.value)]
  # The trainer's evaluation path without its optimizer state (mgrpo_jax/pipeline.py).
  pipe = pipeline_lib.load_pipeline(config, lora=workdir if steps else None)
  images = pipe(repeated, seed=_SEED.value, output_type="np")
  out = _OUT.value or os.path.join(workdir, "samples")
  os.makedirs(out, exist_ok=True)
  for i, image in enumerate(images):
    Image.fromarray(image).save(os.path.join(out, f"{i:04d}.png"))
  metrics_lib.make_grid(images, repeated).save(os.path.join(out, "grid.png"))
  print(f"wrote {len(images)} images from iteration {pipe.iteration or 0} to {out}",
        flush=True)


def run():
  cli.run(main, "mgrpo-sample")


if __name__ == "__main__":
  run()
