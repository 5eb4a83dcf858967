"""Advantages: a hand-computed 2-level tree, reward groups vs mixing, and a numpy-loop reference."""

import itertools

import jax
import numpy as np
import pytest

from mgrpo_jax import advantages as adv_lib
from mgrpo_jax.sampling.tree import make_tree_spec

EPS = 1e-4


def hand_tree():
  # T=4; one root branches x2 at step 0 (nodes 1, 2), each branches x2 at step 1 (leaves 3..6).
  # Stored SDE steps 0..2: step 0 -> nodes 1, 2; steps 1, 2 -> leaves 3, 4, 5, 6.
  return make_tree_spec(4, [1, 1, 1, 0], num_roots=1, branch_steps=(0, 1), branch_factors=(2, 2))


# Leaf rewards of one prompt, three rewards on very different scales.
REWARDS = np.array([[1.0, 10.0, 0.1],
                    [3.0, 10.0, 0.3],
                    [5.0, 30.0, 0.1],
                    [7.0, 30.0, 0.3]], np.float32)[None]  # [P=1, L=4, K=3]


def test_hand_tree_reward_groups_group_std():
  spec = hand_tree()
  cfg = adv_lib.AdvantageConfig(std="group", weights=(1.0, 1.0, 1.0), clip=100.0)
  out = jax.jit(adv_lib.compute_advantages, static_argnums=(1, 2))(REWARDS, spec, cfg)
  # Leaves, per reward: A centred [-3,-1,1,3] / sqrt(5); B [-10,-10,10,10] / 10;
  # C [-.1,.1,-.1,.1] / .1  (each std + eps).
  a = np.array([-3, -1, 1, 3]) / (np.sqrt(5) + EPS)
  b = np.array([-10, -10, 10, 10]) / (10 + EPS)
  c = np.array([-0.1, 0.1, -0.1, 0.1]) / (0.1 + EPS)
  leaves = a + b + c
  # Level 1 values: A [2, 6], B [10, 30], C [0.2, 0.2] -> A, B: [-1, 1]; C: 0 (std 0).
  level1 = np.array([-2, 2]) / (2 + EPS) * 0 + np.array([-2, 2]) / (2 + EPS) + np.array([-10, 10]) / (10 + EPS)
  expected_nodes = np.concatenate([[0.0], level1, leaves])
  np.testing.assert_allclose(out.nodes[0], expected_nodes, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out.values[0, 1], [2, 10, 0.2], rtol=1e-6)
  # Transitions: step 0 -> nodes 1, 2; steps 1, 2 -> leaves.
  expected_trans = np.concatenate([level1, leaves, leaves])
  np.testing.assert_allclose(out.transitions[0], expected_trans, rtol=1e-4, atol=1e-4)


def test_hand_tree_reward_mixing_differs_as_computed():
  spec = hand_tree()
  groups = adv_lib.compute_advantages(REWARDS, spec, adv_lib.AdvantageConfig(
      std="group", weights=(1.0, 1.0, 1.0), clip=100.0))
  mixing = adv_lib.compute_advantages(REWARDS, spec, adv_lib.AdvantageConfig(
      mode="reward_mixing", std="group", weights=(1.0, 1.0, 1.0), clip=100.0))
  # Mixed leaf rewards [11.1, 13.3, 35.1, 37.3]: mean 24.2, centred [-13.1, -10.9, 10.9, 13.1],
  # std sqrt((13.1^2 + 10.9^2) / 2) = sqrt(145.21). Level 1: [12.2, 36.2] -> [-1, 1].
  mixed_leaves = np.array([-13.1, -10.9, 10.9, 13.1]) / (np.sqrt(145.21) + EPS)
  mixed_level1 = np.array([-12, 12]) / (12 + EPS)
  np.testing.assert_allclose(mixing.nodes[0], np.concatenate([[0], mixed_level1, mixed_leaves]),
                             rtol=1e-4, atol=1e-4)
  # Reward groups give every reward equal say: the level-1 nodes get -2/+2 instead of -1/+1, and
  # the second leaf (worse on A, equal on B, better on C) gets -0.447 instead of -0.905.
  np.testing.assert_allclose(groups.nodes[0, 1:3] - mixing.nodes[0, 1:3], [-1, 1], atol=1e-3)
  np.testing.assert_allclose(groups.nodes[0, 4], -1 / np.sqrt(5), atol=1e-3)
  np.testing.assert_allclose(mixing.nodes[0, 4], -10.9 / np.sqrt(145.21), atol=1e-3)


