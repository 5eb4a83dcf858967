"""Does the rendered target text have the requested colour? (OCR-Color-10's constraint.)

Method, per image:
  1. OCR (the shared engine of the `ocr` reward) gives text boxes. Boxes whose text is close to
     the target (OCR score >= 0.5) are used; if none is, every box is (the text may be misspelt
     but still coloured); no box at all scores 0.
  2. In each box's axis-aligned crop, pixels are split into two clusters by 2-means in CIELAB.
     The background is the cluster holding most of the crop's border pixels (text rarely touches
     the box edge); the other cluster is the glyphs.
  3. The text colour is the per-channel median of the glyph pixels of all used boxes.
  4. It is compared in CIELAB (CIE76 delta E) with the reference colours below. Reward 1 if the
     requested colour is the nearest reference; otherwise exp(-(dE_requested - dE_nearest) / 25),
     partial credit that shrinks as the requested colour falls behind the nearest one.

Reference colours are the CSS named colours of the ten OCR-Color-10 colour words.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mgrpo_jax.rewards import ocr as ocr_lib
from mgrpo_jax.rewards.base import PerImageReward, register

COLORS = {
    "red": (255, 0, 0),
    "orange": (255, 165, 0),
    "yellow": (255, 255, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "purple": (128, 0, 128),
    "pink": (255, 192, 203),
    "brown": (139, 69, 19),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}
# Delta-E scale of the partial credit (about the distance between neighbouring named colours).
PARTIAL_CREDIT_SCALE = 25.0
MATCH_THRESHOLD = 0.5


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
  """sRGB in [0, 255], [..., 3] -> CIELAB (D65 white), [..., 3] float64."""
  c = np.asarray(rgb, np.float64) / 255.0
  linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
  m = np.array([[0.4124564, 0.3575761, 0.1804375],
                [0.2126729, 0.7151522, 0.0721750],
                [0.0193339, 0.1191920, 0.9503041]])
  xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
  eps, kappa = 216 / 24389, 24389 / 27
  f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
  return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                   200 * (f[..., 1] - f[..., 2])], axis=-1)


_REFERENCE_LAB = {name: srgb_to_lab(np.array(rgb)) for name, rgb in COLORS.items()}


def two_means(pixels: np.ndarray, border: np.ndarray, iters: int = 10) -> np.ndarray:
  """Boolean mask [n] of the pixels not in the background cluster.

  Args:
    pixels: [n, 3] Lab values of the crop.
    border: [n] bool, which pixels lie on the crop's border.
  """
  background = pixels[border].mean(0)
  far = pixels[np.argmax(np.linalg.norm(pixels - background, axis=1))]
  centres = np.stack([background, far])
  for _ in range(iters):
    assign = np.argmin(np.linalg.norm(pixels[:, None] - centres[None], axis=2), axis=1)
    for k in range(2):
      if np.any(assign == k):
        centres[k] = pixels[assign == k].mean(0)
  background_cluster = np.bincount(assign[border], minlength=2).argmax()
  return assign != background_cluster


def text_pixels(image: np.ndarray, box: np.ndarray) -> np.ndarray:
  """RGB pixels [n, 3] of the glyphs inside an OCR box (see module docstring)."""
  h, w = image.shape[:2]
  x0, y0 = np.floor(box.min(0)).astype(int)
  x1, y1 = np.ceil(box.max(0)).astype(int)
  x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
  if x1 - x0 < 3 or y1 - y0 < 3:
    return np.zeros((0, 3))
  crop = image[y0:y1, x0:x1].reshape(-1, 3).astype(np.float64)
  yy, xx = np.mgrid[0:y1 - y0, 0:x1 - x0]
  border = ((yy == 0) | (xx == 0) | (yy == y1 - y0 - 1) | (xx == x1 - x0 - 1)).reshape(-1)
  mask = two_means(srgb_to_lab(crop), border)
  return crop[mask]


def color_score(rgb: np.ndarray, color: str) -> float:
  """Reward of a measured text colour (RGB) for the requested colour name."""
  lab = srgb_to_lab(np.asarray(rgb, np.float64))
  distances = {name: float(np.linalg.norm(lab - ref)) for name, ref in _REFERENCE_LAB.items()}
  nearest = min(distances.values())
  return math.exp(-(distances[color] - nearest) / PARTIAL_CREDIT_SCALE)


def check_color(color: Any) -> str:
  name = str(color).strip().lower()
  if name not in COLORS:
    raise ValueError(f"unknown text colour {color!r}; the text_color reward knows "
                     f"{sorted(COLORS)}")
  return name


@register("text_color")
class TextColorReward(PerImageReward):
  """Colour accuracy of the target text, in [0, 1] (see module docstring)."""

  def __init__(self, engine: Any = None):
    self.engine = engine or ocr_lib.shared_engine()

  def measure(self, image: np.ndarray, prompt: str, metadata: dict) -> np.ndarray | None:
    """The median RGB [3] of the target text's glyphs, or None when no text is found."""
    target = ocr_lib.target_text(prompt, metadata)
    detections = self.engine(image)
    if not detections:
      return None
    matching = [box for box, text, _ in detections
                if ocr_lib.ocr_score(text, target) >= MATCH_THRESHOLD]
    boxes = matching or [box for box, _, _ in detections]
    pixels = np.concatenate([text_pixels(image, box) for box in boxes])
    if not len(pixels):
      return None
    return np.median(pixels, axis=0)

  def score_one(self, image, prompt, metadata) -> float:
    if not metadata or "color" not in metadata:
      raise ValueError(f"text_color reward needs metadata['color'] (an OCR-Color-10 record); "
                       f"prompt {prompt!r} has metadata {metadata!r}")
    color = check_color(metadata["color"])
    rgb = self.measure(image, prompt, metadata)
    return 0.0 if rgb is None else color_score(rgb, color)
