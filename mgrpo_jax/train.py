r"""Command-line entry point: `mgrpo-train --config configs/X.py --workdir DIR`.

Also `python -m mgrpo_jax.train ...`. Fields are overridden with `--config.group.field=value`;
a variant of a config file is chosen with `--config configs/X.py:variant`. Unknown fields are an
error. The resolved config is written to DIR/config.json; rerunning with the same DIR resumes from
its latest checkpoint.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mgrpo_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py), optionally with ':variant'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host). TPU pods, SLURM and "
    "Open MPI are detected from the environment; otherwise give the three flags below.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_PLAN = flags.DEFINE_bool(
    "plan", False, "Print the launch plan (tree, NFE, transitions, minibatches, updates, mesh, "
    "model size on abstract shapes) and every problem the config would hit, then exit: 0 if the "
    "run can start, 1 if not. No weights are loaded; --workdir is not needed.")
_PLAN_DEVICES = flags.DEFINE_integer(
    "plan_devices", None, "With --plan: the number of devices of the run (default: this "
    "machine's), e.g. 256 for a v5e-256 slice.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every checkpoint phase at INFO; the progress bar and metrics.jsonl report the
    # run. `--verbosity=0` brings the INFO log back.
    logging.set_verbosity(logging.WARNING)
  if _DISTRIBUTED.value or _COORDINATOR.value:
    import jax  # pylint: disable=g-import-not-at-top
    # JAX's own multi-controller runtime: every process runs this same program.
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from mgrpo_jax import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from mgrpo_jax import trainer  # pylint: disable=g-import-not-at-top  (keeps --help fast)
  from mgrpo_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  logging.info("config:\n%s", _CONFIG.value)
  if _PLAN.value:
    plan = plan_lib.make_plan(_CONFIG.value, num_devices=_PLAN_DEVICES.value)
    print(f"mgrpo-train --plan ({flags.FLAGS['config'].serialize().split('=', 1)[-1]}):\n"
          f"{plan.format()}", flush=True)
    sys.exit(0 if plan.ok else 1)
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (except with --plan)")
  print(f"mgrpo-train: workdir {_WORKDIR.value}", flush=True)
  total = _CONFIG.value.train.num_iterations
  finished = workdir_lib.finished_iteration(_WORKDIR.value, total)
  if finished is not None:
    print(f"mgrpo-train: the run in {_WORKDIR.value} is finished (checkpoint of iteration "
          f"{finished}, train.num_iterations={total}); nothing to do. Raise "
          "--config.train.num_iterations to continue it.", flush=True)
    return
  # Everything that would fail later fails here, before any weight is read or image sampled.
  plan = plan_lib.make_plan(_CONFIG.value)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(f"mgrpo-train: plan\n{plan.format()}", flush=True)
  plan.raise_if_problems()
  # One run per workdir: a second one stops here, before building anything, naming the holder.
  workdir_lib.hold_for_process(_WORKDIR.value)
  try:
    metrics = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except trainer.Preempted as e:
    logging.warning("%s", e)
    print(f"preempted: {e}", flush=True)
    sys.exit(trainer.PREEMPTED_EXIT_CODE)
  rewards = {k: round(v, 4) for k, v in metrics.items() if k.startswith("reward/")}
  print(f"done: {rewards}", flush=True)


def run():
  """Console-script entry point: errors are one line on stderr (`--debug`: the traceback)."""
  cli.run(main, "mgrpo-train")


if __name__ == "__main__":
  run()