def test_hand_tree_siblings_scope_and_clip():
  spec = hand_tree()
  out = adv_lib.compute_advantages(REWARDS, spec, adv_lib.AdvantageConfig(
      scope="siblings", std="group", weights=(1.0, 1.0, 1.0), clip=1.5))
  # Sibling groups {3, 4}, {5, 6}: A [-1, 1] twice, B all equal -> 0, C [-1, 1] twice.
  leaves = np.array([-2, 2, -2, 2]) / (1 + EPS * 10)  # (1/(1+eps) + 0.1/(0.1+eps)) ~ 2
  np.testing.assert_allclose(out.nodes[0, 3:], leaves, atol=2e-3)
  # Clipped at 1.5 in the transitions.
  np.testing.assert_allclose(out.transitions[0, 2:6], [-1.5, 1.5, -1.5, 1.5], atol=1e-6)


def test_flat_global_std_is_flow_grpo():
  spec = make_tree_spec(3, [1, 1, 0], num_roots=4)
  rewards = np.array([[1, 2, 3, 4], [10, 10, 10, 14]], np.float32)[..., None]
  out = adv_lib.compute_advantages(rewards, spec, adv_lib.AdvantageConfig())
  std = np.std(rewards)  # over the whole batch
  mean = rewards.mean(1, keepdims=True)
  expected = ((rewards - mean) / (std + EPS))[..., 0]
  np.testing.assert_allclose(out.nodes, expected, rtol=1e-5)
  np.testing.assert_allclose(out.transitions, np.tile(expected, (1, 2)), rtol=1e-5)


def test_drop_zero_groups():
  spec = make_tree_spec(3, [1, 1, 0], num_roots=3)
  rewards = np.array([[1, 2, 3], [5, 5, 5]], np.float32)[..., None]
  out = adv_lib.compute_advantages(rewards, spec, adv_lib.AdvantageConfig(drop_zero_groups=True))
  np.testing.assert_array_equal(out.keep, [[1] * 6, [0] * 6])


# ---- independent reference: plain numpy loops over prompts, levels and nodes ---------------------
def reference(rewards, spec, cfg):
  """Loops over an explicit tree built from parent pointers (not from leaf_ancestor)."""
  P, L, K = rewards.shape
  parent = spec.parent
  level = spec.node_level
  n = len(parent)
  leaf_ids = np.nonzero(level == level.max())[0]
  w = np.asarray(cfg.weights)
  if cfg.mode == "reward_mixing":
    rewards = (rewards * w).sum(-1, keepdims=True)
    w = np.ones(1)
  K = rewards.shape[2]

  def descendants(i):
    out = []
    for leaf_pos, leaf in enumerate(leaf_ids):
      j = leaf
      while j >= 0:
        if j == i:
          out.append(leaf_pos)
          break
        j = parent[j]
    return out

  values = np.zeros((P, n, K))
  for p in range(P):
    for i in range(n):
      values[p, i] = rewards[p, descendants(i)].mean(0)
  adv = np.zeros((P, n, K))
  scope = "level" if cfg.scope == "leaf" else cfg.scope
  for p in range(P):
    for i in range(n):
      if scope == "level":
        group = [g for g in range(n) if level[g] == level[i]]
      else:
        group = [g for g in range(n) if parent[g] == parent[i]]
      mean = values[p, group].mean(0)
      if cfg.std == "group":
        sd = values[p, group].std(0)
      else:
        sd = values[:, level == level[i]].reshape(-1, K).std(0)
      adv[p, i] = (values[p, i] - mean) / (sd + cfg.eps)
  if cfg.scope == "leaf":
    leaf_adv = adv[:, leaf_ids]
    for p in range(P):
      for i in range(n):
        adv[p, i] = leaf_adv[p, descendants(i)].mean(0)
  nodes = (adv * w).sum(-1)
  trans = np.clip(nodes[:, spec.transition_node], -cfg.clip, cfg.clip)
  return nodes, trans


