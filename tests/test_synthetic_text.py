"""Synthetic OCR-Color data: images against Pillow drawn directly, splits, shipped prompt files."""

import filecmp

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from mgrpo_jax.data import prompts as prompts_lib
from mgrpo_jax.data import synthetic_text as st
from mgrpo_jax.models import tiny_pixel
from mgrpo_jax.rewards import ocr as ocr_lib


def _pillow_reference(word, rgb, background):
  """Pillow alone: draw the coloured word on the grey canvas at 64 px, box-resize to 32 px."""
  font = ImageFont.load_default(size=18)
  canvas = Image.new("RGB", (64, 64), (int(background),) * 3)
  draw = ImageDraw.Draw(canvas)
  left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
  draw.text(((64 - (right - left)) / 2 - left, (64 - (bottom - top)) / 2 - top), word,
            fill=rgb, font=font)
  return np.asarray(canvas.resize((32, 32), Image.BOX), np.float32) / 255.0


@pytest.mark.parametrize("word,color,background", [("CAT", "red", 200.0), ("TULIP", "yellow", 40.0),
                                                  ("SIXTY", "blue", 255.0)])
def test_render_matches_pillow_drawing_directly(word, color, background):
  ours = st.render(word, color, background)
  ref = _pillow_reference(word, st.COLORS[color], background)
  assert ours.shape == (32, 32, 3) and ours.dtype == np.float32
  # Pillow blends and box-averages in uint8: a few levels of rounding.
  np.testing.assert_allclose(ours, ref, atol=3 / 255)
  # The text is there (strokes of 1-2 px at 64 px cover at most ~60-100% of a 32 px pixel), and
  # the corners are background.
  assert np.abs(ours[0, 0] - background / 255).max() < 1e-6
  assert st.glyph_alpha(word).max() > 0.5


def test_background_contrasts_with_text():
  for color in st.COLOR_NAMES:
    for u in (0.0, 0.5, 0.999):
      level = st.background_level(color, u)
      luma = np.dot(st.COLORS[color], (0.299, 0.587, 0.114))
      assert abs(level - luma) > 40, (color, level, luma)


def test_batches_are_deterministic_by_seed_and_step():
  p1, x1, c1 = st.sample_batch(0, 7, 8)
  p2, x2, c2 = st.sample_batch(0, 7, 8)
  assert p1 == p2 and c1 == c2 and np.array_equal(x1, x2)
  p3, _, _ = st.sample_batch(0, 8, 8)
  p4, _, _ = st.sample_batch(1, 7, 8)
  assert p3 != p1 and p4 != p1
  assert x1.shape == (8, 32, 32, 3) and 0.0 <= x1.min() and x1.max() <= 1.0
  for prompt, (word, color) in zip(p1, c1):
    assert f'"{word}"' in prompt and prompt.endswith(f" is {color}.")


def test_splits_are_disjoint_and_held_out_words_are_seen_in_other_colours():
  train, held = set(st.train_pairs()), set(st.heldout_pairs())
  assert len(held) == 40 and not train & held
  assert len(train) == len(st.TRAIN_WORDS) * 10 - 40
  train_words = {w for w, _ in train}
  assert {w for w, _ in held} <= train_words
  assert not {w for w, _ in st.split_pairs("heldout_words")} & train_words
  # Training batches never draw a held-out pair.
  _, _, chosen = st.sample_batch(3, 0, 2000)
  assert not set(chosen) & held
  with pytest.raises(ValueError, match="unknown split 'test'"):
    st.split_pairs("test")


def test_every_word_fits_the_canvas():
  for word in st.TRAIN_WORDS + st.HELDOUT_WORDS:
    alpha = st.glyph_alpha(word)
    assert alpha[:, 0].max() == 0 and alpha[:, -1].max() == 0, word


@pytest.mark.parametrize("split", ["train", "heldout", "heldout_words"])
def test_shipped_prompt_files_are_what_the_generator_writes(tmp_path, split):
  path = tmp_path / f"{split}.csv"
  n = st.write_prompt_csv(str(path), split)
  assert filecmp.cmp(path, st.prompt_csv(split), shallow=False)
  records = prompts_lib.load_prompts(st.prompt_csv(split))
  assert len(records) == n == len(st.split_pairs(split))
  for record, (word, color) in zip(records, st.split_pairs(split)):
    assert record.metadata["text"] == word and record.metadata["color"] == color
    # What the rewards read from the prompt agrees with the metadata ...
    assert ocr_lib.target_text(record.prompt, None) == word
    # ... and so does what the tiny renderer reads.
    assert tiny_pixel.condition_text(record.prompt) == f"{word}|{color}"


def test_prompt_for_rejects_unknown_colour():
  with pytest.raises(ValueError, match="unknown colour 'teal'"):
    st.prompt_for("CAT", "teal")
