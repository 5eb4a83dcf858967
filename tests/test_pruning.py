"""BranchGRPO's branch pruning and level selection: hand-built trees, then one tiny run."""

import json
import os

import jax
import numpy as np
import pytest

from mgrpo_jax import advantages as adv_lib
from mgrpo_jax import plan as plan_lib
from mgrpo_jax import trainer as trainer_lib
from mgrpo_jax.config_utils import load_sibling
from mgrpo_jax.sampling.tree import make_tree_spec
from tests import tiny_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hand_tree():
  # T=4; one root branches x2 at step 0 (nodes 1, 2), each x2 at step 1 (leaves 3, 4 | 5, 6).
  # Stored transitions: step 0 -> nodes 1, 2; step 1 -> leaves 3..6; step 2 -> leaves 3..6.
  return make_tree_spec(4, [1, 1, 1, 0], num_roots=1, branch_steps=(0, 1), branch_factors=(2, 2))


def advantages(rewards, spec, **kw):
  cfg = adv_lib.AdvantageConfig(std="group", weights=(1.0,) * rewards.shape[-1], **kw)
  return jax.jit(adv_lib.compute_advantages, static_argnums=(1, 2))(rewards, spec, cfg)


def test_branches_with_small_spread_are_pruned_per_prompt():
  # Prompt 0: leaves [1, 1 | 0, 2]: siblings {3, 4} spread 0 (pruned), {5, 6} spread 2 (kept);
  # level-1 values [1, 1] spread 0 (pruned).
  # Prompt 1: leaves [0, 1 | 1, 1]: {3, 4} spread 1 (kept), {5, 6} 0 (pruned); level-1 values
  # [0.5, 1] spread 0.5 (kept: the test is spread >= threshold).
  rewards = np.array([[1, 1, 0, 2], [0, 1, 1, 1]], np.float32)[..., None]
  out = advantages(rewards, hand_tree(), prune_spread=0.5)
  np.testing.assert_array_equal(out.keep, [[0, 0, 0, 0, 1, 1, 0, 0, 1, 1],
                                           [1, 1, 1, 1, 0, 0, 1, 1, 0, 0]])
  # Pruning only sets loss weights: the advantages are those of the unpruned run.
  np.testing.assert_array_equal(out.transitions, advantages(rewards, hand_tree()).transitions)


def test_a_branching_is_informative_if_any_reward_spreads():
  # Three rewards; siblings {1, 2}: spreads A 4, B 20, C 0; leaves {3, 4} and {5, 6}: A 2, B 0,
  # C 0.2.
  rewards = np.array([[1.0, 10.0, 0.1], [3.0, 10.0, 0.3],
                      [5.0, 30.0, 0.1], [7.0, 30.0, 0.3]], np.float32)[None]
  keep = lambda s: np.asarray(advantages(rewards, hand_tree(), prune_spread=s).keep[0])
  np.testing.assert_array_equal(keep(3.0), [1, 1] + [0] * 8)
  np.testing.assert_array_equal(keep(0.15), [1] * 10)
  np.testing.assert_array_equal(keep(25.0), [0] * 10)


def test_flat_prompts_with_near_equal_rewards_are_pruned_where_drop_zero_keeps_them():
  # A prompt whose rewards differ by 0.01 gets unit-scale advantages from its own std (noise
  # amplified); drop_zero_groups keeps it, pruning with spread 0.1 does not.
  spec = make_tree_spec(3, [1, 1, 0], num_roots=3)
  rewards = np.array([[1, 2, 3], [5, 5, 5.01]], np.float32)[..., None]
  dropped = advantages(rewards, spec, drop_zero_groups=True)
  pruned = advantages(rewards, spec, prune_spread=0.1)
  assert np.abs(np.asarray(dropped.transitions[1])).max() > 1.0
  np.testing.assert_array_equal(dropped.keep, [[1] * 6, [1] * 6])
  np.testing.assert_array_equal(pruned.keep, [[1] * 6, [0] * 6])


def test_train_levels_select_the_transitions_of_those_levels():
  rewards = np.array([[1, 1, 0, 2]], np.float32)[..., None]
  spec = hand_tree()  # level 1 owns step 0 (transitions 0, 1), level 2 the rest
  np.testing.assert_array_equal(advantages(rewards, spec, train_levels=(1,)).keep,
                                [[1, 1] + [0] * 8])
  np.testing.assert_array_equal(advantages(rewards, spec, train_levels=(2,)).keep,
                                [[0, 0] + [1] * 8])
  # Combined with pruning: level 2 minus the pruned siblings {3, 4}.
  np.testing.assert_array_equal(advantages(rewards, spec, train_levels=(2,), prune_spread=0.5).keep,
                                [[0, 0, 0, 0, 1, 1, 0, 0, 1, 1]])


@pytest.mark.parametrize("kw, match", [
    (dict(prune_spread=-1.0), "prune_spread"),
    (dict(train_levels=(1, 1)), "train_levels"),
    (dict(train_levels=(-1,)), "train_levels"),
])
def test_bad_settings_are_named(kw, match):
  with pytest.raises(ValueError, match=match):
    adv_lib.AdvantageConfig(**kw)


def test_a_level_the_tree_lacks_is_named_by_the_plan():
  config = load_sibling(os.path.join(ROOT, "configs", "tiny_jpeg.py"), "tiny_jpeg").get_config()
  config.advantage.train_levels = (3,)
  plan = plan_lib.make_plan(config, check_model=False)
  assert any("advantage.train_levels" in p and "levels 0..2" in p for p in plan.problems), \
      plan.problems


@pytest.mark.slow
def test_tiny_run_with_pruning_and_levels(tmp_path):
  """One iteration of the tiny model training level 2 only, with branch pruning (~40 s idle)."""
  config = tiny_runs.tiny_run_config(iterations=1)
  config.sample.sde_window = (-1, -1)
  config.tree.branch_steps = (0, 1)
  config.advantage.prune_spread = 1e-3
  config.advantage.train_levels = (2,)
  trainer_lib.train_and_evaluate(config, str(tmp_path))
  line = json.loads(open(tmp_path / "metrics.jsonl").readline())
  assert line["advantage/kept_fraction/level_1"] == 0.0
  assert 0.0 < line["advantage/kept_fraction/level_2"] <= 1.0
  assert np.isfinite(line["train/loss"])
