"""Static structure of a rollout tree: levels, parents, leaf ancestry and stored transitions.

Every prompt gets the same tree, fixed by the config, so all index arrays here are numpy and
become constants under jit (static shapes, no data-dependent control flow).

Levels and nodes (per prompt):
  level 0 holds `num_roots` roots, each starting from its own initial noise;
  level j >= 1 is created at `branch_steps[j-1]`, where every level-(j-1) node is copied
  `branch_factors[j-1]` times and each copy takes its own stochastic transition;
  the last level's nodes are the leaves (the images that get rewards).
Nodes are numbered level by level (level offsets), and inside a level in "repeat order": the
children of node i of the previous level are i*k .. i*k + k - 1, which is what `jnp.repeat` of
the live batch produces, so the numbering needs no bookkeeping at run time.

A node *owns* the denoising steps from its creation step up to the next branch step; its
transitions are trained with that node's advantage. A flat (Flow-GRPO) rollout is the tree with
no branch steps and `num_roots = G`.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from mgrpo_jax.sampling import schedule


@dataclasses.dataclass(frozen=True)
class TreeSpec:
  """Shape of the rollout tree (hashable; a static argument of jitted functions).

  Attributes:
    num_steps: T denoising steps.
    num_roots: initial noises per prompt.
    branch_steps: increasing step indices in [0, T) where every live node branches.
    branch_factors: copies per node at each branch step (>= 1).
    sde_steps: per step, whether it is stochastic (stored and trained) or an ODE step.
  """

  num_steps: int
  num_roots: int
  branch_steps: tuple[int, ...] = ()
  branch_factors: tuple[int, ...] = ()
  sde_steps: tuple[bool, ...] = ()

  def __post_init__(self):
    T = self.num_steps
    if T < 1:
      raise ValueError(f"num_steps must be >= 1, got {T}")
    if self.num_roots < 1:
      raise ValueError(f"num_roots must be >= 1, got {self.num_roots}")
    if len(self.branch_steps) != len(self.branch_factors):
      raise ValueError(f"branch_steps {self.branch_steps} and branch_factors "
                       f"{self.branch_factors} must have the same length")
    if any(b2 <= b1 for b1, b2 in zip(self.branch_steps, self.branch_steps[1:])):
      raise ValueError(f"branch_steps must be strictly increasing, got {self.branch_steps}")
    if any(not 0 <= b < T for b in self.branch_steps):
      raise ValueError(f"branch_steps {self.branch_steps} must lie in [0, num_steps={T})")
    if any(k < 1 for k in self.branch_factors):
      raise ValueError(f"branch_factors must be >= 1, got {self.branch_factors}")
    if len(self.sde_steps) != T:
      raise ValueError(f"sde_steps has {len(self.sde_steps)} entries, expected num_steps={T}")
    for b, k in zip(self.branch_steps, self.branch_factors):
      if k > 1 and not self.sde_steps[b]:
        # Copies of a node that take the same deterministic step stay identical.
        raise ValueError(f"branch step {b} (factor {k}) is not a stochastic (SDE) step; "
                         f"move it into the SDE window or set its factor to 1")

  # ---- levels -------------------------------------------------------------------------------
  @property
  def num_levels(self) -> int:
    return len(self.branch_steps) + 1

  @functools.cached_property
  def level_sizes(self) -> tuple[int, ...]:
    """Nodes per prompt at each level: n_0 = num_roots, n_j = n_{j-1} * k_j."""
    sizes = [self.num_roots]
    for k in self.branch_factors:
      sizes.append(sizes[-1] * k)
    return tuple(sizes)

  @functools.cached_property
  def level_offsets(self) -> tuple[int, ...]:
    return tuple(int(o) for o in np.cumsum((0,) + self.level_sizes[:-1]))

  @property
  def num_nodes(self) -> int:
    return sum(self.level_sizes)

  @property
  def num_leaves(self) -> int:
    return self.level_sizes[-1]

  @functools.cached_property
  def segments(self) -> tuple[tuple[int, int, int], ...]:
    """(level, start_step, stop_step): level j is live on steps [start, stop)."""
    bounds = (0,) + self.branch_steps + (self.num_steps,)
    return tuple((j, bounds[j], bounds[j + 1]) for j in range(self.num_levels))

  # ---- node arrays --------------------------------------------------------------------------
  @functools.cached_property
  def node_level(self) -> np.ndarray:
    """int32 [num_nodes]."""
    return np.concatenate([np.full(n, j, np.int32) for j, n in enumerate(self.level_sizes)])

  @functools.cached_property
  def parent(self) -> np.ndarray:
    """int32 [num_nodes]: global id of each node's parent, -1 for roots."""
    parents = [np.full(self.num_roots, -1, np.int32)]
    for j, k in enumerate(self.branch_factors, start=1):
      local = np.arange(self.level_sizes[j]) // k
      parents.append((self.level_offsets[j - 1] + local).astype(np.int32))
    return np.concatenate(parents)

  @functools.cached_property
  def leaf_ancestor(self) -> np.ndarray:
    """int32 [num_leaves, num_levels]: global id of each leaf's ancestor at every level.

    Column num_levels - 1 is the leaf itself. Children are contiguous blocks, so the ancestor
    at level j of leaf l is l // (n_J / n_j) inside level j.
    """
    leaves = np.arange(self.num_leaves)
    cols = [self.level_offsets[j] + leaves // (self.num_leaves // n)
            for j, n in enumerate(self.level_sizes)]
    return np.stack(cols, axis=1).astype(np.int32)

  # ---- transitions --------------------------------------------------------------------------
  @functools.cached_property
  def stored_steps_per_segment(self) -> tuple[tuple[int, ...], ...]:
    """For each segment, the steps whose transitions are stored (the SDE steps)."""
    return tuple(tuple(s for s in range(a, b) if self.sde_steps[s]) for _, a, b in self.segments)

  @functools.cached_property
  def transition_step(self) -> np.ndarray:
    """int32 [M]: step index of each stored transition, ordered (segment, step, node)."""
    out = [np.repeat(np.asarray(steps, np.int32), self.level_sizes[j])
           for (j, _, _), steps in zip(self.segments, self.stored_steps_per_segment)]
    return np.concatenate(out) if out else np.zeros([0], np.int32)

  @functools.cached_property
  def transition_node(self) -> np.ndarray:
    """int32 [M]: global id of the node that owns each stored transition."""
    out = [np.tile(self.level_offsets[j] + np.arange(self.level_sizes[j], dtype=np.int32),
                   len(steps))
           for (j, _, _), steps in zip(self.segments, self.stored_steps_per_segment)]
    return np.concatenate(out).astype(np.int32)

  @property
  def num_transitions(self) -> int:
    """M, stored transitions per prompt."""
    return int(self.transition_step.shape[0])

  # ---- cost ---------------------------------------------------------------------------------
  @property
  def nfe(self) -> int:
    """Model evaluations per prompt (a CFG pair counts once).

    At a branch step the k copies share their parent's latent, so the model runs on the parents;
    every other step runs on the live nodes.
    """
    total = 0
    for j, start, stop in self.segments:
      if stop == start:
        continue
      first = self.level_sizes[j - 1] if j > 0 else self.level_sizes[0]
      total += first + (stop - start - 1) * self.level_sizes[j]
    return total

  @property
  def nfe_independent(self) -> int:
    """Model evaluations per prompt of independent trajectories with as many leaves."""
    return self.num_leaves * self.num_steps


