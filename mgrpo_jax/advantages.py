"""Advantages of Multi-GRPO: leaf (GRPO) groups, temporal groups of a tree, reward groups.

All reductions are segment sums over integer group ids (`jax.ops.segment_sum`), so one jitted
function handles any batch of identical trees with static shapes and no Python loops over data.

Definitions (P prompts, L leaves per prompt, K rewards, TreeSpec numbering of nodes):
  value of a node, per reward   = mean reward of its descendant leaves;
  temporal group of a node      = the nodes of its level for the same prompt (scope "level", the
                                  default: the N_j nodes created at step j, over all roots), or
                                  the node's siblings (scope "siblings");
  advantage of a node           = (value - group mean) / (std + eps), std either over the whole
                                  gathered batch at that level (Flow-GRPO's global_std, default)
                                  or inside the group;
  reward groups (default)       = normalise each reward separately, then combine with weights;
  reward mixing (baseline)      = combine raw rewards with weights, then normalise once;
  advantage of a transition     = advantage of the node that owns it (leaves own the steps after
                                  the last branch step, so those use the leaf advantage), clipped
                                  to [-clip, clip].
Pruning (BranchGRPO, arXiv 2509.06040; both only set `keep`, the loss weight of transitions):
  branch pruning                = a branching whose children's values spread by less than
                                  `prune_spread` trains none of those children's transitions;
  level selection               = only the transitions of `train_levels` are trained.
A flat rollout is a tree with one level, where this is exactly Flow-GRPO's per-prompt GRPO.
Scope "leaf" turns temporal groups off: a node's advantage is then the mean of its leaves'
advantages (every transition of a trajectory shares the trajectory's credit).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mgrpo_jax.sampling.tree import TreeSpec

MODES = ("reward_groups", "reward_mixing")
SCOPES = ("level", "siblings", "leaf")
STDS = ("global", "group")


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
  """Static advantage settings (hashable).

  Attributes:
    mode: "reward_groups" (normalise per reward, then combine) or "reward_mixing".
    scope: temporal group scope, "level", "siblings" or "leaf" (no temporal groups).
    std: "global" (whole batch, per level) or "group".
    eps: added to the std.
    clip: advantages are clipped to [-clip, clip].
    weights: one weight per reward, in the order of the rewards' last axis.
    drop_zero_groups: give zero loss weight to transitions whose group's advantages are all 0
      (e.g. every image of a prompt got the same reward), as Flow-GRPO filters such groups.
    prune_spread: BranchGRPO-style branch pruning (0 = off). A branching (the children of one
      parent, or a prompt's roots) whose node values differ by less than this (max - min over
      the siblings, in reward units, for every reward) told the policy nothing; its nodes'
      transitions get zero loss weight. A single root is such a branching. Their advantages
      would be noise amplified by the group std.
    train_levels: tree levels whose transitions are trained (BranchGRPO's depth selection);
      () = all. Level 0 holds the roots' steps, level j the steps from branch step j-1 on.
  """

  mode: str = "reward_groups"
  scope: str = "level"
  std: str = "global"
  eps: float = 1e-4
  clip: float = 5.0
  weights: tuple[float, ...] = (1.0,)
  drop_zero_groups: bool = False
  prune_spread: float = 0.0
  train_levels: tuple[int, ...] = ()

  def __post_init__(self):
    for name, value, allowed in (("mode", self.mode, MODES), ("scope", self.scope, SCOPES),
                                 ("std", self.std, STDS)):
      if value not in allowed:
        raise ValueError(f"advantage {name} {value!r} unknown; expected one of {allowed}")
    if self.clip <= 0:
      raise ValueError(f"advantage clip must be > 0, got {self.clip}")
    if not self.prune_spread >= 0:
      raise ValueError(f"advantage prune_spread must be >= 0 (0 = off), got {self.prune_spread}")
    levels = tuple(self.train_levels)
    if any(int(j) != j or j < 0 for j in levels) or len(set(levels)) != len(levels):
      raise ValueError(f"advantage train_levels must be distinct levels >= 0, got {levels}")

  @classmethod
  def from_config(cls, config) -> AdvantageConfig:
    """The `config.advantage` group (and `reward.weights`, `tree.mode`) of a run's ConfigDict."""
    if len(config.reward.names) != len(config.reward.weights):
      raise ValueError(f"reward.names {tuple(config.reward.names)} and reward.weights "
                       f"{tuple(config.reward.weights)} must have the same length")
    std = config.advantage.std
    if std == "auto":  # the paper's per-group std for trees, Flow-GRPO's global std when flat
      std = "group" if config.tree.mode == "tree" else "global"
    return cls(
        mode=config.advantage.mode, scope=config.advantage.scope, std=std,
        eps=float(config.advantage.eps), clip=float(config.advantage.clip),
        weights=tuple(float(w) for w in config.reward.weights),
        drop_zero_groups=bool(config.advantage.drop_zero_groups),
        prune_spread=float(config.advantage.prune_spread),
        train_levels=tuple(int(j) for j in config.advantage.train_levels))

  def check_tree(self, spec: TreeSpec) -> None:
    """Raises ValueError if the settings do not fit the tree `spec`."""
    bad = [j for j in self.train_levels if j >= spec.num_levels]
    if bad:
      raise ValueError(f"advantage train_levels {tuple(self.train_levels)}: the tree has levels "
                       f"0..{spec.num_levels - 1} only (levels {bad} do not exist)")


# ---- segment primitives ------------------------------------------------------------------------
def segment_mean(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """Mean of `values` [N, ...] per segment -> [num_segments, ...] (0 for empty segments)."""
  sums = jax.ops.segment_sum(values, segment_ids, num_segments)
  counts = jax.ops.segment_sum(jnp.ones(values.shape[:1], values.dtype), segment_ids, num_segments)
  counts = counts.reshape(counts.shape + (1,) * (values.ndim - 1))
  return sums / jnp.maximum(counts, 1)


def segment_std(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """Population std of `values` [N, ...] per segment -> [num_segments, ...]."""
  mean = segment_mean(values, segment_ids, num_segments)[segment_ids]
  return jnp.sqrt(segment_mean((values - mean)**2, segment_ids, num_segments))


def group_normalize(values: jax.Array, group_ids: jax.Array, num_groups: int,
                    std_ids: jax.Array, num_std_groups: int, eps: float) -> jax.Array:
  """(v - mean of v's group) / (std of v's std-population + eps), column-wise.

  Args:
    values: [N, K]; each column (reward) is normalised independently.
    group_ids: int [N] in [0, num_groups): whose mean is subtracted.
    std_ids: int [N] in [0, num_std_groups): whose std divides; equal to group_ids for per-group
      std, or coarser (e.g. one id for the whole batch) for a global std.
    eps: added to the std.
  """
  centered = values - segment_mean(values, group_ids, num_groups)[group_ids]
  # A group whose values are all equal (a single node, or identical rewards) has advantage 0
  # exactly; rounding in its mean would otherwise be amplified by 1 / eps.
  spread = (jax.ops.segment_max(values, group_ids, num_groups)
            - jax.ops.segment_min(values, group_ids, num_groups))[group_ids]
  centered = jnp.where(spread > 0, centered, 0.0)
  return centered / (segment_std(values, std_ids, num_std_groups)[std_ids] + eps)


# ---- per-prompt history (Flow-GRPO's per-prompt stat tracker, as a pure function) --------------
class PromptStats(NamedTuple):
  """Running reward moments per dataset prompt: count [N], sum [N, K], sum of squares [N, K]."""

  count: jax.Array
  total: jax.Array
  total_sq: jax.Array


def init_prompt_stats(num_prompts: int, num_rewards: int) -> PromptStats:
  return PromptStats(jnp.zeros([num_prompts], jnp.float32),
                     jnp.zeros([num_prompts, num_rewards], jnp.float32),
                     jnp.zeros([num_prompts, num_rewards], jnp.float32))


def update_prompt_stats(stats: PromptStats, prompt_index: jax.Array,
                        rewards: jax.Array) -> tuple[PromptStats, jax.Array, jax.Array]:
  """Adds a batch to the history and returns the history's mean and std per batch prompt.

  Args:
    stats: history over the dataset's prompts.
    prompt_index: int32 [P], dataset index of each batch prompt (may repeat).
    rewards: [P, L, K] leaf rewards.

  Returns:
    (new stats, mean [P, K], std [P, K]) of all rewards seen for each prompt, this batch included.
  """
  n = stats.count.shape[0]
  count = stats.count + jax.ops.segment_sum(
      jnp.full(prompt_index.shape, rewards.shape[1], jnp.float32), prompt_index, n)
  total = stats.total + jax.ops.segment_sum(rewards.sum(1), prompt_index, n)
  total_sq = stats.total_sq + jax.ops.segment_sum((rewards**2).sum(1), prompt_index, n)
  new = PromptStats(count, total, total_sq)
  c = jnp.maximum(count[prompt_index], 1.0)[:, None]
  mean = total[prompt_index] / c
  var = jnp.maximum(total_sq[prompt_index] / c - mean**2, 0.0)
  return new, mean, jnp.sqrt(var)


# ---- tree advantages ---------------------------------------------------------------------------
def node_values(rewards: jax.Array, spec: TreeSpec) -> jax.Array:
  """Mean reward of each node's descendant leaves.

  Args:
    rewards: [P, L, K] leaf rewards.
    spec: the tree.

  Returns:
    [P, num_nodes, K], node values in TreeSpec numbering.
  """
  num_prompts, num_leaves, num_rewards = rewards.shape
  if num_leaves != spec.num_leaves:
    raise ValueError(f"rewards have {num_leaves} leaves per prompt, the tree has {spec.num_leaves}")
  n_nodes = spec.num_nodes
  # Every leaf contributes to one node per level: one segment sum over (prompt, node) ids.
  ancestors = jnp.asarray(spec.leaf_ancestor)  # [L, J+1]
  ids = (jnp.arange(num_prompts)[:, None, None] * n_nodes + ancestors[None]).reshape(-1)
  contrib = jnp.repeat(rewards[:, :, None, :], spec.num_levels, axis=2).reshape(-1, num_rewards)
  values = segment_mean(contrib, ids, num_prompts * n_nodes)
  return values.reshape(num_prompts, n_nodes, num_rewards)


def _group_ids(spec: TreeSpec, scope: str, num_prompts: int) -> tuple[np.ndarray, int]:
  """Static temporal-group id of every (prompt, node): [P, N] and the number of groups.

  Groups never mix levels: each level has its own id range, so one normalisation call covers
  all levels.
  """
  num_levels = spec.num_levels
  if scope == "siblings":
    # Siblings share a parent; roots (no parent) form one group per prompt.
    parent = spec.parent
    per_prompt = np.where(parent < 0, spec.num_nodes, parent)  # roots -> an id past all nodes
    groups_per_prompt = spec.num_nodes + 1
  else:
    per_prompt = spec.node_level.astype(np.int64)
    groups_per_prompt = num_levels
  ids = np.arange(num_prompts)[:, None] * groups_per_prompt + per_prompt[None, :]
  return ids.astype(np.int32), num_prompts * groups_per_prompt


def _normalize_per_level(values: jax.Array, spec: TreeSpec, cfg: AdvantageConfig,
                         leaf_stats: tuple[jax.Array, jax.Array] | None) -> jax.Array:
  """values [P, N, K] -> normalised [P, N, K] inside temporal groups (see module docstring)."""
  num_prompts, n_nodes, k = values.shape
  scope = "level" if cfg.scope == "leaf" else cfg.scope
  ids, num_groups = _group_ids(spec, scope, num_prompts)
  ids = jnp.asarray(ids.reshape(-1))
  if cfg.std == "group":
    std_ids, num_std = ids, num_groups
  else:
    # Global std is taken per level over the whole batch: levels are different populations.
    std_ids, num_std = jnp.asarray(np.tile(spec.node_level, num_prompts)), spec.num_levels
  adv = group_normalize(values.reshape(-1, k), ids, num_groups, std_ids, num_std, cfg.eps)
  adv = adv.reshape(num_prompts, n_nodes, k)
  if leaf_stats is not None:
    # Per-prompt history replaces the batch statistics of the leaf level.
    hist_mean, hist_std = leaf_stats  # [P, K]
    off = spec.level_offsets[-1]
    leaves = values[:, off:]
    scale = (jnp.std(leaves.reshape(-1, k), axis=0) if cfg.std == "global" else hist_std[:, None])
    adv = adv.at[:, off:].set((leaves - hist_mean[:, None]) / (scale + cfg.eps))
  if cfg.scope == "leaf":
    # No temporal groups: a node's advantage is the mean of its leaves' advantages.
    adv = node_values(adv[:, spec.level_offsets[-1]:], spec)
  return adv


def stats_rewards(rewards: jax.Array, cfg: AdvantageConfig) -> jax.Array:
  """The per-leaf quantities whose per-prompt history is tracked: [P, L, K] or mixed [P, L, 1]."""
  if cfg.mode == "reward_mixing":
    return (rewards * jnp.asarray(cfg.weights, jnp.float32)).sum(-1, keepdims=True)
  return rewards


def informative_branches(values: jax.Array, spec: TreeSpec, min_spread: float) -> jax.Array:
  """Which nodes belong to a branching whose values spread by at least `min_spread`.

  Args:
    values: [P, N, K] node values (`node_values`).
    spec: the tree.
    min_spread: threshold on max - min over siblings, per reward.

  Returns:
    [P, N] float32, 1 where some reward's spread over the node's siblings (the children of its
    parent; the prompt's roots for level 0) is >= min_spread, else 0.
  """
  num_prompts, n_nodes, k = values.shape
  ids, num_groups = _group_ids(spec, "siblings", num_prompts)
  ids = jnp.asarray(ids.reshape(-1))
  flat = values.reshape(-1, k)
  spread = (jax.ops.segment_max(flat, ids, num_groups)
            - jax.ops.segment_min(flat, ids, num_groups))  # [groups, K]
  informative = (spread >= min_spread).any(-1).astype(jnp.float32)
  return informative[ids].reshape(num_prompts, n_nodes)


def level_mask(spec: TreeSpec, levels: tuple[int, ...]) -> np.ndarray:
  """[N] float32 constant: 1 for nodes on `levels` (all nodes if levels is empty)."""
  if not levels:
    return np.ones([spec.num_nodes], np.float32)
  return np.isin(spec.node_level, np.asarray(levels)).astype(np.float32)


class Advantages(NamedTuple):
  """Output of `compute_advantages`.

  Attributes:
    transitions: [P, M] float32, clipped advantage of each stored transition.
    nodes: [P, N] float32, combined (unclipped) advantage of each node.
    values: [P, N, K] float32, node values per reward.
    keep: [P, M] float32, 1 for transitions to train, 0 for dropped zero-advantage groups,
      pruned branches and levels outside `train_levels`.
  """

  transitions: jax.Array
  nodes: jax.Array
  values: jax.Array
  keep: jax.Array


def compute_advantages(rewards: jax.Array, spec: TreeSpec, cfg: AdvantageConfig,
                       leaf_stats: tuple[jax.Array, jax.Array] | None = None) -> Advantages:
  """Multi-GRPO advantages of every stored transition of a batch of trees.

  Args:
    rewards: [P, L, K] float32 leaf rewards (K rewards, in the order of cfg.weights).
    spec: tree shape (static).
    cfg: advantage settings (static).
    leaf_stats: optional (mean [P, K'], std [P, K']) from `update_prompt_stats` on
      `stats_rewards(rewards, cfg)`, replacing the batch statistics of the leaf groups
      (Flow-GRPO's per-prompt history). K' = K, or 1 with reward mixing.

  Returns:
    Advantages.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 3:
    raise ValueError(f"rewards must be [prompts, leaves, rewards], got shape {rewards.shape}")
  if rewards.shape[2] != len(cfg.weights):
    raise ValueError(f"{rewards.shape[2]} rewards but {len(cfg.weights)} weights {cfg.weights}")
  rewards = stats_rewards(rewards, cfg)
  weights = (jnp.ones([1], jnp.float32) if cfg.mode == "reward_mixing"
             else jnp.asarray(cfg.weights, jnp.float32))
  values = node_values(rewards, spec)
  per_reward = _normalize_per_level(values, spec, cfg, leaf_stats)
  node_adv = (per_reward * weights).sum(-1)  # [P, N]
  trans_nodes = jnp.asarray(spec.transition_node)
  trans_adv = jnp.clip(node_adv[:, trans_nodes], -cfg.clip, cfg.clip)
  keep_node = jnp.ones_like(node_adv)
  if cfg.drop_zero_groups:
    ids, num_groups = _group_ids(spec, "level" if cfg.scope == "leaf" else cfg.scope,
                                 rewards.shape[0])
    ids = jnp.asarray(ids.reshape(-1))
    nonzero = jax.ops.segment_max((jnp.abs(node_adv) > 1e-6).reshape(-1).astype(jnp.float32),
                                  ids, num_groups)
    keep_node = keep_node * nonzero[ids].reshape(node_adv.shape)
  if cfg.prune_spread > 0:
    keep_node = keep_node * informative_branches(values, spec, cfg.prune_spread)
  if cfg.train_levels:
    cfg.check_tree(spec)
    keep_node = keep_node * jnp.asarray(level_mask(spec, tuple(cfg.train_levels)))[None]
  keep = keep_node[:, trans_nodes]
  return Advantages(trans_adv, node_adv, values, keep)
