"""The `blueness` reward on hand-made images: mean of (B - (R + G) / 2) / 255."""

import numpy as np
import pytest

from mgrpo_jax import rewards as rewards_lib


def solid(rgb, size=(4, 6)):
  return np.broadcast_to(np.asarray(rgb, np.uint8), size + (3,)).copy()


def test_blueness_of_solid_colours_by_hand():
  reward = rewards_lib.get_reward("blueness")
  images = np.stack([solid((0, 0, 255)), solid((255, 255, 0)), solid((255, 0, 0)),
                     solid((128, 128, 128)), solid((51, 102, 204))])
  got = reward(images, [""] * 5, [{}] * 5)
  # blue 1; yellow -1; red -1/2; grey 0; (204 - (51 + 102) / 2) / 255 = 127.5 / 255 = 0.5.
  np.testing.assert_allclose(got, [1.0, -1.0, -0.5, 0.0, 0.5], atol=1e-6)
  assert got.dtype == np.float32 and got.shape == (5,)


def test_blueness_is_a_mean_over_pixels():
  # Top half blue (+1), bottom half white (0): 0.5; one of 4 columns red (-0.5) on grey: -0.125.
  half = solid((255, 255, 255))
  half[:2] = (0, 0, 255)
  column = solid((90, 90, 90), size=(3, 4))
  column[:, 1] = (255, 0, 0)
  reward = rewards_lib.get_reward("blueness")
  assert reward(half[None], [""], [{}])[0] == pytest.approx(0.5, abs=1e-6)
  assert reward(column[None], [""], [{}])[0] == pytest.approx(-0.125, abs=1e-6)


def test_blueness_refuses_bad_images():
  with pytest.raises(ValueError, match="uint8"):
    rewards_lib.get_reward("blueness")(np.zeros([1, 4, 4, 3], np.float32), [""], [{}])