def make_tree_spec(num_steps: int, sde_steps, *, num_roots: int, branch_steps=(),
                   branch_factors=()) -> TreeSpec:
  """TreeSpec from config values (lists become tuples so the spec stays hashable)."""
  return TreeSpec(num_steps=int(num_steps), num_roots=int(num_roots),
                  branch_steps=tuple(int(b) for b in branch_steps),
                  branch_factors=tuple(int(k) for k in branch_factors),
                  sde_steps=tuple(bool(s) for s in sde_steps))


def tree_spec_from_config(config, window=None) -> TreeSpec:
  """The rollout shape of a run's ConfigDict; `window` (start, stop) overrides
  `sample.sde_window`.

  With a moving window (`sample.sde_window_mode` other than "fixed") the default is the first
  iteration's window.
  """
  T = config.sample.num_steps
  mode = config.sample.get("sde_window_mode", "fixed")
  if window is None and mode != "fixed":
    window = schedule.moving_window(
        0, mode=mode, size=config.sample.sde_window_size,
        window_range=tuple(config.sample.sde_window_range), num_steps=T, seed=config.seed,
        every=config.sample.sde_window_every)
  window = tuple(config.sample.sde_window if window is None else window)
  mask = schedule.sde_step_mask(T, None if window == (-1, -1) else window)
  if config.tree.mode == "flat":
    return make_tree_spec(T, mask, num_roots=config.tree.group_size)
  if config.tree.mode == "tree":
    return make_tree_spec(T, mask, num_roots=config.tree.num_roots,
                          branch_steps=config.tree.branch_steps,
                          branch_factors=config.tree.branch_factors)
  raise ValueError(f"tree.mode must be 'tree' or 'flat', got {config.tree.mode!r}")
