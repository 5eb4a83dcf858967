r"""Evaluation of a run the way the paper reports it: `mgrpo-eval --config C --checkpoint W`.

W is the run's workdir (its latest checkpoint, or `--step N`). A workdir without a checkpoint is
refused (a mistyped path must not evaluate an untrained model as "iteration 0"); `--init`
evaluates the initial model instead (the base model: a baseline row). The model is loaded with
`load_pipeline` (no optimizer state, no training loader), so the prompts can be any dataset or
prompt file: `--config.data.dataset=heldout.csv` evaluates a run on prompts it never saw.

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


def evaluate(pipe, scorer, records, out_dir: str, seed: int = 0, batch_size: int = 16,
             grid_size: int = 16, title: str = "") -> dict[str, Any]:
  """Renders and scores `records`; writes the outputs to `out_dir` (process 0).

  Args:
    pipe: a `pipeline.Pipeline` (the model and adapters to evaluate).
    scorer: a `rewards.scorer.RewardScorer` of the rewards to report.
    records: the prompt records (their metadata feeds the OCR and colour rewards).
    out_dir: output directory.
    seed: noise seed; chunk c of `batch_size` prompts uses seed * 100003 + c * batch_size, so
      a prompt's noise depends neither on the device count nor on the other chunks.
    batch_size: prompts rendered per call.
    grid_size: images per grid file (at most 4 grids).
    title: the heading of eval.md.
  """
  os.makedirs(out_dir, exist_ok=True)
  prompts = [r.prompt for r in records]
  metadata = [dict(r.metadata) for r in records]
  images = np.concatenate([
      pipe(prompts[start:start + batch_size], seed=seed * 100003 + start, output_type="np")
      for start in range(0, len(prompts), batch_size)])
  scores = scorer.score(images, prompts, metadata)
  result = aggregate(scores, metadata)
  iteration = int(pipe.iteration or 0)
  result.update({"iteration": iteration, "seed": seed, "num_prompts": len(prompts),
                 "eval_num_steps": int(pipe.config.sample.eval_num_steps),
                 "per_prompt": [{"prompt": p, **{k: float(v[i]) for k, v in scores.items()}}
                                for i, p in enumerate(prompts)]})
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
      json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "eval.md"), "w") as f:
      f.write(markdown(result, title or f"iteration {iteration}"))
    from mgrpo_jax import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
    for g, start in enumerate(range(0, min(len(images), 4 * grid_size), grid_size)):
      metrics_lib.make_grid(images[start:start + grid_size],
                            prompts[start:start + grid_size]).save(
                                os.path.join(out_dir, f"grid_{g}.png"))
  return result


def evaluate_checkpoint(config, workdir: str | None, records, out_dir: str, *,
                        step: int | None = None, seed: int = 0, batch_size: int = 16,
                        title: str = "") -> dict[str, Any]:
  """Evaluates `workdir`'s checkpoint (`step`, default the latest) or, with workdir None, the
  initial model of `config` (its `lora.init_from` adapters if set), on `records`."""
  from mgrpo_jax import pipeline as pipeline_lib  # pylint: disable=import-outside-toplevel
  from mgrpo_jax.rewards import scorer as scorer_lib  # pylint: disable=import-outside-toplevel
  lora = workdir if workdir is not None else (config.lora.init_from or None)
  pipe = pipeline_lib.load_pipeline(config, lora=lora, step=step)
  scorer = scorer_lib.RewardScorer(config.reward, pipe.mesh)
  try:
    return evaluate(pipe, scorer, records, out_dir, seed=seed, batch_size=batch_size,
                    title=title)
  finally:
    scorer.close()


def main(argv):
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  from mgrpo_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from mgrpo_jax import cli  # pylint: disable=import-outside-toplevel
  from mgrpo_jax.data import prompts as prompts_lib  # pylint: disable=import-outside-toplevel
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
  step = FLAGS.step if FLAGS.step >= 0 else None
  if step is not None and step not in steps:
    cli.fail("mgrpo-eval", f"{workdir} has no checkpoint of iteration {step}; it has {steps}",
             cli.EXIT_USAGE)
  config = FLAGS.config
  if FLAGS.split:
    config.data.split = FLAGS.split
  # The prompts come from the config (any dataset or prompt file), not from the run: a run
  # trained on one prompt file can be evaluated on another.
  records, _ = prompts_lib.load_dataset(config.data.dataset, config.data.split,
                                        config.reward.names, config.data.tfds_data_dir)
  if FLAGS.num_prompts > 0:
    records = records[:FLAGS.num_prompts]
  iteration = 0 if FLAGS.init else (step if step is not None else max(steps))
  out = FLAGS.out or os.path.join(workdir, f"eval_{iteration:06d}")
  title = f"{config.data.dataset}, iteration {iteration}"
  result = evaluate_checkpoint(config, None if FLAGS.init else workdir, records, out, step=step,
                               seed=FLAGS.seed, batch_size=FLAGS.batch_size, title=title)
  print(markdown(result, title))
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