@pytest.mark.parametrize("seed", range(4))
def test_segment_reductions_equal_numpy_loops_on_random_trees(seed):
  rng = np.random.default_rng(seed)
  T = int(rng.integers(4, 8))
  num_branches = int(rng.integers(0, 3))
  branch_steps = tuple(sorted(rng.choice(T - 1, num_branches, replace=False).tolist()))
  factors = tuple(int(k) for k in rng.integers(1, 4, num_branches))
  spec = make_tree_spec(T, [1] * (T - 1) + [0], num_roots=int(rng.integers(1, 4)),
                        branch_steps=branch_steps, branch_factors=factors)
  P, K = int(rng.integers(1, 4)), 3
  rewards = (rng.standard_normal((P, spec.num_leaves, K)) * np.array([1, 10, 0.1])).astype(np.float32)
  for mode, scope, std in itertools.product(adv_lib.MODES, adv_lib.SCOPES, adv_lib.STDS):
    cfg = adv_lib.AdvantageConfig(mode=mode, scope=scope, std=std, weights=(1.0, 0.5, 2.0),
                                  clip=3.0)
    out = jax.jit(adv_lib.compute_advantages, static_argnums=(1, 2))(rewards, spec, cfg)
    nodes, trans = reference(rewards.astype(np.float64), spec, cfg)
    np.testing.assert_allclose(out.nodes, nodes, rtol=2e-4, atol=2e-4, err_msg=str(cfg))
    np.testing.assert_allclose(out.transitions, trans, rtol=2e-4, atol=2e-4, err_msg=str(cfg))


def test_prompt_history_equals_numpy_tracker():
  rng = np.random.default_rng(0)
  stats = adv_lib.init_prompt_stats(5, 2)
  history = {i: [] for i in range(5)}
  for _ in range(3):
    idx = rng.integers(0, 5, 3)
    r = rng.standard_normal((3, 4, 2)).astype(np.float32)
    stats, mean, std = jax.jit(adv_lib.update_prompt_stats)(stats, idx, r)
    for p, i in enumerate(idx):
      history[int(i)].extend(r[p])
    for p, i in enumerate(idx):
      h = np.array(history[int(i)])
      np.testing.assert_allclose(mean[p], h.mean(0), rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(std[p], h.std(0), rtol=1e-4, atol=1e-5)


def test_history_replaces_leaf_statistics():
  spec = make_tree_spec(3, [1, 1, 0], num_roots=2)
  rewards = np.array([[[1.0], [3.0]]], np.float32)
  mean, std = np.array([[0.0]], np.float32), np.array([[2.0]], np.float32)
  out = adv_lib.compute_advantages(rewards, spec, adv_lib.AdvantageConfig(std="group"),
                                   leaf_stats=(mean, std))
  np.testing.assert_allclose(out.nodes[0], [1 / (2 + EPS), 3 / (2 + EPS)], rtol=1e-6)


def test_bad_shapes_are_named():
  spec = hand_tree()
  with pytest.raises(ValueError, match="3 rewards but 1 weights"):
    adv_lib.compute_advantages(REWARDS, spec, adv_lib.AdvantageConfig())
  with pytest.raises(ValueError, match="leaves per prompt"):
    adv_lib.compute_advantages(REWARDS[:, :3], spec, adv_lib.AdvantageConfig(weights=(1, 1, 1)))
  with pytest.raises(ValueError, match="scope"):
    adv_lib.AdvantageConfig(scope="depth")
