"""DDPO's JPEG rewards: the size of the image saved as JPEG (quality 95), in kB.

`jpeg_compressibility` = -size (smaller files are rewarded), `jpeg_incompressibility` = +size.
They need no weights, which makes them the rewards of the fast end-to-end tests.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from mgrpo_jax.rewards.base import PerImageReward, register

QUALITY = 95


def jpeg_size_kb(image: np.ndarray) -> float:
  """uint8 [H, W, 3] -> size of its JPEG encoding at quality 95, in kB (1000 bytes)."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image)).save(buffer, format="JPEG", quality=QUALITY)
  return buffer.tell() / 1000.0


@register("jpeg_compressibility")
class JpegCompressibility(PerImageReward):

  def score_one(self, image, prompt, metadata) -> float:
    del prompt, metadata
    return -jpeg_size_kb(image)


@register("jpeg_incompressibility")
class JpegIncompressibility(PerImageReward):

  def score_one(self, image, prompt, metadata) -> float:
    del prompt, metadata
    return jpeg_size_kb(image)
