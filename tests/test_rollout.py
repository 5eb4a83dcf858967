"""Tree and flat rollouts: structure, NFE, shared ancestors, flat equivalence, ratio = 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mgrpo_jax.sampling import rollout as rollout_lib
from mgrpo_jax.sampling import schedule, steps
from mgrpo_jax.sampling.tree import TreeSpec, make_tree_spec

LATENT = (2, 2, 3)
W = np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32) * 0.5


def toy_velocity(x, sigma, cond):
  """A prompt-dependent nonlinear 'model' acting per example (no cross-batch mixing)."""
  h = jnp.einsum("bhwc,cd->bhwd", x, W) + cond["bias"][:, None, None, :] * sigma[:, None, None, None]
  return jnp.tanh(h)


def conds(num_prompts):
  rng = np.random.default_rng(1)
  cond = {"bias": jnp.asarray(rng.standard_normal((num_prompts, 3)), jnp.float32)}
  neg = {"bias": jnp.zeros((num_prompts, 3), jnp.float32)}
  return cond, neg


def run(spec, sampler, key=0, num_prompts=2, velocity=toy_velocity):
  cond, neg = conds(num_prompts)
  sig = schedule.flow_match_sigmas(spec.num_steps, 3.0)
  fn = jax.jit(lambda k: rollout_lib.rollout(velocity, cond, neg, k, spec, sig, LATENT, sampler))
  return fn(jax.random.key(key))


def test_tree_structure_by_hand():
  # T=5, one root, branch x2 at step 1 and x2 at step 2.
  spec = make_tree_spec(5, [1, 1, 1, 1, 0], num_roots=1, branch_steps=(1, 2), branch_factors=(2, 2))
  assert spec.level_sizes == (1, 2, 4)
  np.testing.assert_array_equal(spec.parent, [-1, 0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(spec.leaf_ancestor, [[0, 1, 3], [0, 1, 4], [0, 2, 5], [0, 2, 6]])
  # Model runs: step 0 on the root (1), step 1 on the root before copying (1), step 2 on the two
  # level-1 nodes (2), steps 3, 4 on four leaves (8): 12, against 4 leaves x 5 steps = 20.
  assert spec.nfe == 12 and spec.nfe_independent == 20
  # Stored (SDE) steps: 0 (root), 1 (nodes 1, 2), 2 and 3 (leaves 3..6); step 4 is ODE.
  np.testing.assert_array_equal(spec.transition_step, [0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])
  np.testing.assert_array_equal(spec.transition_node, [0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6])


def test_spec_validation():
  with pytest.raises(ValueError, match="strictly increasing"):
    make_tree_spec(4, [1] * 4, num_roots=1, branch_steps=(2, 1), branch_factors=(2, 2))
  with pytest.raises(ValueError, match="not a stochastic"):
    make_tree_spec(4, [1, 0, 1, 0], num_roots=1, branch_steps=(1,), branch_factors=(2,))
  with pytest.raises(ValueError, match="same length"):
    make_tree_spec(4, [1] * 4, num_roots=1, branch_steps=(1,), branch_factors=(2, 2))


def test_nfe_counts_real_model_calls():
  spec = make_tree_spec(6, [1, 1, 1, 1, 1, 0], num_roots=2, branch_steps=(0, 3),
                        branch_factors=(3, 2))
  rows = []

  def counting_velocity(x, sigma, cond):
    rows.append(x.shape[0])
    return toy_velocity(x, sigma, cond)

  cond, _ = conds(2)
  sig = schedule.flow_match_sigmas(6, 3.0)
  with jax.disable_jit():  # scans run step by step, so every model call is seen
    rollout_lib.rollout(counting_velocity, cond, None, jax.random.key(0), spec, sig, LATENT,
                        rollout_lib.SamplerConfig(guidance_scale=1.0))
  # Hand count per prompt: step 0 branches the 2 roots (2 rows), steps 1-2 run 6 nodes (12),
  # step 3 branches 6 nodes (6), steps 4-5 run 12 leaves (24): 44.
  assert sum(rows) == 2 * 44 == 2 * spec.nfe


def test_siblings_share_ancestor_latents_and_chain_is_consistent():
  spec = make_tree_spec(5, [1, 1, 1, 1, 0], num_roots=2, branch_steps=(1, 3), branch_factors=(2, 3))
  r = run(spec, rollout_lib.SamplerConfig(guidance_scale=2.0))
  steps_, nodes = spec.transition_step, spec.transition_node
  lat, nxt = np.asarray(r.latents), np.asarray(r.next_latents)
  parent = spec.parent
  for p in range(2):
    by_key = {(int(s), int(n)): m for m, (s, n) in enumerate(zip(steps_, nodes))}
    for (s, n), m in by_key.items():
      if (s + 1, n) in by_key:  # same node continues
        np.testing.assert_array_equal(lat[p, by_key[(s + 1, n)]], nxt[p, m])
      for child in np.nonzero(parent == n)[0]:
        if (s + 1, int(child)) in by_key:  # branch: each child starts from the parent's latent
          np.testing.assert_array_equal(lat[p, by_key[(s + 1, int(child))]], nxt[p, m])
    # Siblings created at step 1 start from one latent but draw different noise.
    m1, m2 = by_key[(1, 2)], by_key[(1, 3)]
    assert parent[2] == parent[3]
    np.testing.assert_array_equal(lat[p, m1], lat[p, m2])
    assert np.abs(nxt[p, m1] - nxt[p, m2]).max() > 1e-3
  # Leaves descending from one level-1 node share its latent at step 3 (before branching).
  assert r.final_latents.shape == (2, 12) + LATENT


@pytest.mark.parametrize("same_latent", [False, True])
def test_unit_factors_equal_flat(same_latent):
  sampler = rollout_lib.SamplerConfig(guidance_scale=3.0, same_latent=same_latent)
  mask = [1, 1, 1, 1, 0]
  flat = run(TreeSpec(5, 3, (), (), tuple(map(bool, mask))), sampler, key=7)
  tree = run(make_tree_spec(5, mask, num_roots=3, branch_steps=(1, 3), branch_factors=(1, 1)),
             sampler, key=7)
  # Same noise, same model; only the split of the scan differs (float rounding of fusions).
  np.testing.assert_allclose(tree.final_latents, flat.final_latents, atol=1e-5)
  np.testing.assert_allclose(np.sort(tree.log_probs, 1), np.sort(flat.log_probs, 1), atol=1e-5)
  if same_latent:
    np.testing.assert_array_equal(flat.latents[:, 0], flat.latents[:, 1])


def rescore(r, spec, sampler, num_prompts=2, velocity=toy_velocity):
  """Re-scores every stored transition as the train step does: model on the stored latents."""
  cond, neg = conds(num_prompts)
  sig = jnp.asarray(schedule.flow_match_sigmas(spec.num_steps, 3.0))
  m = r.latents.shape[1]
  flat = lambda a: a.reshape((-1,) + a.shape[2:])
  x, nxt, st = flat(r.latents), flat(r.next_latents), flat(r.steps)
  prompt = jnp.repeat(jnp.arange(num_prompts), m)
  take = lambda c: jax.tree.map(lambda a: a[prompt], c)
  v = rollout_lib.guided_velocity(velocity, x, sig[st], take(cond), take(neg),
                                  sampler.guidance_scale)
  out = steps.step_with_logprob(sampler.method, v, x, sig[st], sig[st + 1],
                                noise_level=sampler.noise_level, sigma_max=sig[1],
                                prev_sample=nxt, cps_logprob=sampler.cps_logprob)
  return out.log_prob.reshape(num_prompts, m)


@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("guidance", [1.0, 4.5])
@pytest.mark.parametrize("method", ["sde", "cps"])
def test_ratio_is_one_before_any_update(tree, guidance, method):
  mask = [1, 1, 1, 1, 1, 0]
  spec = (make_tree_spec(6, mask, num_roots=2, branch_steps=(0, 2), branch_factors=(2, 2)) if tree
          else make_tree_spec(6, mask, num_roots=4))
  sampler = rollout_lib.SamplerConfig(method=method, guidance_scale=guidance,
                                      cps_logprob="exact" if method == "cps" else "flow_grpo")
  r = run(spec, sampler)
  new = jax.jit(lambda r: rescore(r, spec, sampler))(r)
  ratio = np.exp(np.asarray(new) - np.asarray(r.log_probs))
  # The model runs on a different batch (parents vs copies, all steps at once), so only float32
  # rounding may differ; the ratio is 1 to that precision.
  np.testing.assert_allclose(ratio, 1.0, atol=2e-5)


def test_one_and_eight_devices_agree():
  assert jax.device_count() >= 8, "tests/conftest.py sets 8 simulated CPU devices"
  spec = make_tree_spec(5, [1, 1, 1, 1, 0], num_roots=2, branch_steps=(1, 2), branch_factors=(2, 2))
  sampler = rollout_lib.SamplerConfig(guidance_scale=4.5)
  cond, neg = conds(8)
  sig = schedule.flow_match_sigmas(5, 3.0)
  fn = lambda c, n, k: rollout_lib.rollout(toy_velocity, c, n, k, spec, sig, LATENT, sampler)
  single = jax.jit(fn)(cond, neg, jax.random.key(3))
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  shard = NamedSharding(mesh, P("data"))
  cond_s, neg_s = jax.device_put((cond, neg), shard)
  out_sh = jax.tree.map(lambda _: shard, single)
  multi = jax.jit(fn, out_shardings=out_sh)(cond_s, neg_s, jax.random.key(3))
  assert len(multi.latents.sharding.device_set) == 8
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(multi)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
