"""TFDS builders (ArrayRecord, read through grain) give the records of the CSV / text readers."""

import os
import shutil

import pytest

pytest.importorskip("tensorflow_datasets")

from mgrpo_jax.data import prompts as prompts_lib  # noqa: E402
from mgrpo_jax.data import tfds_builders  # noqa: E402


@pytest.fixture
def source_dir(tmp_path):
  """A local copy of the prompt files; PickScore's train split cut to keep the test fast."""
  root = prompts_lib.datasets_root()
  if not os.path.isdir(root):
    pytest.skip(f"{root} not present")
  out = tmp_path / "datasets"
  (out / "ocr_color_10").mkdir(parents=True)
  (out / "pickscore_25k").mkdir()
  shutil.copy(os.path.join(root, "ocr_color_10", "test.csv"), out / "ocr_color_10")
  shutil.copy(os.path.join(root, "pickscore_25k", "test.txt"), out / "pickscore_25k")
  with open(os.path.join(root, "pickscore_25k", "train.txt"), encoding="utf-8") as f:
    head = [next(f) for _ in range(300)]
  (out / "pickscore_25k" / "train.txt").write_text("".join(head) + "\n\n  a last prompt  \n",
                                                   encoding="utf-8")
  return str(out)


@pytest.mark.parametrize("name, splits", [("ocr_color_10", ["test"]),
                                          ("pickscore_25k", ["test", "train"])])
def test_records_equal_the_file_readers(name, splits, source_dir, tmp_path):
  import grain
  data_dir = str(tmp_path / "tfds")
  builder = tfds_builders.build(name, data_dir=data_dir, source_dir=source_dir)
  assert sorted(builder.info.splits) == splits
  assert builder.info.file_format.value == "array_record"
  for split in splits:
    expected = prompts_lib.load_prompts(
        os.path.join(source_dir, prompts_lib.DATASETS[name].format(split=split)))
    records = tfds_builders.load_records(name, split, data_dir=data_dir, source_dir=source_dir)
    assert records == expected
    # The split is a random-access source grain reads directly.
    dataset = grain.MapDataset.source(builder.as_data_source(split=split))
    assert len(dataset) == len(expected)
    assert dataset[len(expected) - 1]["prompt"].decode() == expected[-1].prompt


def test_unknown_names_are_errors(source_dir, tmp_path):
  with pytest.raises(ValueError, match="no TFDS builder for 'geneval'"):
    tfds_builders.builder("geneval", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="has no split 'validation'"):
    tfds_builders.load_records("ocr_color_10", "validation", data_dir=str(tmp_path / "t"),
                               source_dir=source_dir)
  with pytest.raises(FileNotFoundError, match="no ocr_color_10/<split>.csv files"):
    tfds_builders.build("ocr_color_10", data_dir=str(tmp_path / "u"),
                        source_dir=str(tmp_path / "empty"))
