"""Prompt files in the published formats of the paper's benchmarks, validated row by row.

  OCR-Color-10   CSV with header `line_id,prompt,text,color,source` (quoted fields); the target
                 text and its colour go to the record's metadata for the OCR / colour rewards.
  PickScore-25k  plain text, one prompt per line.

Files are read from where the user keeps them: a path, or a dataset name resolved in
`$MGRPO_DATASETS` (default `../shared/datasets` next to the repository); `load_dataset`, the
reader of `config.data.dataset`, also takes `tfds:<name>`, a split prepared by the TFDS builders
of `tfds_builders.py`. A malformed row is a `PromptFileError` whose message starts with
`file:line:`. What the rewards need is checked here,
before any sampling: an OCR-Color-10 colour must be one of the ten the colour reward knows, its
text must have a letter or digit to read, and `load_prompts(..., reward_names=...)` refuses a
file that lacks what a configured reward reads (a colour, a quoted text).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from typing import Any

OCR_COLOR_COLUMNS = ("line_id", "prompt", "text", "color", "source")
# Dataset name -> file name pattern of a split inside the datasets folder.
DATASETS = {
    "ocr_color_10": "ocr_color_10/{split}.csv",
    "pickscore_25k": "pickscore_25k/{split}.txt",
}
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# `config.data.dataset` prefix of a TFDS copy of a named dataset, e.g. "tfds:ocr_color_10".
TFDS_PREFIX = "tfds:"
_BOM = "\ufeff"  # spreadsheet programs prepend it to UTF-8 exports; it is not part of line 1


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


def _read_text(path: str) -> str:
  """The file decoded as UTF-8 (BOM dropped); invalid bytes are an error naming their line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompt file {path} does not exist")
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise PromptFileError(f"{path}:{line}: invalid UTF-8 ({e.reason}: byte "
                          f"{data[e.start:e.start + 1]!r})") from e
  return text[len(_BOM):] if text.startswith(_BOM) else text


def load_ocr_color_csv(path: str) -> list[PromptRecord]:
  """Reads an OCR-Color-10 CSV.

  The header must name exactly the columns of `OCR_COLOR_COLUMNS` (in any order). Rows that are
  entirely blank are skipped. The colour is lower-cased (the colour reward compares names).

  Args:
    path: the .csv file.

  Returns:
    One record per row, in file order.

  Raises:
    FileNotFoundError: no such file.
    PromptFileError: a missing, unknown or repeated column, a row with the wrong number of
      fields, an empty prompt, text or colour, a colour outside the ten of OCR-Color-10, a text
      without a letter or digit, malformed quoting, invalid UTF-8, or no rows; the message
      starts with `path:line:` (the first line of the offending row).
  """
  from mgrpo_jax.rewards import ocr, text_color  # pylint: disable=import-outside-toplevel
  # strict: a stray or unclosed quote is an error rather than text silently merged into a field.
  reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
  expected = ",".join(OCR_COLOR_COLUMNS)
  line = 1
  try:
    header = next(reader, None)
    if header is None:
      raise PromptFileError(f"{path}:1: empty file, expected the header {expected}")
    header = [h.strip() for h in header]
    missing = [c for c in OCR_COLOR_COLUMNS if c not in header]
    unknown = [c for c in header if c not in OCR_COLOR_COLUMNS]
    repeated = sorted({c for c in header if header.count(c) > 1})
    if missing or unknown or repeated:
      problems = [f"{what} column(s) {cols}" for what, cols in
                  (("missing", missing), ("unknown", unknown), ("repeated", repeated)) if cols]
      raise PromptFileError(f"{path}:1: header {','.join(header)} has {'; '.join(problems)}; "
                            f"expected {expected}")
    col = {name: header.index(name) for name in OCR_COLOR_COLUMNS}
    records = []
    while True:
      # A quoted field may span lines: report the row's first line, where a reader would look.
      line = reader.line_num + 1
      row = next(reader, None)
      if row is None:
        break
      if all(not field.strip() for field in row):
        continue
      if len(row) != len(header):
        raise PromptFileError(f"{path}:{line}: {len(row)} field(s), expected {len(header)} "
                              f"({','.join(header)})")
      fields = {name: row[i].strip() for name, i in col.items()}
      for name in ("prompt", "text", "color"):
        if not fields[name]:
          raise PromptFileError(f"{path}:{line}: empty '{name}' field")
      if fields["color"].lower() not in text_color.SHADES:
        raise PromptFileError(f"{path}:{line}: colour {fields['color']!r} is not one of the ten "
                              f"OCR-Color-10 colours {', '.join(text_color.SHADES)}")
      if not ocr.normalize(fields["text"]):
        raise PromptFileError(f"{path}:{line}: text {fields['text']!r} has no letter or digit "
                              "for the OCR reward to read")
      records.append(PromptRecord(fields["prompt"], {
          "text": fields["text"], "color": fields["color"].lower(),
          "source": fields["source"], "line_id": fields["line_id"]}))
  except csv.Error as e:
    # An unclosed quote is only noticed at the end of the file; the row's start is the clue.
    raise PromptFileError(f"{path}:{line}: malformed CSV in the row starting here ({e})") from e
  if not records:
    raise PromptFileError(f"{path}:{reader.line_num + 1}: no prompt rows after the header")
  return records


