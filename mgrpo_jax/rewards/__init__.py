"""Rewards by name (`config.reward.names`): OCR accuracy, text colour, JPEG size, ...

Importing the package registers every built-in reward.

  host = HostRewards({"ocr": {}, "text_color": {}}, max_workers=4)
  scores = host.submit(images, prompts, metadata).result()  # {name: float32 [N]}
"""

from mgrpo_jax.rewards import blueness, jpeg, ocr, remote, text_color  # noqa: F401  (registration)
from mgrpo_jax.rewards.base import (PerImageReward, available_rewards, check_batch,  # noqa: F401
                                    get_reward, placement, register)
from mgrpo_jax.rewards.host import HostRewards, RewardError  # noqa: F401
from mgrpo_jax.rewards.remote import RemoteReward, RemoteRewardError, register_remote  # noqa: F401

__all__ = ["HostRewards", "PerImageReward", "RemoteReward", "RemoteRewardError", "RewardError",
           "available_rewards", "check_batch", "get_reward", "placement", "register",
           "register_remote"]


def _device_reward(name: str):
  """Factory of a learned device reward; jax and the CLIP model load only when one is built."""

  def factory(reward_config, mesh):
    from mgrpo_jax.rewards import device  # pylint: disable=import-outside-toplevel
    return device.DeviceReward(name, reward_config, mesh)

  return factory


for _name in ("pickscore", "clipscore", "aesthetic"):  # models in rewards/device.py
  register(_name, placement="device")(_device_reward(_name))
