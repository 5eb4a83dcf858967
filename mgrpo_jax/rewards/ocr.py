"""OCR accuracy of the rendered target text (Flow-GRPO's OCR reward), with an offline OCR engine.

The engine is RapidOCR (`rapidocr-onnxruntime`): the PP-OCR detection and recognition models of
the PaddleOCR family Flow-GRPO uses, shipped in the wheel and run with onnxruntime, so nothing
is downloaded. Scoring follows Flow-GRPO:

  target     = metadata['text'], else the first double-quoted span of the prompt
  recognised = the concatenation of every detected string
  both are normalised by dropping whitespace and lower-casing (punctuation is kept: targets
  such as "Open 24/7!" are scored on it)
  distance   = 0 if target is a substring of recognised, else Levenshtein(recognised, target)
  reward     = 1 - min(distance, len(target)) / len(target)           in [0, 1]

Images in which nothing is detected score 0.
"""

from __future__ import annotations

import collections
import hashlib
import re
import threading
from typing import Any

import numpy as np

from mgrpo_jax.rewards.base import PerImageReward, register

_QUOTED = re.compile(r'"([^"]+)"')


def levenshtein(a: str, b: str) -> int:
  """Edit distance (insertions, deletions, substitutions of one character each cost 1)."""
  if len(a) < len(b):
    a, b = b, a
  previous = list(range(len(b) + 1))
  for i, ca in enumerate(a, start=1):
    current = [i]
    for j, cb in enumerate(b, start=1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
    previous = current
  return previous[-1]


def normalize(text: str) -> str:
  return "".join(text.split()).lower()


def target_text(prompt: str, metadata: dict | None) -> str:
  """The text the image should show: metadata['text'] or the prompt's first quoted span.

  Raises:
    ValueError: neither is present (names the prompt).
  """
  if metadata and metadata.get("text"):
    return str(metadata["text"])
  match = _QUOTED.search(prompt)
  if match is None:
    raise ValueError(f"no target text for the OCR reward: metadata has no 'text' and the prompt "
                     f"quotes nothing: {prompt!r}")
  return match.group(1)


def ocr_score(recognised: str, target: str) -> float:
  """Flow-GRPO's score of recognised text against the target (see module docstring)."""
  target, recognised = normalize(target), normalize(recognised)
  if not target:
    raise ValueError("OCR target text is empty after removing whitespace")
  if not recognised:
    return 0.0
  distance = 0 if target in recognised else levenshtein(recognised, target)
  return 1.0 - min(distance, len(target)) / len(target)


class OcrEngine:
  """Thread-safe RapidOCR with a small cache, shared by the OCR and text-colour rewards.

  Each thread gets its own engine (no shared mutable state); results are cached by the image's
  bytes so the two rewards of one batch run the detector once per image.
  """

  def __init__(self, cache_size: int = 1024):
    self._local = threading.local()
    self._cache: collections.OrderedDict[bytes, list] = collections.OrderedDict()
    self._lock = threading.Lock()
    self._cache_size = cache_size

  def _engine(self):
    engine = getattr(self._local, "engine", None)
    if engine is None:
      from rapidocr_onnxruntime import RapidOCR  # pylint: disable=g-import-not-at-top
      engine = self._local.engine = RapidOCR()
    return engine

  def __call__(self, image: np.ndarray) -> list[tuple[np.ndarray, str, float]]:
    """uint8 [H, W, 3] RGB -> [(box [4, 2] float32 (x, y) corners, text, confidence)]."""
    image = np.ascontiguousarray(image)
    key = hashlib.sha1(image.tobytes()).digest() + repr(image.shape).encode()
    with self._lock:
      if key in self._cache:
        self._cache.move_to_end(key)
        return self._cache[key]
    # RapidOCR reads arrays as OpenCV's BGR.
    result, _ = self._engine()(np.ascontiguousarray(image[..., ::-1]))
    out = [(np.asarray(box, np.float32), str(text), float(conf))
           for box, text, conf in (result or [])]
    with self._lock:
      self._cache[key] = out
      while len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
    return out


_SHARED_ENGINE: OcrEngine | None = None
_SHARED_LOCK = threading.Lock()


def shared_engine() -> OcrEngine:
  global _SHARED_ENGINE
  with _SHARED_LOCK:
    if _SHARED_ENGINE is None:
      _SHARED_ENGINE = OcrEngine()
    return _SHARED_ENGINE


@register("ocr")
class OcrReward(PerImageReward):
  """1 - normalised edit distance between the OCR'd text and the target (see module doc)."""

  def __init__(self, engine: Any = None):
    self.engine = engine or shared_engine()

  def score_one(self, image, prompt, metadata) -> float:
    target = target_text(prompt, metadata)
    detections = self.engine(image)
    return ocr_score("".join(text for _, text, _ in detections), target)