def load_prompt_lines(path: str) -> list[PromptRecord]:
  """Reads a one-prompt-per-line text file (PickScore-25k).

  Surrounding whitespace (and the line ending, `\\n` or `\\r\\n`) is stripped; blank lines are
  skipped, so a record's metadata['line'] is its 1-based line in the file.

  Args:
    path: the .txt file.

  Returns:
    One record per non-blank line, in file order.

  Raises:
    FileNotFoundError: no such file.
    PromptFileError: invalid UTF-8 (naming the line) or no prompts at all.
  """
  records = []
  # split('\n') rather than splitlines(): the latter also breaks at \x0b, \x1c, U+2028..., which
  # would shift line numbers away from what an editor shows.
  for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
    text = line.strip()
    if text:
      records.append(PromptRecord(text, {"line": lineno}))
  if not records:
    raise PromptFileError(f"{path}: no prompts (the file is empty or blank)")
  return records


def check_for_rewards(records: list[PromptRecord], reward_names, path: str) -> None:
  """Refuses records that lack what a configured reward reads, before anything is sampled.

  `text_color` needs every record's colour (OCR-Color-10 CSVs have it); `ocr` needs the text to
  render: the record's 'text', or a double-quoted span with a letter or digit in the prompt.

  Raises:
    PromptFileError: naming the file, the line (for text files) and the reward.
  """
  from mgrpo_jax.rewards import ocr, text_color  # pylint: disable=import-outside-toplevel
  names = set(reward_names)
  for record in records:
    where = f"{path}:{record.metadata['line']}" if "line" in record.metadata else path
    if "text_color" in names:
      color = record.metadata.get("color")
      if color is None:
        raise PromptFileError(
            f"{where}: the text_color reward needs a colour for every prompt, which only "
            f"OCR-Color-10 CSV files ({','.join(OCR_COLOR_COLUMNS)}) give; prompt "
            f"{record.prompt!r}")
      try:
        text_color.check_color(color)
      except ValueError as e:
        raise PromptFileError(f"{where}: {e}") from None
    if "ocr" in names:
      try:
        ocr.normalized_target(record.prompt, record.metadata)
      except ValueError as e:
        raise PromptFileError(f"{where}: the ocr reward cannot score this prompt: {e}") from None


