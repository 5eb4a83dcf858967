"""OCR accuracy of the rendered target text (Flow-GRPO's OCR reward), with an offline OCR engine.

The engine is RapidOCR (`rapidocr-onnxruntime`): the PP-OCR detection and recognition models of
the PaddleOCR family Flow-GRPO uses, shipped in the wheel and run with onnxruntime, so nothing
is downloaded. Scoring follows Flow-GRPO:

  target     = metadata['text'] if present, else the first double-quoted span of the prompt
  recognised = every detected string (RapidOCR keeps those of confidence >= 0.5, PaddleOCR's
               default), joined with spaces
  normalise  = NFKC (so 'E=mc²' reads as 'e=mc2'), lower-case, then keep only letters and digits
  distance   = 0 if the target is a substring of the recognised text (Flow-GRPO's rule: other
               text in the image is not penalised; `substring_match=False` turns it off),
               else Levenshtein(recognised, target)
  reward     = 1 - min(distance, len(target)) / len(target)           in [0, 1]

Normalisation: Flow-GRPO drops only spaces and case. Punctuation is dropped here too because the
PP-OCR recogniser is unreliable on it (straight vs curly apostrophes, '%' read as '9', a missing
final '!') while a generated image rarely gets the letters right and only the punctuation
wrong; letters and digits carry the reward. Targets with no letter or digit are refused.

Images in which nothing is detected score 0.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import re
import threading
import unicodedata
from typing import Any

import numpy as np

from mgrpo_jax.rewards.base import PerImageReward, register

_QUOTED = re.compile(r'"([^"]+)"')


def levenshtein(a: str, b: str) -> int:
  """Edit distance: insertions, deletions and substitutions of one character each cost 1."""
  if len(a) < len(b):
    a, b = b, a  # the row is as long as the shorter string
  previous = list(range(len(b) + 1))
  for i, ca in enumerate(a, start=1):
    current = [i]
    for j, cb in enumerate(b, start=1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
    previous = current
  return previous[-1]


def substring_distance(pattern: str, text: str) -> int:
  """Fewest edits turning `pattern` into some substring of `text` (approximate substring match).

  Levenshtein's table with a free start and end in `text`: its first row is zeros and the
  answer is the minimum of its last row. 0 iff `pattern` occurs in `text`.
  """
  previous = [0] * (len(text) + 1)
  for i, cp in enumerate(pattern, start=1):
    current = [i]
    for j, ct in enumerate(text, start=1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (cp != ct)))
    previous = current
  return min(previous)


def normalize(text: str) -> str:
  """NFKC, lower-case, letters and digits only (see the module docstring for why)."""
  return "".join(c for c in unicodedata.normalize("NFKC", text).lower() if c.isalnum())


def target_text(prompt: str, metadata: dict | None) -> str:
  """The text the image should show: metadata['text'] or the prompt's first quoted span.

  Raises:
    ValueError: neither is present (names the prompt).
  """
  if metadata and metadata.get("text") is not None:
    return str(metadata["text"])
  match = _QUOTED.search(prompt)
  if match is None:
    raise ValueError(f"no target text for the OCR reward: metadata has no 'text' and the prompt "
                     f"quotes nothing: {prompt!r}")
  return match.group(1)


def normalized_target(prompt: str, metadata: dict | None) -> str:
  """`normalize(target_text(...))`; raises ValueError naming the prompt if nothing is left."""
  target = target_text(prompt, metadata)
  normalized = normalize(target)
  if not normalized:
    raise ValueError(f"OCR target text {target!r} has no letter or digit to score (prompt "
                     f"{prompt!r})")
  return normalized


def ocr_score(recognised: str, target: str, substring_match: bool = True) -> float:
  """Flow-GRPO's score in [0, 1] of recognised text against the target (see module docstring).

  Raises:
    ValueError: the target has no letter or digit.
  """
  target, recognised = normalize(target), normalize(recognised)
  if not target:
    raise ValueError("OCR target text has no letter or digit to score")
  if not recognised:
    return 0.0
  if substring_match and target in recognised:
    return 1.0
  distance = levenshtein(recognised, target)
  return 1.0 - min(distance, len(target)) / len(target)


Detection = tuple  # (box float32 [4, 2] of (x, y) corners, text: str, confidence: float)


class OcrEngine:
  """Thread-safe RapidOCR with a cache, shared by the OCR and text-colour rewards.

  Every thread gets its own RapidOCR, created on its first call (engines load in ~0.1 s and
  hold ~20 MB), so no engine state is shared between threads. Each engine's onnxruntime
  sessions use `num_threads` threads: the reward pool already runs one image per thread, and on
  a 2-core machine one thread per engine was twice as fast as onnxruntime's default (all cores
  per session, oversubscribed by the pool's threads).

  Results are cached by the image's bytes, and a second request for an image already being
  read waits for the first: the `ocr` and `text_color` rewards of a batch run the detector once
  per image even when they run at the same time.

  Args:
    num_threads: onnxruntime intra-op threads per engine (-1: onnxruntime's default).
    cache_size: images whose detections are kept.
  """

  def __init__(self, num_threads: int = 1, cache_size: int = 1024):
    if num_threads != -1 and num_threads < 1:
      raise ValueError(f"num_threads must be >= 1 or -1 (onnxruntime's default), got "
                       f"{num_threads}")
    self.num_threads = num_threads
    self._local = threading.local()
    self._cache: collections.OrderedDict[bytes, cf.Future] = collections.OrderedDict()
    self._lock = threading.Lock()
    self._cache_size = cache_size

  def _engine(self):
    engine = getattr(self._local, "engine", None)
    if engine is None:
      from rapidocr_onnxruntime import RapidOCR  # pylint: disable=g-import-not-at-top
      kwargs = {} if self.num_threads == -1 else {"intra_op_num_threads": self.num_threads}
      engine = self._local.engine = RapidOCR(**kwargs)
    return engine

  def _read(self, image: np.ndarray) -> list[Detection]:
    # RapidOCR reads arrays as OpenCV's BGR.
    result, _ = self._engine()(np.ascontiguousarray(image[..., ::-1]))
    return [(np.asarray(box, np.float32), str(text), float(conf))
            for box, text, conf in (result or [])]

  def __call__(self, image: np.ndarray) -> list[Detection]:
    """uint8 [H, W, 3] RGB -> [(box [4, 2] float32 (x, y) corners, text, confidence)]."""
    image = np.ascontiguousarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f"OCR needs a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    key = hashlib.sha1(image.tobytes()).digest() + repr(image.shape).encode()
    with self._lock:
      entry = self._cache.get(key)
      owner = entry is None
      if owner:
        entry = self._cache[key] = cf.Future()
      else:
        self._cache.move_to_end(key)
    if not owner:
      return entry.result()
    try:
      detections = self._read(image)
    except BaseException as e:
      # Waiters see the error; later calls retry instead of finding it cached.
      with self._lock:
        self._cache.pop(key, None)
      entry.set_exception(e)
      raise
    entry.set_result(detections)
    with self._lock:
      while len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
    return detections


_SHARED_ENGINES: dict[tuple, OcrEngine] = {}
_SHARED_LOCK = threading.Lock()


def shared_engine(num_threads: int = 1) -> OcrEngine:
  """The process's OcrEngine with these settings (rewards share it, and so its cache)."""
  with _SHARED_LOCK:
    key = (num_threads,)
    if key not in _SHARED_ENGINES:
      _SHARED_ENGINES[key] = OcrEngine(num_threads=num_threads)
    return _SHARED_ENGINES[key]


@register("ocr")
class OcrReward(PerImageReward):
  """1 - normalised edit distance between the OCR'd text and the target, float in [0, 1].

  Args:
    engine: a callable image -> detections (tests pass fakes); default the shared OcrEngine.
    num_threads: onnxruntime threads per engine of the shared engine.
    substring_match: score 1 when the target occurs inside the recognised text (Flow-GRPO).
  """

  def __init__(self, engine: Any = None, num_threads: int = 1, substring_match: bool = True):
    self.engine = engine or shared_engine(num_threads)
    self.substring_match = substring_match

  def score_one(self, image, prompt, metadata) -> float:
    target = normalized_target(prompt, metadata)
    detections = self.engine(image)
    recognised = " ".join(text for _, text, _ in detections)
    return ocr_score(recognised, target, self.substring_match)
