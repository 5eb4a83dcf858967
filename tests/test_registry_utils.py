"""The name -> factory registry that generators and rewards share (mgrpo_jax/registry_utils.py)."""

import ml_collections
import pytest

from mgrpo_jax import rewards as rewards_lib
from mgrpo_jax.models import registry
from mgrpo_jax.registry_utils import Registry


def test_register_get_and_names():
  reg = Registry("widget", "no widget {name!r} (have {known})")
  make_b = reg.register("b")(lambda scale=1: ("b", scale))

  @reg.register("a")
  class A:  # a class registers unchanged, like a reward class
    pass

  assert reg.names() == ["a", "b"]
  assert reg.get("a") is A
  assert reg.get("b") is make_b and make_b(scale=3) == ("b", 3)
  with pytest.raises(ValueError) as e:
    reg.get("c")
  assert str(e.value) == "no widget 'c' (have ['a', 'b'])"
  with pytest.raises(ValueError, match="^widget 'a' is already registered$"):
    reg.register("a")(lambda: None)
  assert reg.get("a") is A  # the refused registration replaced nothing


def test_generator_and_reward_registries_name_the_unknown_choice():
  for name in ("tiny", "tiny_text", "sd3", "flux"):
    assert name in registry.available_generators()
  config = ml_collections.ConfigDict({"name": "dalle"})
  with pytest.raises(ValueError) as e:
    registry.get_generator(config)
  assert str(e.value) == ("config.model.name='dalle' is not a registered generator; known: "
                          f"{sorted(registry.available_generators())}")
  with pytest.raises(ValueError, match="^generator 'tiny' is already registered$"):
    registry.register("tiny")(lambda cfg: None)
  with pytest.raises(ValueError) as e:
    rewards_lib.get_reward("imagereward")
  assert str(e.value) == ("unknown reward 'imagereward'; available: "
                          f"{sorted(rewards_lib.available_rewards())}")
