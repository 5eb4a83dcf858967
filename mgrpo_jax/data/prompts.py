"""Prompt files in the published formats of the paper's benchmarks, validated row by row.

  OCR-Color-10   CSV with header `line_id,prompt,text,color,source` (quoted fields); the target
                 text and its colour go to the record's metadata for the OCR / colour rewards.
  PickScore-25k  plain text, one prompt per line.

Files are read from where the user keeps them: a path, or a dataset name resolved in
`$MGRPO_DATASETS` (default `../shared/datasets` next to the repository). A malformed row is a
`PromptFileError` naming the file and the line.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any

OCR_COLOR_COLUMNS = ("line_id", "prompt", "text", "color", "source")
# Dataset name -> file name pattern of a split inside the datasets folder.
DATASETS = {
    "ocr_color_10": "ocr_color_10/{split}.csv",
    "pickscore_25k": "pickscore_25k/{split}.txt",
}
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PromptFileError(ValueError):
  """A prompt file that does not follow its format (the message names file and line)."""


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  """One prompt with what the rewards need to know about it.

  Attributes:
    prompt: the text given to the generator.
    metadata: OCR-Color-10: {'text', 'color', 'source', 'line_id'}; text files: {'line'}.
  """

  prompt: str
  metadata: dict[str, Any]


def load_ocr_color_csv(path: str) -> list[PromptRecord]:
  """Reads an OCR-Color-10 CSV.

  Raises:
    FileNotFoundError: no such file.
    PromptFileError: a missing column, a row with the wrong number of fields, an empty prompt,
      text or colour, or invalid UTF-8; the message starts with `path:line:`.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompt file {path} does not exist")
  records = []
  with open(path, encoding="utf-8", newline="") as f:
    try:
      reader = csv.reader(f)
      header = next(reader, None)
      if header is None:
        raise PromptFileError(f"{path}:1: empty file, expected the header "
                              f"{','.join(OCR_COLOR_COLUMNS)}")
      header = [h.strip() for h in header]
      missing = [c for c in OCR_COLOR_COLUMNS if c not in header]
      if missing:
        raise PromptFileError(f"{path}:1: header {header} lacks column(s) {missing}; expected "
                              f"{','.join(OCR_COLOR_COLUMNS)}")
      col = {name: header.index(name) for name in OCR_COLOR_COLUMNS}
      start = reader.line_num
      for row in reader:
        line = reader.line_num  # the row's last physical line (quoted fields may span lines)
        if not row or all(not field.strip() for field in row):
          continue
        if len(row) != len(header):
          raise PromptFileError(f"{path}:{line}: {len(row)} fields, expected {len(header)} "
                                f"({','.join(header)})")
        fields = {name: row[i].strip() for name, i in col.items()}
        for name in ("prompt", "text", "color"):
          if not fields[name]:
            raise PromptFileError(f"{path}:{line}: empty '{name}' field")
        records.append(PromptRecord(fields["prompt"], {
            "text": fields["text"], "color": fields["color"].lower(),
            "source": fields["source"], "line_id": fields["line_id"]}))
    except UnicodeDecodeError as e:
      raise PromptFileError(f"{path}:{_line_of_byte(path, e.start)}: invalid UTF-8 "
                            f"({e.reason})") from e
    except csv.Error as e:
      raise PromptFileError(f"{path}:{reader.line_num}: malformed CSV ({e})") from e
  if not records:
    raise PromptFileError(f"{path}:{start + 1}: no prompts after the header")
  return records


def _line_of_byte(path: str, offset: int) -> int:
  """1-based line of the byte at `offset` of the decoded-so-far text (approximate for CSV)."""
  with open(path, "rb") as f:
    data = f.read()
  # The decoder's offset is within its current chunk; find the first invalid byte instead.
  for lineno, raw in enumerate(data.split(b"\n"), start=1):
    try:
      raw.decode("utf-8")
    except UnicodeDecodeError:
      return lineno
  del offset
  return 1


def load_prompt_lines(path: str) -> list[PromptRecord]:
  """Reads a one-prompt-per-line text file (PickScore-25k); blank lines are skipped.

  Raises:
    FileNotFoundError: no such file.
    PromptFileError: invalid UTF-8 (naming the line) or no prompts at all.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompt file {path} does not exist")
  records = []
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        text = raw.decode("utf-8").strip()
      except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}:{lineno}: invalid UTF-8 ({e.reason} at byte "
                              f"{e.start})") from e
      if text:
        records.append(PromptRecord(text, {"line": lineno}))
  if not records:
    raise PromptFileError(f"{path}: no prompts (the file is empty or blank)")
  return records


def load_prompts(path: str) -> list[PromptRecord]:
  """Reads a prompt file by extension: .csv (OCR-Color-10) or .txt (one prompt per line)."""
  if path.endswith(".csv"):
    return load_ocr_color_csv(path)
  if path.endswith(".txt"):
    return load_prompt_lines(path)
  raise PromptFileError(f"{path}: unknown prompt file type; expected .csv (OCR-Color-10: "
                        f"{','.join(OCR_COLOR_COLUMNS)}) or .txt (one prompt per line)")


def datasets_root() -> str:
  return os.environ.get("MGRPO_DATASETS") or os.path.join(os.path.dirname(_REPO_ROOT), "shared",
                                                           "datasets")


def dataset_path(name: str, split: str) -> str:
  """The file of a named dataset's split, e.g. ('ocr_color_10', 'test') -> .../test.csv.

  Raises:
    ValueError: unknown dataset name.
    FileNotFoundError: the split's file is not there (names the path and $MGRPO_DATASETS).
  """
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)} (or give a path to "
                     "a .csv / .txt prompt file)")
  path = os.path.join(datasets_root(), DATASETS[name].format(split=split))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"dataset {name!r} split {split!r}: {path} does not exist; set "
                            "$MGRPO_DATASETS to the folder holding the prompt files or give "
                            "--config.data.dataset=/path/to/file")
  return path
