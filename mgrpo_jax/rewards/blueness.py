"""A colour statistic on [-1, 1]: how much bluer than red and green an image is on average.

  blueness = mean over pixels of (B - (R + G) / 2) / 255

1 for a pure blue image, -1 for pure yellow, 0 for any grey. Its spread over the tiny text
renderer's samples is about 1/75 of the spread of their JPEG size in kB, and bluer samples
compress better (Pearson r about -0.7 with `jpeg_incompressibility` at initialisation; measured
by bench/study.py), which makes the pair the mismatched-scale, conflicting rewards of testbed 1.
"""

from __future__ import annotations

import numpy as np

from mgrpo_jax.rewards.base import PerImageReward, register


def blueness(image: np.ndarray) -> float:
  """uint8 [H, W, 3] RGB -> mean of (B - (R + G) / 2) / 255 over pixels, in [-1, 1]."""
  rgb = np.asarray(image, np.float64) / 255.0
  return float(np.mean(rgb[..., 2] - 0.5 * (rgb[..., 0] + rgb[..., 1])))


@register("blueness")
class Blueness(PerImageReward):

  def score_one(self, image, prompt, metadata) -> float:
    del prompt, metadata
    return blueness(image)
