"""Does the rendered target text have the requested colour? (OCR-Color-10's constraint.)

Method, per image:
  1. OCR (the shared engine of the `ocr` reward, so a batch is read once for both rewards)
     gives text boxes. A box is used if its text is part of the target: its normalised text
     (see `ocr.normalize`) is within len/3 edits of some span of the normalised target, so the
     words of a target split over several boxes all count and unrelated text in the scene does
     not (boxes of one character count only for one-character targets). If no box is part
     of the target, every box is used (the text may be misspelt beyond recognition yet still
     coloured); no box at all scores 0.
  2. In each box's axis-aligned crop the pixels are split into two clusters by 2-means in
     CIELAB. The background is the cluster holding most of the crop's border pixels (the
     detector pads its boxes, so glyphs rarely touch the border); the other is the glyphs.
  3. Anti-aliased or blurred glyph edges are blends of text and background colour, so only the
     quarter of the glyph pixels farthest (in Lab) from the background centre is kept.
  4. The text colour is the per-channel median (sRGB) of the kept pixels of all used boxes.
  5. It is compared in CIELAB (CIE76 delta E) with the reference shades of the ten colour
     names; a name's distance is that of its nearest shade. The reward is 1 if the requested
     name is the nearest name, else exp(-(dE_requested - dE_nearest) / 25): partial credit
     that shrinks as the requested colour falls behind the nearest one (25 is about the
     distance between neighbouring names). So `text_color == 1` means "colour correct", which
     is how `mgrpo_jax.evaluate` counts colour accuracy.

Reference shades are CSS named colours. A colour word covers a range of shades, and one
reference per word misreads common ones: with only CSS red/green/blue/pink/purple/brown, royal
blue (65, 105, 225) and hot pink (255, 105, 180) are nearest to purple, dark red (139, 0, 0) to
brown, and lime (0, 255, 0) is 63 from green but 66 from yellow. So each word has a few shades
that people call by it (`SHADES`), no two of different words closer than 26.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mgrpo_jax.rewards import ocr as ocr_lib
from mgrpo_jax.rewards.base import PerImageReward, register

# name -> sRGB shades: CSS named colours, the name's own CSS colour first (the CSS names of the
# others are in the comments).
SHADES: dict[str, tuple[tuple[int, int, int], ...]] = {
    # red, crimson, firebrick, darkred
    "red": ((255, 0, 0), (220, 20, 60), (178, 34, 34), (139, 0, 0)),
    # orange, darkorange, coral
    "orange": ((255, 165, 0), (255, 140, 0), (255, 127, 80)),
    # yellow, gold, khaki
    "yellow": ((255, 255, 0), (255, 215, 0), (240, 230, 140)),
    # green, lime, limegreen, forestgreen, darkgreen
    "green": ((0, 128, 0), (0, 255, 0), (50, 205, 50), (34, 139, 34), (0, 100, 0)),
    # blue, darkblue, royalblue, dodgerblue, navy
    "blue": ((0, 0, 255), (0, 0, 139), (65, 105, 225), (30, 144, 255), (0, 0, 128)),
    # purple, darkviolet, darkorchid, mediumorchid
    "purple": ((128, 0, 128), (148, 0, 211), (153, 50, 204), (186, 85, 211)),
    # pink, hotpink, deeppink
    "pink": ((255, 192, 203), (255, 105, 180), (255, 20, 147)),
    # saddlebrown (CSS 'brown' (165, 42, 42) is nearer red than most browns), sienna, a dark brown
    "brown": ((139, 69, 19), (160, 82, 45), (101, 67, 33)),
    "black": ((0, 0, 0),),
    "white": ((255, 255, 255),),
}
# The main shade of each name, e.g. for drawing test images.
COLORS: dict[str, tuple[int, int, int]] = {name: shades[0] for name, shades in SHADES.items()}
# Delta-E scale of the partial credit (about the distance between neighbouring names).
PARTIAL_CREDIT_SCALE = 25.0
# Glyph pixels nearer the background than this quantile of the glyphs' distances to it are edge
# blends, not text colour. 0.75 keeps the farthest quarter: on blurred 30 px text this halved the
# colour error of keeping every glyph pixel, and on sharp noisy text it adds < 5 delta E.
CORE_QUANTILE = 0.75
# A box is part of the target if it is within this many edits per character of a target span.
MATCH_EDITS_PER_CHAR = 1 / 3


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
  """sRGB in [0, 255], [..., 3] -> CIELAB (D65 white), [..., 3] float64."""
  c = np.asarray(rgb, np.float64) / 255.0
  linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
  # Linear sRGB -> XYZ (D65), divided by the white point so white maps to (1, 1, 1).
  m = np.array([[0.4124564, 0.3575761, 0.1804375],
                [0.2126729, 0.7151522, 0.0721750],
                [0.0193339, 0.1191920, 0.9503041]])
  xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
  eps, kappa = 216 / 24389, 24389 / 27
  f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
  return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                   200 * (f[..., 1] - f[..., 2])], axis=-1)


_SHADES_LAB = {name: srgb_to_lab(np.array(shades)) for name, shades in SHADES.items()}


def color_distances(rgb: np.ndarray) -> dict[str, float]:
  """CIE76 delta E from an sRGB colour [3] to each name's nearest shade."""
  lab = srgb_to_lab(np.asarray(rgb, np.float64))
  return {name: float(np.linalg.norm(shades - lab, axis=-1).min())
          for name, shades in _SHADES_LAB.items()}


