"""tensorflow-datasets builders for the prompt sets, stored as ArrayRecord, read through grain.

  from mgrpo_jax.data import tfds_builders
  records = tfds_builders.load_records("ocr_color_10", "test", data_dir="~/tensorflow_datasets")

An alternative to the CSV / text readers of `prompts.py` for users whose data lives in TFDS:
`build` prepares `ocr_color_10` (OCR-Color-10: prompt, text, color, source, line_id) and
`pickscore_25k` (prompt, line) from the local copy of the prompt files (`$MGRPO_DATASETS`, else
`../shared/datasets`; nothing is downloaded), one split per file present, in file order
(`DatasetInfo.disable_shuffling`), as ArrayRecord files. `read_split` (and `load_records`, which
prepares first) opens a split as a grain-compatible random-access data source
(`builder.as_data_source`) and returns the same `PromptRecord`s the file readers give, so the
trainer's loader can take either.

A run reads a prepared split with `--config.data.dataset=tfds:ocr_color_10` (and
`--config.data.tfds_data_dir`, default TFDS's); it is prepared once, beforehand, with

  python -m mgrpo_jax.data.tfds_builders --name ocr_color_10 [--data_dir D] [--source_dir S]

Optional extra: `pip install -e ".[tfds]"` (tensorflow-datasets; array_record comes with grain).
Preparing and reading need no TensorFlow: tests/test_tfds.py passes on Python 3.11 with
tensorflow-datasets 4.9.10 and no TensorFlow installed (other Python versions are untested).
The rows are validated by the same readers as the files.
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex

import numpy as np

from mgrpo_jax.data import prompts as prompts_lib

# The datasets that have a builder (each also a `prompts_lib.DATASETS` name).
NAMES = ("ocr_color_10", "pickscore_25k")


def _tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("the TFDS prompt builders need tensorflow-datasets: "
                      "pip install -e \".[tfds]\"") from e
  return tfds


def _splits(name: str, source_dir: str) -> dict[str, str]:
  """split -> prompt file, for every split file of `name` present in `source_dir`."""
  pattern = prompts_lib.DATASETS[name]
  found = {}
  for path in sorted(glob.glob(os.path.join(source_dir, pattern.format(split="*")))):
    stem = os.path.splitext(os.path.basename(path))[0]
    found[stem] = path
  if not found:
    raise FileNotFoundError(f"dataset {name!r}: no {pattern.format(split='<split>')} files in "
                            f"{source_dir} (set $MGRPO_DATASETS)")
  return found


def _make_builders():
  """Defines the builder classes (TFDS is imported only when they are used)."""
  tfds = _tfds()
  text = tfds.features.Text

  class _PromptBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common part: splits from the prompt files present, examples from the file readers."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "From the Flow-GRPO prompt files."}
    FEATURES: dict = {}
    DESCRIPTION = ""

    def __init__(self, *, source_dir: str | None = None, **kwargs):
      self.source_dir = source_dir or prompts_lib.datasets_root()
      super().__init__(**kwargs)

    def _info(self):
      # disable_shuffling keeps file order: record i of a split is row i of its file.
      return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION,
                                   features=tfds.features.FeaturesDict(self.FEATURES),
                                   disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager  # the files are local
      return {split: self._generate_examples(path)
              for split, path in _splits(self.name, self.source_dir).items()}

    def _generate_examples(self, path):
      for i, record in enumerate(prompts_lib.load_prompts(path)):
        yield i, self._example(record)

  class OcrColor10(_PromptBuilder, skip_registration=True):
    name = "ocr_color_10"
    DESCRIPTION = "OCR-Color-10 prompts: render `text` in `color` (Flow-GRPO / Multi-GRPO)."
    FEATURES = {"prompt": text(), "text": text(), "color": text(), "source": text(),
                "line_id": text()}

    def _example(self, record):
      return {"prompt": record.prompt, **{k: str(record.metadata[k]) for k in
                                          ("text", "color", "source", "line_id")}}

  class PickScore25k(_PromptBuilder, skip_registration=True):
    name = "pickscore_25k"
    DESCRIPTION = "PickScore-25k prompts (Flow-GRPO's Pick-a-Pic prompt split)."
    FEATURES = {"prompt": text(), "line": tfds.features.Scalar(dtype=np.int64)}

    def _example(self, record):
      return {"prompt": record.prompt, "line": int(record.metadata["line"])}

  return {"ocr_color_10": OcrColor10, "pickscore_25k": PickScore25k}


def builder(name: str, data_dir: str | None = None, source_dir: str | None = None):
  """The TFDS builder of `name` ('ocr_color_10' or 'pickscore_25k'), ArrayRecord format."""
  builders = _make_builders()
  if name not in builders:
    raise ValueError(f"no TFDS builder for {name!r}; known: {sorted(builders)}")
  return builders[name](data_dir=data_dir, source_dir=source_dir, file_format="array_record")


def build(name: str, data_dir: str | None = None, source_dir: str | None = None):
  """Prepares `name` under `data_dir` (default TFDS's ~/tensorflow_datasets); returns the
  builder. Already prepared versions are reused."""
  b = builder(name, data_dir, source_dir)
  b.download_and_prepare()
  return b


def prepare_command(name: str, data_dir: str | None = None) -> str:
  """The shell command that prepares `name` (under `data_dir`, else TFDS's default)."""
  command = f"python -m mgrpo_jax.data.tfds_builders --name {name}"
  return command + (f" --data_dir {shlex.quote(data_dir)}" if data_dir else "")


def _decode(value):
  return value.decode("utf-8") if isinstance(value, bytes) else value


def read_split(b, split: str) -> list[prompts_lib.PromptRecord]:
  """The records of a split of the prepared builder `b`, in file order; nothing is prepared.

  Reads through `b.as_data_source`, an ArrayRecord random-access source that
  `grain.MapDataset.source` accepts.
  """
  if split not in b.info.splits:
    raise ValueError(f"dataset {b.name!r} has no split {split!r}; prepared: "
                     f"{sorted(b.info.splits)}")
  source = b.as_data_source(split=split)
  records = []
  for i in range(len(source)):
    row = {k: _decode(v) for k, v in source[i].items()}
    prompt = row.pop("prompt")
    if b.name == "pickscore_25k":
      row["line"] = int(row["line"])
    records.append(prompts_lib.PromptRecord(prompt, row))
  return records


def load_records(name: str, split: str, data_dir: str | None = None,
                 source_dir: str | None = None) -> list[prompts_lib.PromptRecord]:
  """A split (prepared first if needed) as `PromptRecord`s, in file order."""
  return read_split(build(name, data_dir, source_dir), split)


def main(argv=None):
  parser = argparse.ArgumentParser(
      description="Prepares a TFDS (ArrayRecord) copy of a prompt set from its local files.")
  parser.add_argument("--name", required=True, choices=NAMES)
  parser.add_argument("--data_dir", default=None, help="TFDS data dir to write (default: "
                      "$TFDS_DATA_DIR, else ~/tensorflow_datasets)")
  parser.add_argument("--source_dir", default=None,
                      help="folder of the prompt files (default: $MGRPO_DATASETS or "
                      "../shared/datasets)")
  args = parser.parse_args(argv)
  b = build(args.name, args.data_dir and os.path.expanduser(args.data_dir), args.source_dir)
  splits = ", ".join(f"{s} ({b.info.splits[s].num_examples} prompts)"
                     for s in sorted(b.info.splits))
  print(f"tfds:{args.name} prepared in {b.data_dir}: {splits}", flush=True)


if __name__ == "__main__":
  main()
