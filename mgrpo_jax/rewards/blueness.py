"""A colour statistic on [-1, 1]: how much bluer than red and green an image is on average.

  blueness = mean over pixels of (B - (R + G) / 2) / 255

1 for a pure blue image, -1 for pure yellow, 0 for any grey. On the tiny text renderer's first
training samples its std is about 1/75 of the std of their JPEG size in kB, and bluer samples
tend to compress better (Pearson r -0.17 with `jpeg_incompressibility` over the 32 images of
seed 0's first iteration, -0.09 within prompts: a weak conflict; bench/study.py --testbeds 1
measures it per seed), which makes the pair the mismatched-scale rewards of issue 13's testbed 1.
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