def nearest_color(rgb: np.ndarray) -> str:
  """The colour name nearest to an sRGB colour [3]."""
  distances = color_distances(rgb)
  return min(distances, key=distances.get)


def color_score(rgb: np.ndarray, color: str) -> float:
  """Reward in (0, 1] of a measured text colour (sRGB [3]) for the requested colour name."""
  distances = color_distances(rgb)
  return math.exp(-(distances[check_color(color)] - min(distances.values()))
                  / PARTIAL_CREDIT_SCALE)


def check_color(color: Any) -> str:
  """The canonical colour name; ValueError naming it and the known ones if unknown."""
  name = str(color).strip().lower()
  if name not in SHADES:
    raise ValueError(f"unknown text colour {color!r}; the text_color reward knows "
                     f"{sorted(SHADES)}")
  return name


def glyph_mask(pixels: np.ndarray, border: np.ndarray, iters: int = 10) -> np.ndarray:
  """Boolean mask [n] of the core glyph pixels of a text crop (steps 2 and 3 of the method).

  Args:
    pixels: [n, 3] Lab values of the crop.
    border: [n] bool, which pixels lie on the crop's border.
  """
  # Start from the border's mean (background) and the pixel least like it (surely glyph).
  background = pixels[border].mean(0)
  far = pixels[np.argmax(np.linalg.norm(pixels - background, axis=1))]
  centres = np.stack([background, far])
  for _ in range(iters):
    assign = np.argmin(np.linalg.norm(pixels[:, None] - centres[None], axis=2), axis=1)
    new = np.stack([pixels[assign == k].mean(0) if np.any(assign == k) else centres[k]
                    for k in range(2)])
    if np.allclose(new, centres):
      break
    centres = new
  background_cluster = np.bincount(assign[border], minlength=2).argmax()
  glyphs = assign != background_cluster
  if not glyphs.any():
    return glyphs
  distance = np.linalg.norm(pixels - centres[background_cluster], axis=1)
  return glyphs & (distance >= np.quantile(distance[glyphs], CORE_QUANTILE))


def text_pixels(image: np.ndarray, box: np.ndarray) -> np.ndarray:
  """RGB pixels [n, 3] float64 of the glyphs inside an OCR box [4, 2] of (x, y) corners."""
  h, w = image.shape[:2]
  x0, y0 = np.floor(box.min(0)).astype(int)
  x1, y1 = np.ceil(box.max(0)).astype(int)
  x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
  if x1 - x0 < 3 or y1 - y0 < 3:
    return np.zeros((0, 3))
  crop = image[y0:y1, x0:x1].reshape(-1, 3).astype(np.float64)
  yy, xx = np.mgrid[0:y1 - y0, 0:x1 - x0]
  border = ((yy == 0) | (xx == 0) | (yy == y1 - y0 - 1) | (xx == x1 - x0 - 1)).reshape(-1)
  return crop[glyph_mask(srgb_to_lab(crop), border)]


def part_of_target(text: str, target: str) -> bool:
  """Whether an OCR box's text is (approximately) a span of the normalised target."""
  text = ocr_lib.normalize(text)
  if len(text) < min(2, len(target)):
    return False  # a lone character occurs in most targets: it says nothing
  allowed = int(len(text) * MATCH_EDITS_PER_CHAR)
  return ocr_lib.substring_distance(text, target) <= allowed


@register("text_color")
class TextColorReward(PerImageReward):
  """Colour accuracy of the target text, float in [0, 1]; 1 = colour correct (module docstring).

  Args:
    engine: a callable image -> detections (tests pass fakes); default the shared OcrEngine.
    num_threads: onnxruntime threads per engine of the shared engine.
  """

  def __init__(self, engine: Any = None, num_threads: int = 1):
    self.engine = engine or ocr_lib.shared_engine(num_threads)

  def measure(self, image: np.ndarray, prompt: str, metadata: dict | None) -> np.ndarray | None:
    """The median sRGB [3] float64 of the target text's glyphs, or None when no text is found."""
    target = ocr_lib.normalized_target(prompt, metadata)
    detections = self.engine(image)
    if not detections:
      return None
    boxes = [box for box, text, _ in detections if part_of_target(text, target)]
    pixels = np.concatenate([text_pixels(image, box)
                             for box in boxes or [box for box, _, _ in detections]])
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
