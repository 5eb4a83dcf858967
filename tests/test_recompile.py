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
  batches per iteration, two minibatches, tree rollouts, CFG): every compilation happens in
  iteration 1. Sampling is cut to 4 steps (2 trained) to keep the test short; the jitted
  functions and their call pattern are those of the full config."""
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

  trainer = trainer_lib.Trainer(config, str(tmp_path))
  compiled = {}                                        # iteration (1-based) -> [function names]
  current = [None]                                     # None: outside train_iteration
  train_iteration = trainer.train_iteration

  def counted(iteration, timer):
    current[0] = iteration + 1
    try:
      return train_iteration(iteration, timer)
    finally:
      current[0] = None

  def listener(event, duration, **kwargs):
    del duration
    if event == COMPILE_EVENT:
      compiled.setdefault(current[0], []).append(kwargs.get("fun_name", "?"))

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
  assert compiled.get(1), "the listener saw no compilation in iteration 1: wrong event name?"
  assert not compiled.get(2) and not compiled.get(3), (
      f"recompiled after iteration 1: {compiled.get(2)} / {compiled.get(3)}")
