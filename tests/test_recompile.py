"""Steady state compiles nothing: after the first iteration, training iterations reuse every
executable (issue 15 item 4). A recompile per iteration would cost minutes on a real model."""

import os

import jax
import pytest

from mgrpo_jax import trainer as trainer_lib
from mgrpo_jax.config_utils import load_sibling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# jax/_src/dispatch.py BACKEND_COMPILE_EVENT: recorded around every XLA compilation (also when
# the executable comes from the persistent cache), for jit and for eager ops alike.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def test_compile_event_counts_each_new_compilation():
  """The event the slow test listens to: once per new shape, never for a cached one."""
  names = []
  listener = lambda event, duration, **kw: names.append(kw.get("fun_name")) \
      if event == COMPILE_EVENT else None
  f = jax.jit(lambda x: x * 2 + 1)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    f(jax.numpy.ones(3))
    f(jax.numpy.ones(3))                               # cached: no event
    f(jax.numpy.ones(5))                               # new shape: compiles again
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert names.count("jit(<lambda>)") == 2


@pytest.mark.slow
def test_no_compilation_after_the_first_iteration(tmp_path):
  """Three iterations of configs/tiny_jpeg.py on the 8 simulated devices (data parallel, two
  batches per iteration, two minibatches, tree rollouts, CFG): the iteration's functions compile
  while the Trainer is built, and nothing compiles after iteration 1. Sampling is cut to 4 steps
  (2 trained) to keep the test short; the jitted functions and their call pattern are those of
  the full config."""
  config = load_sibling(os.path.join(ROOT, "configs", "tiny_jpeg.py"), "tiny_jpeg").get_config()
  config.train.num_iterations = 3
  config.log.progress = False
  # Evaluation and checkpoints only after the last iteration (outside the counted window).
  config.log.eval_every = 100
  config.log.checkpoint_every = 100
  config.sample.batches_per_iteration = 2
  config.data.prompts_per_batch = jax.device_count()  # one prompt per data shard
  config.sample.num_steps = 4
  config.sample.sde_window = (0, 2)
  config.tree.branch_steps = (0, 1)

  compiled = {}                                        # iteration (1-based) -> [function names]
  current = [0]                                        # 0: building the Trainer; None: between

  def listener(event, duration, **kwargs):
    del duration
    if event == COMPILE_EVENT:
      compiled.setdefault(current[0], []).append(kwargs.get("fun_name", "?"))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    trainer = trainer_lib.Trainer(config, str(tmp_path))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  current[0] = None
  train_iteration = trainer.train_iteration

  def counted(iteration, timer):
    current[0] = iteration + 1
    try:
      return train_iteration(iteration, timer)
    finally:
      current[0] = None

  trainer.train_iteration = counted
  # The final evaluation (done == total) compiles the eval sampler, outside the counted window
  # anyway; it has its own tests and would double this test's time.
  trainer.evaluate = lambda iteration: {}  # no eval/<reward> scalars
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    trainer.run()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    trainer.close()
  assert not compiled.get(2) and not compiled.get(3), (
      f"recompiled after iteration 1: {compiled.get(2)} / {compiled.get(3)}")
  # The iteration's functions were compiled while the Trainer was built (compile_iteration,
  # ahead of time with the shardings the loop passes), and iteration 1 reuses those
  # executables: a mismatch in any argument's sharding would compile it again here.
  iteration_fns = {"jit(sample_fn)", "jit(advantage_fn)", "jit(batch_minibatches)",
                   "jit(take_minibatch)", "jit(train_step)"}
  assert iteration_fns <= set(compiled.get(0, [])), compiled.get(0)
  assert not iteration_fns & set(compiled.get(1, [])), compiled.get(1)
