r"""Issue 13's study at toy scale: Multi-GRPO against Flow-GRPO and its two ablations, with seeds.

  python bench/study.py                              # the full study (3 seeds, testbeds 1-3)
  python bench/study.py --quick --out /tmp/study     # 1 seed, 2 iterations, smallest shapes
  python bench/study.py --testbeds 1 2 --seeds 0 1 2 --out bench/results/study

Methods (same optimizer settings, same model evaluations (NFE) per prompt and iteration):
  flow_grpo           flat groups (independent trajectories)   + reward mixing
  tree_only           temporal groups (rollout tree)           + reward mixing
  reward_groups_only  flat groups                              + reward groups
  multi_grpo          temporal groups                          + reward groups
The tree is one root, x2 at step 1 and x2 at step 3 (4 leaves): 30 model evaluations per prompt
at 10 steps, as many as 3 independent trajectories, so the flat methods sample 3 images per
prompt (`flat_group_size`; the NFE of every run is read back from its metrics.jsonl and shown
in the tables). The temporal-group std is each method's own default (`advantage.std = "auto"`:
per group for trees, Flow-GRPO's global std when flat).

Testbeds:
  1  Mismatched scales: configs/tiny_jpeg.py with the rewards `jpeg_incompressibility` (JPEG size
     in kB) and `blueness` (on [-1, 1]). Their stds and correlation at initialisation are measured
     on iteration 1's samples of each seed; each reward's gain is reported per method.
  2  Credit assignment: one wide tree per seed (x4 at step 1, x8 at step 3) on testbed 1's
     setup. Each method's advantages of the four step-1 nodes are computed (by
     `advantages.compute_advantages`) from a subset of the leaves: 2 of the 8 below each node
     for the tree methods (a tree with factors (4, 2)), the first 1 for the flat methods (4
     independent trajectories); the other 6 leaves of each node estimate its value (Monte
     Carlo). Reported: correlation between the advantages and the held-out values (per reward,
     centred per prompt, and their sum in units of each reward's std) and the variance of the
     early advantages. Its learning curves at equal NFE are testbed 1's runs (same setup).
  3  OCR-Color: configs/tiny_ocr_color.py (pretrained tiny text renderer, rewards ocr and
     text_color). After training, the 40 held-out prompts are rendered and scored with
     `mgrpo_jax.evaluate` (OCR accuracy, colour accuracy, "both"); the initial model is
     evaluated once the same way.
  4  Ablations of Multi-GRPO on testbed 1's setup: a late-branching tree (x2 at the last two
     steps of the SDE window, same 4 leaves) and Flow-GRPO's global std instead of the
     per-group std; testbed 1's multi_grpo runs are the reference row.

Outputs (resumable: a run whose JSON exists is skipped and its result kept):
  <out>/<testbed>/<method>/seed<k>.json   one run: settings, NFE, curves, gains, wall time
                                          (this invocation's, and train_time_s: the sum of
                                          the logged iteration and evaluation times)
  <out>/1/init/seed<k>.json               testbed 1's reward stds and correlation at init
  <out>/3/init.json                       testbed 3's held-out numbers of the initial model
  <out>/study.md                          one Markdown table per testbed (mean ± std over seeds)
  <out>/testbed<t>_curves.png             rewards against cumulative NFE, mean ± std over seeds
Training workdirs go under --workdir-root (outside the repository) and are deleted once their
run's JSON is written; a run killed midway resumes from its workdir's checkpoint (halfway or
end). Runs with the same rollout shape share compiled functions through a persistent JAX
compilation cache (--compilation-cache).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python bench/study.py` from anywhere
  sys.path.insert(0, ROOT)

from mgrpo_jax import advantages as adv_lib  # noqa: E402
from mgrpo_jax import metrics as metrics_lib  # noqa: E402
from mgrpo_jax import trainer as trainer_lib  # noqa: E402
from mgrpo_jax.config_utils import load_sibling  # noqa: E402
from mgrpo_jax.sampling import tree as tree_lib  # noqa: E402

# method -> (tree.mode, advantage.mode)
METHODS = {
    "flow_grpo": ("flat", "reward_mixing"),
    "tree_only": ("tree", "reward_mixing"),
    "reward_groups_only": ("flat", "reward_groups"),
    "multi_grpo": ("tree", "reward_groups"),
}
TESTBEDS = (1, 2, 3, 4)
TESTBED_TITLES = {1: "Testbed 1: mismatched scales (JPEG kB vs blueness)",
                  2: "Testbed 2: credit assignment of early transitions",
                  3: "Testbed 3: OCR-Color on the pretrained tiny text renderer",
                  4: "Ablations of Multi-GRPO on testbed 1: tree shapes and temporal-group std"}
# Testbed 4: Multi-GRPO on testbed 1's setup with one change each. Testbed 1's multi_grpo runs
# (early x2@1 x2@3, per-group std) are the reference row.
ABLATIONS = {
    # The same 4 leaves, branching at the last two steps of the SDE window (x2 at stop - 2,
    # x2 at stop - 1; steps 3 and 4 of the full study's window (0, 5)): the steps before them
    # belong to a single root, whose level has no group to normalise against.
    "late_tree": lambda config: setattr(config.tree, "branch_steps", (
        config.sample.sde_window[1] - 2, config.sample.sde_window[1] - 1)),
    # The method figure's shape: x2 at step 1, then x3 at step 3 (6 leaves; NFE 42 per prompt
    # instead of 30 at the full study's 10 steps, so compare it against NFE, not iterations).
    "x2x3_tree": lambda config: setattr(config.tree, "branch_factors", (2, 3)),
    # Flow-GRPO's global std (per level over the batch) instead of the paper's per-group std.
    "global_std": lambda config: setattr(config.advantage, "std", "global"),
}
ABLATION_REFERENCE = "multi_grpo (testbed 1: early tree, group std)"
SCALE_REWARDS = ("jpeg_incompressibility", "blueness")

# Run lengths of the full study. One sampling batch (4 prompts) per iteration keeps the 27
# runs within ~2 hours on this 2-core machine: with tiny_jpeg's 2 batches a testbed-1 iteration
# took ~18 s under load (train 13 s, sampling 4 s), i.e. 7 minutes per 24-iteration run.
FULL = {"iterations_1": 24, "iterations_3": 8, "eval_every_3": 4, "batches_per_iteration": 1,
        "credit_batches": 4, "credit_factors": (4, 8)}
QUICK = {"iterations_1": 2, "iterations_3": 2, "eval_every_3": 2, "batches_per_iteration": 1,
         "credit_batches": 1, "credit_factors": (2, 4)}
# Leaves below each early node that the tree methods see in testbed 2 (the rest are held out).
CREDIT_TREE_LEAVES = 2


# ---- configs -------------------------------------------------------------------------------------
def _config(name: str):
  return load_sibling(os.path.join(ROOT, "configs", f"{name}.py"), name).get_config()


def flat_group_size(config) -> tuple[int, int, int]:
  """Independent trajectories per prompt whose NFE matches the config's tree.

  Returns:
    (group size G, tree NFE per prompt, flat NFE per prompt = G * num_steps).
  """
  tree_nfe = tree_lib.tree_spec_from_config(config).nfe
  steps = config.sample.num_steps
  group = max(2, round(tree_nfe / steps))
  return group, tree_nfe, group * steps


def _shrink(config) -> None:
  """--quick: 5 steps, 2 prompts per batch, 1 minibatch, 2 evaluation prompts."""
  config.sample.num_steps = 5
  config.sample.eval_num_steps = 5
  config.sample.sde_window = (0, 4)
  config.data.prompts_per_batch = 2
  config.train.num_minibatches = 1
  config.log.num_eval_prompts = 2


def testbed_config(testbed: int, method: str, seed: int, quick: bool):
  """The ConfigDict of one run (testbeds 1, 2 and 4 share testbed 1's setup; testbed 4's
  `method` is an ablation of multi_grpo, see ABLATIONS)."""
  if testbed == 4:
    if method not in ABLATIONS:
      raise ValueError(f"unknown ablation {method!r}; expected one of {tuple(ABLATIONS)}")
    config = testbed_config(1, "multi_grpo", seed, quick)
    ABLATIONS[method](config)
    return config
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of {tuple(METHODS)}")
  sizes = QUICK if quick else FULL
  if testbed in (1, 2):
    config = _config("tiny_jpeg")
    config.reward.names = SCALE_REWARDS
    config.reward.weights = (1.0, 1.0)
    iterations = sizes["iterations_1"]
    config.log.eval_every = iterations  # fixed-noise evaluation before and after training
    config.log.eval_at_start = True
  elif testbed == 3:
    config = _config("tiny_ocr_color")
    iterations = sizes["iterations_3"]
    config.log.eval_every = sizes["eval_every_3"]
  else:
    raise ValueError(f"unknown testbed {testbed}; expected one of {TESTBEDS}")
  config.seed = seed
  config.sample.batches_per_iteration = sizes["batches_per_iteration"]
  config.train.num_iterations = iterations
  # A checkpoint halfway and at the end: a killed study resumes its current run from there.
  config.log.checkpoint_every = max(1, iterations // 2)
  config.log.progress = False
  # The rollout tree of every testbed: one root, x2 at step 1, x2 at step 3 (4 leaves).
  config.tree.num_roots = 1
  config.tree.branch_steps = (1, 3)
  config.tree.branch_factors = (2, 2)
  if quick:
    _shrink(config)
  config.advantage.std = "auto"
  tree_mode, adv_mode = METHODS[method]
  config.advantage.mode = adv_mode
  if tree_mode == "flat":
    config.tree.group_size = flat_group_size(config)[0]
  config.tree.mode = tree_mode
  return config


# ---- results -------------------------------------------------------------------------------------
def _write_json(path: str, record: dict[str, Any]) -> None:
  """Written to a temporary name first, so a killed study never leaves a half-written result."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def _window_mean(values: list[float], first: bool) -> float:
  w = max(1, min(5, len(values) // 2))
  return float(np.mean(values[:w] if first else values[-w:]))


def summarise_metrics(records: list[dict[str, Any]], reward_names, prompts_per_iteration: int
                      ) -> dict[str, Any]:
  """A run's metrics.jsonl (latest record per step) -> curves against cumulative NFE and gains.

  Returns:
    {"nfe_per_prompt", "nfe_per_iteration", "curve": {"iteration", "nfe", "reward/<name>"},
     "eval": {"iteration", "nfe", "eval/<name>"}, "train_gain": {name: mean of the last 5
     iterations - mean of the first 5 (fewer when the run is short)}, "eval_gain": {name: last
     evaluation - first}, "seconds_per_iteration": mean after the first iteration}.
  """
  train = [r for r in records if "nfe/per_prompt" in r]
  if not train:
    raise ValueError("metrics.jsonl holds no training iteration")
  nfe_prompt = float(train[0]["nfe/per_prompt"])
  nfe_iteration = nfe_prompt * prompts_per_iteration
  curve = {"iteration": [r["step"] for r in train],
           "nfe": [r["step"] * nfe_iteration for r in train]}
  out: dict[str, Any] = {"nfe_per_prompt": nfe_prompt, "nfe_per_iteration": nfe_iteration,
                         "curve": curve, "train_gain": {}, "eval_gain": {}}
  for name in reward_names:
    curve[f"reward/{name}"] = [r[f"reward/{name}"] for r in train]
    out["train_gain"][name] = (_window_mean(curve[f"reward/{name}"], False)
                               - _window_mean(curve[f"reward/{name}"], True))
  evals = [r for r in records if any(k.startswith("eval/") for k in r)]
  out["eval"] = {"iteration": [r["step"] for r in evals],
                 "nfe": [r["step"] * nfe_iteration for r in evals]}
  for name in reward_names:
    series = [r.get(f"eval/{name}") for r in evals]
    out["eval"][f"eval/{name}"] = series
    if len(series) >= 2 and None not in (series[0], series[-1]):
      out["eval_gain"][name] = series[-1] - series[0]
  # The first iteration also compiles; it counts only when it is the only one.
  timed = train[1:] if len(train) > 1 else train
  out["seconds_per_iteration"] = float(np.mean([r["time/iteration"] for r in timed]))
  return out


def _heldout_records(config, quick: bool):
  from mgrpo_jax.data import prompts as prompts_lib  # pylint: disable=import-outside-toplevel
  records, _ = prompts_lib.load_dataset(config.log.eval_dataset,
                                        config.log.eval_split or config.data.split,
                                        config.reward.names, config.data.tfds_data_dir)
  return records[:config.log.num_eval_prompts] if quick else records


def heldout_evaluation(config, workdir: str | None, quick: bool) -> dict[str, float]:
  """OCR accuracy, colour accuracy and "both" on the held-out prompts (`mgrpo_jax.evaluate`,
  noise seed 0 for every run); workdir None evaluates the initial model."""
  from mgrpo_jax import evaluate as evaluate_lib  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as out_dir:
    result = evaluate_lib.evaluate_checkpoint(config, workdir, _heldout_records(config, quick),
                                              out_dir, seed=0)
  overall = result["overall"]
  return {k: float(overall[k]) for k in ("ocr_accuracy", "color_accuracy", "both")}


def run_training(testbed: int, method: str, seed: int, quick: bool, workdir: str
                 ) -> dict[str, Any]:
  """Trains one (testbed, method, seed) from scratch in `workdir`; returns its JSON record."""
  config = testbed_config(testbed, method, seed, quick)
  # A run killed earlier resumes from its last checkpoint in `workdir` (the trainer keeps its
  # metrics.jsonl consistent with the restored state).
  t0 = time.perf_counter()
  trainer_lib.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - t0
  records = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"),
                                     latest_per_step=True)
  prompts = config.data.prompts_per_batch * config.sample.batches_per_iteration
  record = {"testbed": testbed, "method": method, "seed": seed, "quick": quick,
            "tree_mode": config.tree.mode, "advantage_mode": config.advantage.mode,
            "images_per_prompt": tree_lib.tree_spec_from_config(config).num_leaves,
            "prompts_per_iteration": prompts, "num_iterations": config.train.num_iterations,
            "reward_names": list(config.reward.names), "wall_time_s": wall,
            "train_time_s": float(sum(r.get("time/iteration", 0.0) + r.get("time/eval", 0.0)
                                      for r in records)),
            **summarise_metrics(records, config.reward.names, prompts)}
  if testbed == 3:
    record["heldout"] = heldout_evaluation(config, workdir, quick)
  return record


# ---- testbed 1: reward statistics at initialisation ----------------------------------------------
def _pearson(a: np.ndarray, b: np.ndarray) -> float:
  a, b = np.ravel(a) - np.mean(a), np.ravel(b) - np.mean(b)
  denominator = math.sqrt(float(np.sum(a * a) * np.sum(b * b)))
  return float(np.sum(a * b) / denominator) if denominator > 0 else float("nan")


def _sample_rewards(config, workdir: str) -> np.ndarray:
  """Leaf rewards of the config's first iteration (same seed, noise and prompts as a run's
  iteration 1): float [P * batches, L, K]."""
  shutil.rmtree(workdir, ignore_errors=True)
  trainer = trainer_lib.Trainer(config, workdir)
  try:
    batches = trainer.sample_and_score(0, metrics_lib.Timer())
  finally:
    trainer.close()
    shutil.rmtree(workdir, ignore_errors=True)
  return np.concatenate([np.asarray(b.rewards) for b in batches])


def init_statistics(seed: int, quick: bool, workdir: str) -> dict[str, Any]:
  """Stds of testbed 1's rewards over iteration 1's samples (multi_grpo's rollout), their
  Pearson correlation over all samples, and within prompts (each prompt's mean removed)."""
  config = testbed_config(1, "multi_grpo", seed, quick)
  rewards = _sample_rewards(config, workdir)  # [N, L, 2]
  within = rewards - rewards.mean(1, keepdims=True)
  stds = rewards.reshape(-1, 2).std(0)
  return {"seed": seed, "num_samples": int(rewards.shape[0] * rewards.shape[1]),
          "std": dict(zip(SCALE_REWARDS, map(float, stds))),
          "mean": dict(zip(SCALE_REWARDS, map(float, rewards.reshape(-1, 2).mean(0)))),
          "std_ratio": float(stds[0] / stds[1]),
          "correlation": _pearson(rewards[..., 0], rewards[..., 1]),
          "correlation_within_prompt": _pearson(within[..., 0], within[..., 1])}


# ---- testbed 2: credit assignment ----------------------------------------------------------------
def credit_scores(rewards: np.ndarray, config, tree_leaves: int = CREDIT_TREE_LEAVES
                  ) -> dict[str, dict[str, float]]:
  """How well each method's advantage of an early node predicts that node's held-out value.

  Args:
    rewards: [N, L, K] leaf rewards of N prompts' wide trees (one root, k1 early nodes at the
      first branch step, each with k2 leaves: L = k1 * k2), from `config`'s tree.
    config: the wide tree's config (tree.branch_factors = (k1, k2); reward weights).
    tree_leaves: leaves below each early node that the tree methods see (< k2).

  Returns:
    method -> {"corr/<reward>": Pearson correlation over all early nodes of the advantage with
    the held-out value of that reward (mean of the other k2 - tree_leaves leaves, centred per
    prompt), "corr/combined": the same with the sum of the held-out values, each divided by its
    std, weighted by reward.weights, "adv_var": variance of the early advantages}.
  """
  k1, k2 = (int(k) for k in config.tree.branch_factors)
  n, num_leaves, k = rewards.shape
  if num_leaves != k1 * k2 or not 1 <= tree_leaves < k2:
    raise ValueError(f"rewards have {num_leaves} leaves; expected k1 * k2 = {k1} * {k2} with "
                     f"1 <= tree_leaves={tree_leaves} < k2")
  per_node = rewards.reshape(n, k1, k2, k)
  held_out = per_node[:, :, tree_leaves:].mean(2)  # [N, k1, K]: Monte-Carlo value
  held_out = held_out - held_out.mean(1, keepdims=True)
  weights = np.asarray(config.reward.weights, np.float64)
  combined = (held_out / np.maximum(held_out.reshape(-1, k).std(0), 1e-12) * weights).sum(-1)
  scores = {}
  for method, (tree_mode, adv_mode) in METHODS.items():
    sub = config.copy_and_resolve_references()
    sub.advantage.mode = adv_mode
    sub.advantage.std = "auto"
    if tree_mode == "tree":  # the same tree with tree_leaves leaves below each early node
      sub.tree.branch_factors = (k1, tree_leaves)
      seen = per_node[:, :, :tree_leaves].reshape(n, k1 * tree_leaves, k)
      first_early = 1  # node ids: the root, then the k1 early nodes
    else:  # one trajectory through each early node, as independent samples
      sub.tree.mode = "flat"
      sub.tree.group_size = k1
      seen = per_node[:, :, 0]
      first_early = 0
    spec = tree_lib.tree_spec_from_config(sub)
    adv = adv_lib.compute_advantages(seen, spec, adv_lib.AdvantageConfig.from_config(sub))
    early = np.asarray(adv.nodes)[:, first_early:first_early + k1]  # [N, k1]
    row = {f"corr/{name}": _pearson(early, held_out[..., j])
           for j, name in enumerate(config.reward.names)}
    row["corr/combined"] = _pearson(early, combined)
    row["adv_var"] = float(np.var(early))
    scores[method] = row
  return scores


def credit_config(seed: int, quick: bool):
  """Testbed 1's setup sampled as one wide tree: x k1 at step 1, x k2 at step 3."""
  sizes = QUICK if quick else FULL
  config = testbed_config(1, "multi_grpo", seed, quick)
  config.tree.branch_factors = tuple(sizes["credit_factors"])
  config.sample.batches_per_iteration = sizes["credit_batches"]
  return config


def run_credit(seed: int, quick: bool, workdir: str) -> dict[str, Any]:
  config = credit_config(seed, quick)
  t0 = time.perf_counter()
  rewards = _sample_rewards(config, workdir)
  return {"testbed": 2, "seed": seed, "quick": quick, "wall_time_s": time.perf_counter() - t0,
          "num_prompts": int(rewards.shape[0]),
          "branch_factors": list(config.tree.branch_factors),
          "tree_leaves_seen": CREDIT_TREE_LEAVES, "methods": credit_scores(rewards, config)}


# ---- report --------------------------------------------------------------------------------------
def _mean_std(values) -> str:
  values = [v for v in values if v is not None and np.isfinite(v)]
  if not values:
    return "n/a"
  scale = max(abs(float(np.mean(values))), float(np.std(values)))
  digits = 3 if scale >= 0.1 or scale == 0 else max(3, 2 - int(math.floor(math.log10(scale))))
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _load(path: str):
  with open(path) as f:
    return json.load(f)


def _runs(out: str, testbed: int, seeds) -> dict[str, list[dict[str, Any]]]:
  """label -> the finished runs' records (testbed 4: the reference from testbed 1, then the
  ablations)."""
  load = lambda t, method: [_load(p) for p in (os.path.join(out, str(t), method, f"seed{s}.json")
                                               for s in seeds) if os.path.exists(p)]
  if testbed == 4:
    return {ABLATION_REFERENCE: load(1, "multi_grpo"),
            **{name: load(4, name) for name in ABLATIONS}}
  return {method: load(testbed, method) for method in METHODS}


def _training_table(runs, reward_names, heldout: bool) -> list[str]:
  columns = ["method", "seeds", "NFE / prompt", "NFE / iteration", "iterations"]
  columns += [f"{n} gain (train)" for n in reward_names]
  columns += [f"{n} gain (eval)" for n in reward_names]
  if heldout:
    columns += ["OCR acc.", "colour acc.", "both"]
  columns += ["s / iteration"]
  lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
  for method, rs in runs.items():
    if not rs:
      continue
    cells = [method, str(len(rs)), f"{rs[0]['nfe_per_prompt']:.0f}",
             f"{rs[0]['nfe_per_iteration']:.0f}", str(rs[0]["num_iterations"])]
    cells += [_mean_std([r["train_gain"][n] for r in rs]) for n in reward_names]
    cells += [_mean_std([r["eval_gain"].get(n) for r in rs]) for n in reward_names]
    if heldout:
      cells += [_mean_std([r["heldout"][k] for r in rs])
                for k in ("ocr_accuracy", "color_accuracy", "both")]
    cells.append(_mean_std([r["seconds_per_iteration"] for r in rs]))
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def plot_curves(runs, keys, out_png: str, title: str) -> str:
  """Mean over seeds (± std band) of each key against cumulative NFE, one line per method."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(5.0 * len(keys), 3.4))
  axes = fig.subplots(1, len(keys), squeeze=False).ravel()
  for ax, key in zip(axes, keys):
    group = "eval" if key.startswith("eval/") else "curve"
    for method, rs in runs.items():
      if not rs:
        continue
      length = min(len(r[group][key]) for r in rs)
      if length == 0:
        continue
      nfe = np.asarray(rs[0][group]["nfe"][:length], np.float64)
      values = np.asarray([[np.nan if v is None else v for v in r[group][key][:length]]
                           for r in rs], np.float64)
      mean, std = values.mean(0), values.std(0)
      ax.plot(nfe, mean, marker="." if length <= 50 else None, label=method)
      if len(rs) > 1:
        ax.fill_between(nfe, mean - std, mean + std, alpha=0.15, linewidth=0)
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("cumulative model evaluations (NFE)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  return out_png


def report(out: str, testbeds, seeds) -> str:
  """Writes <out>/study.md and the curve PNGs from the run JSONs present; returns the text."""
  shown = os.path.relpath(out, ROOT) if os.path.abspath(out).startswith(ROOT + os.sep) else out
  lines = ["# Issue 13 study at toy scale", "",
           f"`python bench/study.py --testbeds {' '.join(map(str, testbeds))} --seeds "
           f"{' '.join(map(str, seeds))} --out {shown}`; mean ± std (ddof 1) over seeds.", ""]
  for testbed in testbeds:
    lines += [f"## {TESTBED_TITLES[testbed]}", ""]
    if testbed == 1:
      inits = [_load(p) for p in (os.path.join(out, "1", "init", f"seed{s}.json")
                                  for s in seeds) if os.path.exists(p)]
      if inits:
        lines += ["At initialisation (iteration 1's samples of multi_grpo's rollout, "
                  f"{inits[0]['num_samples']} images per seed):", "",
                  "| std " + " | std ".join(SCALE_REWARDS) + " | std ratio | correlation | "
                  "correlation within prompt |", "|" + " --- |" * 5,
                  "| " + " | ".join([_mean_std([i["std"][n] for i in inits])
                                     for n in SCALE_REWARDS]
                                    + [_mean_std([i[k] for i in inits]) for k in
                                       ("std_ratio", "correlation",
                                        "correlation_within_prompt")]) + " |", ""]
    if testbed in (1, 3, 4):
      runs = _runs(out, testbed, seeds)
      names = next((rs[0]["reward_names"] for rs in runs.values() if rs), None)
      if names is None:
        lines += ["(no finished run)", ""]
        continue
      if testbed == 3 and os.path.exists(os.path.join(out, "3", "init.json")):
        init = _load(os.path.join(out, "3", "init.json"))
        lines += [f"Initial model on the held-out prompts: OCR acc. {init['ocr_accuracy']:.3f}, "
                  f"colour acc. {init['color_accuracy']:.3f}, both {init['both']:.3f}.", ""]
      lines += _training_table(runs, names, heldout=testbed == 3) + [""]
      keys = [f"reward/{n}" for n in names] + ([f"eval/{n}" for n in names]
                                               if testbed == 3 else [])
      png = plot_curves(runs, keys, os.path.join(out, f"testbed{testbed}_curves.png"),
                        TESTBED_TITLES[testbed])
      lines += [f"![testbed {testbed} curves]({os.path.basename(png)})", ""]
    if testbed == 2:
      credits = [_load(p) for p in (os.path.join(out, "2", "credit", f"seed{s}.json")
                                    for s in seeds) if os.path.exists(p)]
      if not credits:
        lines += ["(no finished run)", ""]
        continue
      keys = list(next(iter(credits[0]["methods"].values())))
      lines += [f"Wide tree x{credits[0]['branch_factors'][0]} at step 1, "
                f"x{credits[0]['branch_factors'][1]} at step 3, "
                f"{credits[0]['num_prompts']} prompts per seed; tree methods see "
                f"{credits[0]['tree_leaves_seen']} leaves per early node, flat methods 1.", "",
                "| method | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 1)]
      for method in METHODS:
        lines.append(f"| {method} | " + " | ".join(
            _mean_std([c["methods"][method][k] for c in credits]) for k in keys) + " |")
      lines += ["", "Learning curves at equal NFE: testbed 1 (same setup).", ""]
  text = "\n".join(lines)
  with open(os.path.join(out, "study.md"), "w") as f:
    f.write(text)
  return text


# ---- driver --------------------------------------------------------------------------------------
def _run_once(path: str, make, label: str) -> bool:
  """Writes make()'s record to `path` unless it exists; True if it ran."""
  if os.path.exists(path):
    print(f"[skip] {label}: {path} exists", flush=True)
    return False
  t0 = time.perf_counter()
  _write_json(path, make())
  print(f"[done] {label} in {time.perf_counter() - t0:.0f} s -> {path}", flush=True)
  return True


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="1 seed, 2 iterations, the smallest shapes (CI)")
  parser.add_argument("--testbeds", type=int, nargs="+", default=list(TESTBEDS),
                      choices=TESTBEDS)
  parser.add_argument("--seeds", type=int, nargs="+", default=None,
                      help="default 0 1 2 (0 with --quick)")
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                      help="methods of testbeds 1 and 3")
  parser.add_argument("--report-only", action="store_true",
                      help="rewrite study.md and the plots from the finished runs; run nothing")
  parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "study"))
  parser.add_argument("--workdir-root", default=os.path.join(tempfile.gettempdir(),
                                                             "mgrpo_study"),
                      help="training workdirs (deleted after each run)")
  parser.add_argument("--compilation-cache", default=os.path.join(
      tempfile.gettempdir(), "mgrpo_study", "jax_cache"),
                      help="persistent JAX compilation cache ('' = off)")
  args = parser.parse_args(argv)
  seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
  testbeds = sorted(set(args.testbeds))
  os.makedirs(args.out, exist_ok=True)
  t_start = time.perf_counter()
  if args.compilation_cache:
    # Runs of one rollout shape compile the same sampling, training and evaluation functions;
    # the persistent cache compiles them once per study instead of once per run.
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if args.report_only:
    print(report(args.out, [t for t in TESTBEDS if os.path.isdir(os.path.join(args.out, str(t)))],
                 seeds))
    return 0
  group, tree_nfe, flat_nfe = flat_group_size(testbed_config(1, "multi_grpo", 0, args.quick))
  print(f"NFE per prompt: tree {tree_nfe}, flat {group} trajectories x "
        f"{flat_nfe // group} steps = {flat_nfe}", flush=True)

  def work(*parts):
    return os.path.join(args.workdir_root, "quick" if args.quick else "full", *map(str, parts))

  for testbed in testbeds:
    for seed in seeds:
      if testbed == 1:
        _run_once(os.path.join(args.out, "1", "init", f"seed{seed}.json"),
                  lambda: init_statistics(seed, args.quick, work(1, "init", seed)),
                  f"testbed 1 init statistics, seed {seed}")
      if testbed == 2:
        _run_once(os.path.join(args.out, "2", "credit", f"seed{seed}.json"),
                  lambda: run_credit(seed, args.quick, work(2, "credit", seed)),
                  f"testbed 2 credit assignment, seed {seed}")
      if testbed in (1, 3, 4):
        for method in (args.methods if testbed != 4 else list(ABLATIONS)):
          workdir = work(testbed, method, seed)
          if _run_once(os.path.join(args.out, str(testbed), method, f"seed{seed}.json"),
                       lambda: run_training(testbed, method, seed, args.quick, workdir),
                       f"testbed {testbed} {method} seed {seed}"):
            shutil.rmtree(workdir, ignore_errors=True)
    if testbed == 3:
      config = testbed_config(3, "multi_grpo", 0, args.quick)
      _run_once(os.path.join(args.out, "3", "init.json"),
                lambda: heldout_evaluation(config, None, args.quick),
                "testbed 3 initial model on the held-out prompts")
  # The report also keeps the testbeds an earlier invocation ran into the same --out.
  reported = sorted(set(testbeds) | {t for t in TESTBEDS
                                     if os.path.isdir(os.path.join(args.out, str(t)))})
  print(report(args.out, reported, seeds))
  print(f"study: {time.perf_counter() - t_start:.0f} s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
