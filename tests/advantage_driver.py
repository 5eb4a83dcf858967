"""Samples and scores one iteration and saves every batch's training advantages (a test driver).

  python -m tests.advantage_driver OUT.npz WORKDIR [COORDINATOR NUM_PROCESSES PROCESS_ID]

Run once as one process and once as several (`jax.distributed`); tests/test_distributed.py
compares the two files. The config is the tiny default with two rewards (reward groups) and two
sampling batches per iteration, which is where rows of several processes and batches meet.
"""

import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config():
  from mgrpo_jax.config_utils import load_sibling  # pylint: disable=g-import-not-at-top
  cfg = load_sibling(os.path.join(ROOT, "configs", "base.py"), "base").get_config()
  cfg.data.dataset, cfg.data.split = "pickscore_25k", "test"
  cfg.data.prompts_per_batch = 8
  cfg.sample.batches_per_iteration = 2
  cfg.sample.num_steps = cfg.sample.eval_num_steps = 4
  cfg.tree.branch_steps, cfg.tree.branch_factors = (0, 1), (2, 2)
  cfg.reward.names = ("jpeg_compressibility", "jpeg_incompressibility")
  cfg.reward.weights = (1.0, 0.5)
  cfg.log.progress = False
  return cfg


def main(argv):
  out, workdir = argv[1], argv[2]
  if len(argv) > 3:
    jax.distributed.initialize(coordinator_address=argv[3], num_processes=int(argv[4]),
                               process_id=int(argv[5]))
  from mgrpo_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from mgrpo_jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  # Samples and scores one iteration; no train step.
  trainer = trainer_lib.Trainer(config(), workdir, compile_ahead=False)
  try:
    batches = trainer.sample_and_score(0, metrics_lib.Timer())
    adv, _ = trainer.iteration_advantages(trainer.runtime.fns_for_iteration(0), batches)
    arrays = {}
    for b, batch in enumerate(batches):
      gather = lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True))
      arrays[f"advantages_{b}"] = gather(adv.transitions[b])
      arrays[f"log_probs_{b}"] = gather(batch.rollout.log_probs)
      # Each process's rewards of this batch, in the global row order of the rollout.
      arrays[f"rewards_{b}"] = np.asarray(multihost_utils.process_allgather(
          batch.rewards, tiled=True))
    if jax.process_index() == 0:
      np.savez(out, **arrays)
  finally:
    trainer.close()


if __name__ == "__main__":
  main(sys.argv)
