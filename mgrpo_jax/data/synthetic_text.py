"""Synthetic OCR-Color data: short uppercase words drawn in one of the ten OCR-Color-10 colours.

The pretraining data of the tiny text renderer (`mgrpo_jax.pretrain`) and the prompts of the CPU
main job (`configs/tiny_ocr_color.py`). Everything is a pure function of its arguments (word
lists are fixed here, images depend only on (word, colour, background level)), so data is
reproducible by seed on any machine with the same Pillow.

  Words     `TRAIN_WORDS` (uppercase, 3-5 letters) and `HELDOUT_WORDS` (never drawn in training).
  Pairs     every (train word, colour) except `heldout_pairs()`: a fixed 40 of them, each word
            still seen in the other nine colours. The main job evaluates on these pairs.
  Images    the word in Pillow's bundled default font (`ImageFont.load_default(size=18)`, never a
            system font) centred on a 64x64 canvas, box-downsampled to 32x32 (`IMAGE_SIZE`); text
            in the colour's main shade (`rewards.text_color.COLORS`) over a plain grey background
            whose level contrasts with it (dark behind yellow / white / pink / orange, light
            behind the rest).
  Prompts   OCR-Color-10 style: '... reads "WORD". The color of the text "WORD" is red.'

Images are composed from a per-word glyph coverage map (alpha in [0, 1], [32, 32]): because box
downsampling is linear, `bg * (1 - alpha) + colour * alpha` equals drawing at 64 px and then
downsampling, and a batch costs a few array operations instead of Pillow calls.
"""

from __future__ import annotations

import csv
import functools
import os

import numpy as np

from mgrpo_jax.rewards.text_color import COLORS

# The ten OCR-Color-10 colour names, in a fixed order.
COLOR_NAMES: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink",
                                "brown", "black", "white")
# Colours drawn on a dark background (they are light themselves).
LIGHT_TEXT = frozenset({"yellow", "white", "pink", "orange"})
# Side of a training image, and of the canvas it is drawn on before box downsampling.
IMAGE_SIZE = 32
CANVAS_SIZE = 64
FONT_SIZE = 18

TRAIN_WORDS: tuple[str, ...] = tuple("""
ACE ACT ADD AGE AIR ALL ANT ARM ART ASK BAG BAT BED BEE BIG BOX BOY BUS CAR CAT COW CUP DAY DOG
DRY EAR EAT EGG END EYE FAN FAR FIG FIX FLY FOX FUN GAS GEM GUM HAT HEN HOT ICE INK JAM JAR JOB
KEY KID LAB LEG LID LOG MAP MIX MUD NET NUT OAK OIL OWL PAN PEN PIG POT RAT RED RUN SEA SKY SUN
TAX TEA TOP TOY VAN WAX WEB YES ZOO
BAKE BALL BAND BANK BEAR BELL BIRD BLUE BOAT BOLD BOOK CAKE CALM CASH CITY COAT COLD CORN DARK
DEER DESK DOOR DUCK EAST EASY FARM FAST FIRE FISH FLAG FOOD FROG GAME GIFT GOAT GOLD HAND HILL
HOME HOPE IRON JUMP KING KITE LAKE LAMP LEAF LION MILK MOON NEST OPEN PARK PINK RAIN ROAD ROCK
ROSE SALT SHIP SHOP SNOW SOUP STAR TREE WIND WOLF
APPLE BASIL BREAD BRICK CHAIR CHILI EARTH FIELD FIFTY FIRST FLUTE FRUIT GLASS GRAPE HEART JUICE
LIGHT MUSIC OLIVE PAPER PARTY PEACE PIANO PLANT QUILT RIVER SHIFT SIXTY SKIRT SLICE SMILE SPACE
SPICE STEEL STILL TABLE TIGER TRAIN TRUST TULIP
""".split())

HELDOUT_WORDS: tuple[str, ...] = tuple("""
ARC BUN DEW ELF HUT MOP RUG TIN
BEAN COIN DUNE HAWK MINT PEAR VASE WAVE
BERRY CHIEF FLINT LILAC PILOT SHELL SPLIT TRAIL
""".split())

_TEMPLATES = (
    'A plain card that reads "{w}". The color of the text "{w}" is {c}.',
    'A simple sign with the word "{w}" printed on it. The color of the text "{w}" is {c}.',
    'A label on a flat background that reads "{w}". The color of the text "{w}" is {c}.',
    'A poster showing the word "{w}" in large letters. The color of the text "{w}" is {c}.',
)


def _check_words():
  for name, words in (("TRAIN_WORDS", TRAIN_WORDS), ("HELDOUT_WORDS", HELDOUT_WORDS)):
    bad = [w for w in words if not (w.isalpha() and w.isupper() and 3 <= len(w) <= 5)]
    if bad or len(set(words)) != len(words):
      raise AssertionError(f"{name}: not unique uppercase 3-5 letter words: {bad}")
  if set(TRAIN_WORDS) & set(HELDOUT_WORDS):
    raise AssertionError("a held-out word is also a training word")


_check_words()


def prompt_for(word: str, color: str, template: int = 0) -> str:
  """The OCR-Color-10 style prompt of (word, colour), one of `len(_TEMPLATES)` wordings."""
  if color not in COLOR_NAMES:
    raise ValueError(f"unknown colour {color!r}; expected one of {COLOR_NAMES}")
  return _TEMPLATES[template % len(_TEMPLATES)].format(w=word, c=color)