def load_prompts(path: str, reward_names=()) -> list[PromptRecord]:
  """Reads a prompt file by extension: .csv (OCR-Color-10) or .txt (one prompt per line).

  Args:
    path: the prompt file.
    reward_names: the run's rewards; every record must carry what they read
      (`check_for_rewards`).

  Raises:
    FileNotFoundError: no such file.
    PromptFileError: an unknown extension, a malformed file (see the two loaders), or records
      without what a reward needs.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompt file {path} does not exist")
  ext = os.path.splitext(path)[1].lower()
  if ext in (".csv", ".txt"):
    records = load_ocr_color_csv(path) if ext == ".csv" else load_prompt_lines(path)
    check_for_rewards(records, reward_names, path)
    return records
  raise PromptFileError(f"{path}: unknown prompt file type {ext or '(no extension)'!r}; expected "
                        f".csv (OCR-Color-10: {','.join(OCR_COLOR_COLUMNS)}) or .txt (one prompt "
                        "per line)")


def datasets_root() -> str:
  """The folder of named datasets: $MGRPO_DATASETS, else `shared/datasets` beside the repo."""
  return os.environ.get("MGRPO_DATASETS") or os.path.join(os.path.dirname(_REPO_ROOT), "shared",
                                                           "datasets")


def _check_split(name: str, split: str) -> None:
  if not split or os.sep in split or "/" in split or split in (".", ".."):
    raise ValueError(f"dataset {name!r}: split {split!r} is not a split name such as 'train' or "
                     "'test'")


def dataset_path(name: str, split: str) -> str:
  """The file of a named dataset's split, e.g. ('ocr_color_10', 'test') -> .../test.csv.

  Raises:
    ValueError: unknown dataset name, or a split that is not a plain file name.
    FileNotFoundError: the split's file is not there (names the path and $MGRPO_DATASETS).
  """
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)} (or give a path to "
                     f"a .csv / .txt prompt file, or {TFDS_PREFIX}<name> for a TFDS copy)")
  _check_split(name, split)
  path = os.path.join(datasets_root(), DATASETS[name].format(split=split))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"dataset {name!r} split {split!r}: {path} does not exist; set "
                            "$MGRPO_DATASETS to the folder holding the prompt files or give "
                            "--config.data.dataset=/path/to/file")
  return path


def _load_tfds(name: str, split: str, data_dir: str) -> tuple[list[PromptRecord], str]:
  """The records of a prepared TFDS split and 'tfds:<name>/<split> in <data dir>'."""
  from mgrpo_jax.data import tfds_builders  # pylint: disable=import-outside-toplevel
  if name not in tfds_builders.NAMES:
    raise ValueError(f"unknown TFDS dataset {TFDS_PREFIX}{name}; known: "
                     f"{', '.join(TFDS_PREFIX + n for n in tfds_builders.NAMES)}")
  _check_split(f"{TFDS_PREFIX}{name}", split)
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  builder = tfds_builders.builder(name, data_dir)  # ImportError without tensorflow-datasets
  root = builder.data_dir_root
  command = tfds_builders.prepare_command(name, data_dir)
  # Preparing is left to the user, once: a run's processes would otherwise race to write it.
  if not builder.is_prepared():
    raise FileNotFoundError(f"{TFDS_PREFIX}{name} is not prepared in {root} (data.tfds_data_dir); "
                            f"prepare it from the prompt files with: {command}")
  if split not in builder.info.splits:
    raise ValueError(f"{TFDS_PREFIX}{name} in {root} has no split {split!r}; prepared: "
                     f"{sorted(builder.info.splits)}. Splits are the files present when it was "
                     f"prepared: add {DATASETS[name].format(split=split)} to {datasets_root()}, "
                     f"delete {builder.data_dir} and run: {command}")
  return tfds_builders.read_split(builder, split), f"{TFDS_PREFIX}{name}/{split} in {root}"


def load_dataset(dataset: str, split: str, reward_names=(),
                 tfds_data_dir: str = "") -> tuple[list[PromptRecord], str]:
  """The prompts of `config.data.dataset`, read the same way by every entry point.

  Args:
    dataset: a name of `DATASETS` (its `split` file in `datasets_root()`), a path to a .csv /
      .txt prompt file (`split` unused), or `tfds:<name>` (a split prepared by
      `python -m mgrpo_jax.data.tfds_builders --name <name>`).
    split: the split of a named or TFDS dataset, e.g. 'train' or 'test'.
    reward_names: the run's rewards; every record must carry what they read
      (`check_for_rewards`).
    tfds_data_dir: the TFDS data dir of a `tfds:` dataset; "" = TFDS's default
      ($TFDS_DATA_DIR, else ~/tensorflow_datasets).

  Returns:
    (records in file order, where they came from: the file path or 'tfds:<name>/<split> in
    <data dir>').

  Raises:
    ValueError: an unknown name or TFDS name (listing the known ones), a bad or unprepared split.
    FileNotFoundError: a missing file, or a TFDS dataset not prepared in the data dir (the
      message gives the command that prepares it).
    PromptFileError: a malformed file, or records without what a reward needs.
    ImportError: `tfds:` without tensorflow-datasets installed.
  """
  if dataset.startswith(TFDS_PREFIX):
    records, where = _load_tfds(dataset[len(TFDS_PREFIX):], split, tfds_data_dir)
    check_for_rewards(records, reward_names, where)
    return records, where
  if os.sep in dataset or "/" in dataset or dataset.endswith((".csv", ".txt")):
    path = dataset
  else:
    path = dataset_path(dataset, split)
  return load_prompts(path, reward_names), path
