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


# A small OCR-Color-10 file written here: a quoted comma and doubled quotes in a prompt, an
# upper-case colour (records hold it lower-cased), a blank row (skipped).
SMALL_CSV = ('line_id,prompt,text,color,source\n'
             '7,"A sign, red, that reads ""OPEN""",OPEN,Red,sign\n'
             '\n'
             '9,"A mug printed with ""TEA"" in blue",TEA,blue,mug\n')
SMALL_RECORDS = [
    prompts_lib.PromptRecord('A sign, red, that reads "OPEN"',
                             {"text": "OPEN", "color": "red", "source": "sign", "line_id": "7"}),
    prompts_lib.PromptRecord('A mug printed with "TEA" in blue',
                             {"text": "TEA", "color": "blue", "source": "mug", "line_id": "9"}),
]


@pytest.fixture
def small_datasets(tmp_path, monkeypatch):
  """$MGRPO_DATASETS -> a temp folder with ocr_color_10/test.csv and pickscore_25k/test.txt."""
  root = tmp_path / "small"
  (root / "ocr_color_10").mkdir(parents=True)
  (root / "pickscore_25k").mkdir()
  (root / "ocr_color_10" / "test.csv").write_text(SMALL_CSV, encoding="utf-8")
  (root / "pickscore_25k" / "test.txt").write_text("a cat\n\n  a dog  \n", encoding="utf-8")
  monkeypatch.setenv("MGRPO_DATASETS", str(root))
  return root


def test_tfds_dataset_equals_the_file(small_datasets, tmp_path, capsys):
  data_dir = str(tmp_path / "tfds")
  csv_path = str(small_datasets / "ocr_color_10" / "test.csv")
  with pytest.raises(FileNotFoundError, match="tfds:ocr_color_10 is not prepared in .*prepare it "
                     "from the prompt files with: python -m mgrpo_jax.data.tfds_builders --name "
                     f"ocr_color_10 --data_dir {data_dir}$"):
    prompts_lib.load_dataset("tfds:ocr_color_10", "test", tfds_data_dir=data_dir)
  # The command the error names (in-process; its source is $MGRPO_DATASETS).
  tfds_builders.main(["--name", "ocr_color_10", "--data_dir", data_dir])
  assert "test (2 prompts)" in capsys.readouterr().out

  records, where = prompts_lib.load_dataset("tfds:ocr_color_10", "test", ("ocr", "text_color"),
                                            tfds_data_dir=data_dir)
  assert records == SMALL_RECORDS
  assert where == f"tfds:ocr_color_10/test in {data_dir}"
  assert prompts_lib.load_dataset(csv_path, "test") == (SMALL_RECORDS, csv_path)
  assert prompts_lib.load_dataset("ocr_color_10", "test") == (SMALL_RECORDS, csv_path)

  # A split that was not there when the dataset was prepared.
  with pytest.raises(ValueError, match=r"tfds:ocr_color_10 in .* has no split 'train'; "
                     r"prepared: \['test'\].*add ocr_color_10/train.csv"):
    prompts_lib.load_dataset("tfds:ocr_color_10", "train", tfds_data_dir=data_dir)


def test_tfds_records_are_checked_for_the_rewards(small_datasets, tmp_path):
  data_dir = str(tmp_path / "tfds")
  tfds_builders.build("pickscore_25k", data_dir=data_dir)
  records, _ = prompts_lib.load_dataset("tfds:pickscore_25k", "test", tfds_data_dir=data_dir)
  assert records == [prompts_lib.PromptRecord("a cat", {"line": 1}),
                     prompts_lib.PromptRecord("a dog", {"line": 3})]
  with pytest.raises(prompts_lib.PromptFileError,
                     match=r"^tfds:pickscore_25k/test in .*:1: the text_color reward needs"):
    prompts_lib.load_dataset("tfds:pickscore_25k", "test", ("text_color",),
                             tfds_data_dir=data_dir)


def test_plan_shows_a_tfds_dataset(small_datasets, tmp_path):
  from mgrpo_jax import config_utils, plan as plan_lib  # pylint: disable=import-outside-toplevel
  data_dir = str(tmp_path / "tfds")
  tfds_builders.build("ocr_color_10", data_dir=data_dir)
  configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  config = config_utils.load_sibling(os.path.join(configs, "base.py"),
                                     "tiny_ocr_color").get_config()
  config.data.dataset, config.data.split = "tfds:ocr_color_10", "test"
  config.data.tfds_data_dir = data_dir
  plan = plan_lib.make_plan(config, check_model=False)
  assert ("dataset", f"tfds:ocr_color_10/test in {data_dir} (2 prompts)") in plan.rows
  assert not [p for p in plan.problems if p.startswith("data.dataset")], plan.format()
  # Not prepared: a data.dataset problem that says how to prepare it.
  config.data.tfds_data_dir = str(tmp_path / "elsewhere")
  plan = plan_lib.make_plan(config, check_model=False)
  prepare = "python -m mgrpo_jax.data.tfds_builders --name ocr_color_10 --data_dir"
  assert any(p.startswith("data.dataset: tfds:ocr_color_10 is not prepared") and prepare in p
             for p in plan.problems), plan.format()
