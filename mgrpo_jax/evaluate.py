r"""Evaluation of a run the way the paper reports it: `mgrpo-eval --config C --checkpoint W`.

W is the run's workdir (its latest checkpoint, or `--step N`). A workdir without a checkpoint is
refused (a mistyped path must not evaluate an untrained model as "iteration 0"); `--init`
evaluates the initial model instead (the base model: a baseline row).

Renders the prompts of the evaluation split with the deterministic sampler (ODE,
`sample.eval_num_steps` steps, the config's CFG), the noise of prompt i fixed by (seed, i), and
scores every configured reward. Writes to --out (default WORKDIR/eval_<iteration>):

  eval.json   per-prompt scores and the aggregates below
  eval.md     a Markdown table in the paper's layout
  grid_*.png  image grids with their prompts

Aggregates: the mean of every reward; for OCR-Color-10 prompts (metadata with a colour),
per colour and overall: OCR accuracy (mean `ocr` score), colour accuracy (fraction of images
whose text colour is the requested one, i.e. `text_color` == 1), both (mean of OCR score x
colour correct), and the mean of any other reward (e.g. a visual-quality score).
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import numpy as np

COLOR_COLUMNS = ("ocr_accuracy", "color_accuracy", "both")


def aggregate(scores: dict[str, np.ndarray], metadata: list[dict]) -> dict[str, Any]:
  """Benchmark numbers from per-image scores.

  Args:
    scores: reward name -> float [N].
    metadata: N prompt metadata dicts.

  Returns:
    {'overall': {name: value}, 'per_color': {color: {name: value}} (OCR-Color prompts only)}.
  """
  def summarise(index):
    out = {f"mean_{name}": float(np.mean(values[index])) for name, values in scores.items()}
    if "ocr" in scores:
      out["ocr_accuracy"] = float(np.mean(scores["ocr"][index]))
    if "text_color" in scores:
      correct = scores["text_color"][index] >= 1.0
      out["color_accuracy"] = float(np.mean(correct))
      if "ocr" in scores:
        out["both"] = float(np.mean(scores["ocr"][index] * correct))
    out["num_images"] = int(len(index))
    return out

  everything = np.arange(len(metadata))
  result = {"overall": summarise(everything)}
  colors = collections.defaultdict(list)
  for i, meta in enumerate(metadata):
    if meta.get("color"):
      colors[meta["color"]].append(i)
  if colors:
    result["per_color"] = {c: summarise(np.asarray(idx)) for c, idx in sorted(colors.items())}
  return result


def markdown(result: dict[str, Any], title: str) -> str:
  """The aggregates as a Markdown table (rows: colours + overall; columns: metrics)."""
  overall = result["overall"]
  columns = [c for c in COLOR_COLUMNS if c in overall]
  columns += sorted(k for k in overall if k.startswith("mean_") and k[5:] not in
                    ("ocr", "text_color"))
  rows = list(result.get("per_color", {}).items()) + [("overall", overall)]
  lines = [f"### {title}", "", "| | " + " | ".join(columns) + " | images |",
           "| --- |" + " --- |" * (len(columns) + 1)]
  for name, values in rows:
    lines.append(f"| {name} | " + " | ".join(f"{values[c]:.4f}" for c in columns) +
                 f" | {values['num_images']} |")
  return "\n".join(lines) + "\n"


def evaluate(trainer, records, out_dir: str, seed: int = 0, batch_size: int = 16,
             grid_size: int = 16) -> dict[str, Any]:
  """Renders and scores `records` with a built Trainer; writes the outputs to `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  prompts = [r.prompt for r in records]
  metadata = [dict(r.metadata) for r in records]
  images = []
  for start in range(0, len(prompts), batch_size):
    # One key per chunk of fixed size: a prompt's noise does not depend on the device count.
    images.append(trainer.render(prompts[start:start + batch_size], seed * 100003 + start))
  images = np.concatenate(images)
  scores = trainer.score_images(images, prompts, metadata)
  result = aggregate(scores, metadata)
  result.update({"iteration": int(trainer.start_iteration), "seed": seed,
                 "num_prompts": len(prompts), "eval_num_steps":
                 int(trainer.config.sample.eval_num_steps),
                 "per_prompt": [{"prompt": p, **{k: float(v[i]) for k, v in scores.items()}}
                                for i, p in enumerate(prompts)]})
  if trainer.is_primary:
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
      json.dump(result, f, indent=1)
    title = f"{trainer.config.data.dataset}, iteration {trainer.start_iteration}"
    with open(os.path.join(out_dir, "eval.md"), "w") as f:
      f.write(markdown(result, title))
    from mgrpo_jax import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
    for g, start in enumerate(range(0, min(len(images), 4 * grid_size), grid_size)):
      metrics_lib.make_grid(images[start:start + grid_size],
                            prompts[start:start + grid_size]).save(
                                os.path.join(out_dir, f"grid_{g}.png"))
  return result


def main(argv):
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  from mgrpo_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from mgrpo_jax import cli  # pylint: disable=import-outside-toplevel
  from mgrpo_jax import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    cli.fail("mgrpo-eval", f"unexpected arguments {argv[1:]}", cli.EXIT_USAGE)
  FLAGS = flags.FLAGS
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore phase at INFO
  workdir = FLAGS.checkpoint or FLAGS.workdir
  if not workdir:
    cli.fail("mgrpo-eval", "give --checkpoint (the run's workdir)", cli.EXIT_USAGE)
  steps = ckpt_lib.committed_steps(workdir)
  if not steps and not FLAGS.init:
    cli.fail("mgrpo-eval", f"{workdir} holds no checkpoint (nothing in {workdir}/checkpoints); "
             "check the path, or pass --init to evaluate the untrained model")
  if steps and FLAGS.init:
    cli.fail("mgrpo-eval", f"--init evaluates the untrained model, but {workdir} holds "
             f"checkpoints {steps}; drop --init (or use --step) to evaluate them",
             cli.EXIT_USAGE)
  config = FLAGS.config
  if FLAGS.split:
    config.data.split = FLAGS.split
  trainer = trainer_lib.Trainer(config, workdir, inference=True,
                                step=FLAGS.step if FLAGS.step >= 0 else None)
  try:
    records = trainer.records
    if FLAGS.num_prompts > 0:
      records = records[:FLAGS.num_prompts]
    out = FLAGS.out or os.path.join(workdir, f"eval_{trainer.start_iteration:06d}")
    result = evaluate(trainer, records, out, seed=FLAGS.seed, batch_size=FLAGS.batch_size)
  finally:
    trainer.close()
  print(markdown(result, f"{config.data.dataset}, iteration {result['iteration']}"))
  print(f"wrote {out}", flush=True)


def run():
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  from mgrpo_jax import cli  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "The run's config file.", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "The run's workdir (its latest checkpoint is "
                      "evaluated, or --step). One without checkpoints is refused unless --init.")
  flags.DEFINE_bool("init", False, "Evaluate the untrained model (a workdir with no checkpoint: "
                    "the baseline row).")
  flags.DEFINE_string("workdir", None, "Alias of --checkpoint.")
  flags.DEFINE_integer("step", -1, "Iteration of the checkpoint to evaluate (-1: latest).")
  flags.DEFINE_string("split", "test", "Dataset split to evaluate.")
  flags.DEFINE_integer("num_prompts", 0, "Evaluate the first N prompts (0 = all).")
  flags.DEFINE_integer("batch_size", 16, "Prompts rendered per call.")
  flags.DEFINE_integer("seed", 0, "Noise seed.")
  flags.DEFINE_string("out", None, "Output directory (default WORKDIR/eval_<iteration>).")
  flags.mark_flags_as_required(["config"])
  cli.run(main, "mgrpo-eval")


if __name__ == "__main__":
  run()
