"""Every configured reward of a batch of images, wherever each runs: host pool or device.

  scorer = RewardScorer(config.reward, mesh)
  scores = scorer.score(images, prompts, metadata)   # {name: float32 [N]} in config order
  scorer.close()

Learned rewards (`rewards.device`: PickScore, CLIP score, aesthetic) run on the device mesh
next to the policy; the rest (OCR, text colour, JPEG size, remote servers) in a host thread pool.
The trainer uses the two halves separately so that host rewards overlap the next batch's
sampling (`host.submit`, `device[name](images, prompts)`, then `device_scores`); evaluation and
sampling scripts call `score`. Non-finite scores are errors naming the reward and prompt.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax.rewards import device as device_lib
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
    self.device = {name: device_lib.DeviceReward(name, reward_config, mesh)
                   for name in self.names if device_lib.is_device_reward(name)}
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
