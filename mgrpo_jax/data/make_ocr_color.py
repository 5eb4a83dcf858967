r"""Builds an OCR-Color-10-style training CSV from a list of text-rendering prompts.

  python -m mgrpo_jax.data.make_ocr_color --input ocr_prompts.txt --output ocr_color_train.csv

Each input line is a prompt that quotes the text to render (e.g. Flow-GRPO's OCR prompts:
`A neon sign that says "Open 24/7" ...`). The target text is the first quoted span. As in
OCR-Color-10, a prompt that already names exactly one of the ten colours keeps it (source
"allowed"); otherwise a colour is drawn (seeded, uniform) and the constraint sentence
` The color of the text "<text>" is <color>.` is appended (source "augmented"). The output has
the dataset's columns `line_id,prompt,text,color,source` and loads with
`mgrpo_jax.data.prompts.load_ocr_color_csv`.
"""

from __future__ import annotations

import argparse
import csv
import re

import numpy as np

from mgrpo_jax.data.prompts import PromptFileError, load_prompt_lines

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
          "white")
_QUOTED = re.compile(r'"([^"]+)"')


def constrain(prompt: str, rng: np.random.Generator) -> tuple[str, str, str, str]:
  """-> (prompt, text, color, source) for one prompt (see module docstring).

  Raises:
    ValueError: the prompt quotes no text.
  """
  match = _QUOTED.search(prompt)
  if match is None:
    raise ValueError(f"prompt quotes no text to render: {prompt!r}")
  text = match.group(1)
  named = [c for c in COLORS if re.search(rf"\b{c}\b", prompt, flags=re.IGNORECASE)]
  if len(named) == 1:
    return prompt, text, named[0], "allowed"
  color = COLORS[int(rng.integers(len(COLORS)))]
  return f'{prompt} The color of the text "{text}" is {color}.', text, color, "augmented"


def build(input_path: str, output_path: str, seed: int = 0) -> int:
  """Writes the CSV; returns the number of rows. Errors name the input file and line."""
  rng = np.random.default_rng(seed)
  rows = []
  for record in load_prompt_lines(input_path):
    try:
      rows.append(constrain(record.prompt, rng))
    except ValueError as e:
      raise PromptFileError(f"{input_path}:{record.metadata['line']}: {e}") from e
  with open(output_path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["line_id", "prompt", "text", "color", "source"])
    for i, row in enumerate(rows):
      writer.writerow([i, *row])
  return len(rows)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True, help="one prompt per line, quoting its text")
  parser.add_argument("--output", required=True, help="CSV to write")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  n = build(args.input, args.output, args.seed)
  print(f"wrote {n} prompts to {args.output}")


if __name__ == "__main__":
  main()