@functools.lru_cache(maxsize=1)
def heldout_pairs() -> tuple[tuple[str, str], ...]:
  """40 fixed (train word, colour) pairs never drawn in training: word i*4 with colour i % 10."""
  return tuple((TRAIN_WORDS[4 * i], COLOR_NAMES[i % len(COLOR_NAMES)]) for i in range(40))


@functools.lru_cache(maxsize=1)
def train_pairs() -> tuple[tuple[str, str], ...]:
  """Every (train word, colour) pair except the held-out ones, words major."""
  held = set(heldout_pairs())
  return tuple((w, c) for w in TRAIN_WORDS for c in COLOR_NAMES if (w, c) not in held)


def split_pairs(split: str) -> tuple[tuple[str, str], ...]:
  """(word, colour) pairs of a split: 'train', 'heldout' (unseen pairs of train words) or
  'heldout_words' (unseen words, each in two colours)."""
  if split == "train":
    return train_pairs()
  if split == "heldout":
    return heldout_pairs()
  if split == "heldout_words":
    return tuple((w, COLOR_NAMES[(i + k) % len(COLOR_NAMES)]) for i, w in enumerate(HELDOUT_WORDS)
                 for k in (0, 5))
  raise ValueError(f"unknown split {split!r}; expected 'train', 'heldout' or 'heldout_words'")


@functools.lru_cache(maxsize=4096)
def glyph_alpha(word: str) -> np.ndarray:
  """Coverage of the word's glyphs, float32 [IMAGE_SIZE, IMAGE_SIZE] in [0, 1] (read-only).

  Drawn white-on-black with Pillow's bundled default font at FONT_SIZE, centred on a
  CANVAS_SIZE canvas, then box-downsampled (each output pixel the mean of a 2x2 block).
  """
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=import-outside-toplevel
  font = ImageFont.load_default(size=FONT_SIZE)
  canvas = Image.new("L", (CANVAS_SIZE, CANVAS_SIZE), 0)
  draw = ImageDraw.Draw(canvas)
  left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
  if right - left > CANVAS_SIZE - 6:
    raise ValueError(f"word {word!r} is {right - left} px wide at font size {FONT_SIZE}; it does "
                     f"not fit the {CANVAS_SIZE} px canvas")
  x = (CANVAS_SIZE - (right - left)) / 2 - left
  y = (CANVAS_SIZE - (bottom - top)) / 2 - top
  draw.text((x, y), word, fill=255, font=font)
  big = np.asarray(canvas, np.float32) / 255.0
  f = CANVAS_SIZE // IMAGE_SIZE
  alpha = big.reshape(IMAGE_SIZE, f, IMAGE_SIZE, f).mean(axis=(1, 3))
  alpha.setflags(write=False)
  return alpha


def background_level(color: str, u: float) -> float:
  """Grey level in [0, 255] of the background behind `color` text, from u in [0, 1)."""
  if color in LIGHT_TEXT:
    return 10.0 + 70.0 * u  # dark: 10-80
  return 175.0 + 80.0 * u  # light: 175-255


def render(word: str, color: str, background: float) -> np.ndarray:
  """One image, float32 [IMAGE_SIZE, IMAGE_SIZE, 3] in [0, 1]: `word` in `color` on grey level
  `background` (0-255)."""
  alpha = glyph_alpha(word)[..., None]
  fg = np.asarray(COLORS[color], np.float32) / 255.0
  return (1.0 - alpha) * (background / 255.0) + alpha * fg


def sample_batch(seed: int, step: int, batch_size: int,
                 pairs: tuple[tuple[str, str], ...] | None = None
                 ) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
  """The pretraining batch of `step`: a pure function of (seed, step, batch_size).

  Args:
    seed: data seed.
    step: training step (so a resumed run sees the same batches).
    batch_size: B.
    pairs: (word, colour) pairs to draw from; default `train_pairs()`.

  Returns:
    (prompts: B strings, images: float32 [B, IMAGE_SIZE, IMAGE_SIZE, 3] in [0, 1],
     the B (word, colour) pairs).
  """
  pairs = train_pairs() if pairs is None else pairs
  rng = np.random.default_rng([int(seed), int(step)])
  index = rng.integers(0, len(pairs), batch_size)
  levels = rng.random(batch_size)
  templates = rng.integers(0, len(_TEMPLATES), batch_size)
  chosen = [pairs[i] for i in index]
  prompts = [prompt_for(w, c, t) for (w, c), t in zip(chosen, templates)]
  images = np.stack([render(w, c, background_level(c, u)) for (w, c), u in zip(chosen, levels)])
  return prompts, images, chosen


def write_prompt_csv(path: str, split: str) -> int:
  """Writes a split as an OCR-Color-10 CSV (line_id,prompt,text,color,source); returns rows.

  Row i uses template i; `source` is 'synthetic_<split>'.
  """
  pairs = split_pairs(split)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    writer.writerow(["line_id", "prompt", "text", "color", "source"])
    for i, (word, color) in enumerate(pairs):
      writer.writerow([i, prompt_for(word, color, i), word, color, f"synthetic_{split}"])
  return len(pairs)


PROMPT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                          "synthetic_ocr_color")


def prompt_csv(split: str) -> str:
  """Path of the shipped prompt CSV of a split (written by `python -m
  mgrpo_jax.data.synthetic_text`; a test checks it matches `write_prompt_csv`)."""
  split_pairs(split)  # validates the name
  return os.path.join(PROMPT_DIR, f"{split}.csv")


def main():
  for split in ("train", "heldout", "heldout_words"):
    n = write_prompt_csv(prompt_csv(split), split)
    print(f"{prompt_csv(split)}: {n} prompts")


if __name__ == "__main__":
  main()
