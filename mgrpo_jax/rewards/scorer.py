"""Every configured reward of a batch of images, wherever each runs: host pool or device.

  scorer = RewardScorer(config.reward, mesh)
  scores = scorer.score(images, prompts, metadata)   # {name: float32 [N]} in config order
  scorer.close()

Each reward's registry entry declares where it runs (`rewards.register(name, placement)`):
learned rewards (placement "device": PickScore, CLIP score, aesthetic, rewards/device.py) run
on the device mesh next to the policy; the rest (OCR, text colour, JPEG size: "host"; reward
servers: "remote") in the host pool.
The trainer calls `submit` on each sampled batch (device rewards queue behind the sampling, host
rewards start in the pool, both overlapping the next batch's sampling) and later `result()`,
rewards [p, L, K] in config order; evaluation and sampling scripts call `score`. Non-finite
scores are errors naming the reward and prompt.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax.rewards import base as base_lib
from mgrpo_jax.rewards.host import HostRewards, RewardError


class RewardScorer:
  """The rewards of `reward_config.names`, split by where they run.

  Attributes:
    names: reward names in config order.
    device: name -> `DeviceReward` for the learned rewards (called on global image batches).
    host: `HostRewards` for the others, or None if there are none.
  """

  def __init__(self, reward_config, mesh, names: Sequence[str] | None = None):
    self.names = tuple(reward_config.names if names is None else names)
    self.mesh = mesh
    # Each reward's registry entry says where it runs (rewards/base.py `placement`).
    self.device = {name: base_lib.get_reward(name, reward_config=reward_config, mesh=mesh)
                   for name in self.names if base_lib.placement(name) == "device"}
    host = {name: {} for name in self.names if name not in self.device}
    self.host = (HostRewards(host, max_workers=reward_config.num_workers,
                             pool=reward_config.get("pool", "thread")) if host else None)

  def device_scores(self, device_scores: Mapping[str, Any],
                    flat_prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """This process's rows of device reward outputs, float32 [n] each, checked to be finite."""
    out = {}
    for name, value in device_scores.items():
      value = sharding_lib.local_rows(value).reshape(-1).astype(np.float32)
      bad = np.flatnonzero(~np.isfinite(value))
      if bad.size:
        raise RewardError(
            f"reward {name!r} returned {value[bad[0]]} for image {int(bad[0])} (prompt "
            f"{flat_prompts[bad[0]]!r}); refusing to train on it")
      out[name] = value
    return out

  def submit(self, images, local_images: np.ndarray, prompts: Sequence[str],
             metadata: Sequence[Mapping[str, Any]]) -> "PendingScores":
    """Starts scoring one sampled batch, wherever each reward runs, and returns at once.

    Device rewards are queued on the device behind the batch's sampling; host rewards start
    in the pool on this process's rows, so both overlap the next batch's sampling.

    Args:
      images: the batch's global device array uint8 [P, L, H, W, 3].
      local_images: this process's rows of it on the host, uint8 [p, L, H, W, 3].
      prompts, metadata: this process's p prompts and their metadata.

    Returns:
      A handle whose `result()` is float32 [p, L, K], rewards in config order (it raises
      RewardError naming the reward and prompt for a failed or non-finite score).
    """
    L = local_images.shape[1]
    flat_prompts = [p for p in prompts for _ in range(L)]
    device = {name: r(images, list(prompts)) for name, r in self.device.items()}
    host = None
    if self.host is not None:
      host = self.host.submit(local_images.reshape((-1,) + local_images.shape[2:]), flat_prompts,
                              [dict(m) for m in metadata for _ in range(L)])
    return PendingScores(self, host, device, flat_prompts, L)

  def score(self, images: np.ndarray, prompts: Sequence[str],
            metadata: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Every reward of host images uint8 [N, H, W, 3]: {name: float32 [N]} in config order.

    Device rewards see the batch padded with its last image to a multiple of the data-parallel
    size; the padding rows are dropped from the result.
    """
    scores = self.host.score(images, prompts, metadata) if self.host is not None else {}
    if self.device:
      n = len(prompts)
      pad = -n % sharding_lib.batch_size_multiple(self.mesh)
      padded = np.concatenate([images, np.repeat(images[-1:], pad, 0)])[:, None]
      padded_prompts = list(prompts) + [prompts[-1]] * pad
      global_images = sharding_lib.global_batch(padded, self.mesh)
      device = {name: r(global_images, padded_prompts) for name, r in self.device.items()}
      for name, value in self.device_scores(device, padded_prompts).items():
        scores[name] = value[:n]
    return {name: scores[name] for name in self.names}

  def close(self) -> None:
    if self.host is not None:
      self.host.close()


class PendingScores:
  """The rewards of one batch being computed (`RewardScorer.submit`)."""

  def __init__(self, scorer: RewardScorer, host, device, flat_prompts, leaves: int):
    self._scorer, self._host, self._device = scorer, host, device
    self._flat_prompts, self._leaves = flat_prompts, leaves

  def result(self) -> np.ndarray:
    """Waits for every reward: float32 [p, L, K] in config order."""
    scores = self._host.result() if self._host is not None else {}
    scores.update(self._scorer.device_scores(self._device, self._flat_prompts))
    per_reward = np.stack([np.asarray(scores[n], np.float32) for n in self._scorer.names], -1)
    return per_reward.reshape(-1, self._leaves, len(self._scorer.names))
