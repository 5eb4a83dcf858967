"""Prompt files (published formats, validation) and the grain prompt loader."""

import csv
import json
import os
import sys

import numpy as np
import pytest

from mgrpo_jax.data import loader as loader_lib
from mgrpo_jax.data import prompts as prompts_lib

DATASETS = prompts_lib.datasets_root()  # $MGRPO_DATASETS, else ../shared/datasets
needs_data = pytest.mark.skipif(not os.path.isdir(DATASETS), reason=f"{DATASETS} absent")


@needs_data
def test_ocr_color_file_loads_with_metadata():
  path = os.path.join(DATASETS, "ocr_color_10", "test.csv")
  records = prompts_lib.load_ocr_color_csv(path)
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))  # independent reading with the stdlib
  assert len(records) == len(rows) == 500
  for record, row in zip(records, rows):
    assert record.prompt == row["prompt"]
    assert record.metadata == {"text": row["text"], "color": row["color"].lower(),
                               "source": row["source"], "line_id": row["line_id"]}
    assert f'"{row["text"]}"' in record.prompt
    assert record.metadata["color"] in record.prompt.lower()
  assert prompts_lib.load_prompts(path) == records


@needs_data
def test_pickscore_file_and_named_dataset():
  path = os.path.join(DATASETS, "pickscore_25k", "test.txt")
  with open(path, "rb") as f:  # independent count: non-blank lines of the raw bytes
    expected = [line.decode("utf-8").strip() for line in f if line.strip()]
  records = prompts_lib.load_prompts(path)
  assert [r.prompt for r in records] == expected
  assert all(r.prompt and r.prompt == r.prompt.strip() for r in records)
  assert os.path.samefile(prompts_lib.dataset_path("pickscore_25k", "test"), path)
  assert prompts_lib.dataset_path("ocr_color_10", "test").endswith(
      os.path.join("ocr_color_10", "test.csv"))


def test_default_datasets_root_is_beside_the_repo(monkeypatch):
  monkeypatch.delenv("MGRPO_DATASETS", raising=False)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  assert prompts_lib.datasets_root() == os.path.join(os.path.dirname(repo), "shared", "datasets")


def _write(tmp_path, name, text):
  p = tmp_path / name
  if isinstance(text, bytes):
    p.write_bytes(text)
  else:
    p.write_text(text, encoding="utf-8", newline="")
  return str(p)


HEADER = "line_id,prompt,text,color,source\n"
GOOD = '0,"A sign ""Hi"". The color of the text ""Hi"" is Red.",Hi,Red,x\n'


@pytest.mark.parametrize("body, message", [
    # A row with a missing field on line 4.
    (HEADER + GOOD + GOOD + "3,a prompt,Hi\n", r"file\.csv:4: 3 field\(s\), expected 5"),
    (HEADER + GOOD + GOOD + "3,a prompt,Hi,red,x,extra\n", r"file\.csv:4: 6 field"),
    (HEADER + GOOD + GOOD + "3,a prompt,,red,x\n", r"file\.csv:4: empty 'text'"),
    (HEADER + GOOD + GOOD + '3,"  ",Hi,red,x\n', r"file\.csv:4: empty 'prompt'"),
    (HEADER + GOOD + GOOD + "3,a prompt,Hi,,x\n", r"file\.csv:4: empty 'color'"),
    # The row starting on line 3 spans lines 3-4 (a quoted newline); the error is at its start.
    (HEADER + GOOD + '1,"two\nlines",,red,x\n', r"file\.csv:3: empty 'text'"),
    # Blank lines are skipped but still counted.
    (HEADER + GOOD + "\n3,a prompt,Hi\n", r"file\.csv:4: 3 field"),
    ("line_id,prompt,text,source\n" + GOOD, r"file\.csv:1: .*missing column\(s\) \['color'\]"),
    ("line_id,prompt,text,color,source,extra\n" + GOOD, r"file\.csv:1: .*unknown .*'extra'"),
    ("line_id,prompt,text,color,source,text\n" + GOOD, r"file\.csv:1: .*repeated .*'text'"),
    (HEADER, r"file\.csv:2: no prompt rows"),
    ("", r"file\.csv:1: empty file"),
    (HEADER + GOOD + '1,"unclosed,Hi,red,x\n' + GOOD, r"file\.csv:3: malformed CSV"),
    (HEADER + GOOD + '1,"stray" quote,Hi,red,x\n', r"file\.csv:3: malformed CSV"),
])
def test_malformed_csv_names_file_and_line(tmp_path, body, message):
  path = _write(tmp_path, "file.csv", body)
  with pytest.raises(prompts_lib.PromptFileError, match=message):
    prompts_lib.load_prompts(path)


def test_csv_variants_that_load(tmp_path):
  # Excel's UTF-8 BOM, CRLF endings, reordered columns, a quoted newline, a blank line.
  body = ("\ufefftext,color,source,line_id,prompt\r\n"
          'Hi,Blue,s,7,"A ""Hi"" sign\r\non a wall"\r\n\r\n'
          "Yo,red,s,8,Yo\r\n")
  records = prompts_lib.load_prompts(_write(tmp_path, "ok.CSV", body))
  assert [r.prompt for r in records] == ['A "Hi" sign\r\non a wall', "Yo"]
  assert records[0].metadata == {"text": "Hi", "color": "blue", "source": "s", "line_id": "7"}
  with pytest.raises(prompts_lib.PromptFileError, match=r"bad\.csv:3: invalid UTF-8"):
    prompts_lib.load_prompts(_write(tmp_path, "bad.csv", (HEADER + GOOD).encode() +
                                    b"1,caf\xe9,Hi,red,x\n"))


def test_text_file_errors(tmp_path):
  path = _write(tmp_path, "p.txt", b"first\nsecond \xff\xfe\n")
  with pytest.raises(prompts_lib.PromptFileError, match=r"p\.txt:2: invalid UTF-8"):
    prompts_lib.load_prompts(path)
  path = _write(tmp_path, "blank.txt", "\n  \n")
  with pytest.raises(prompts_lib.PromptFileError, match=r"blank\.txt: no prompts"):
    prompts_lib.load_prompts(path)
  path = _write(tmp_path, "p.json", "[]")
  with pytest.raises(prompts_lib.PromptFileError, match=r"p\.json: unknown prompt file type"):
    prompts_lib.load_prompts(path)
  for missing in ("nope.txt", "nope.csv", "nope.json"):
    with pytest.raises(FileNotFoundError, match=missing):
      prompts_lib.load_prompts(str(tmp_path / missing))
  records = prompts_lib.load_prompts(_write(tmp_path, "ok.txt", "\ufeffa \r\n\n  b\nc"))
  assert [(r.prompt, r.metadata) for r in records] == [
      ("a", {"line": 1}), ("b", {"line": 3}), ("c", {"line": 4})]


def test_dataset_path_override_and_errors(tmp_path, monkeypatch):
  (tmp_path / "pickscore_25k").mkdir()
  _write(tmp_path / "pickscore_25k", "train.txt", "x\n")
  monkeypatch.setenv("MGRPO_DATASETS", str(tmp_path))
  assert prompts_lib.dataset_path("pickscore_25k", "train") == str(
      tmp_path / "pickscore_25k" / "train.txt")
  with pytest.raises(FileNotFoundError, match=r"validation\.txt does not exist.*MGRPO_DATASETS"):
    prompts_lib.dataset_path("pickscore_25k", "validation")
  with pytest.raises(FileNotFoundError, match=r"ocr_color_10.*test\.csv"):
    prompts_lib.dataset_path("ocr_color_10", "test")
  with pytest.raises(ValueError, match=r"'coco'.*ocr_color_10.*pickscore_25k"):
    prompts_lib.dataset_path("coco", "train")
  with pytest.raises(ValueError, match="split"):
    prompts_lib.dataset_path("pickscore_25k", "../pickscore_25k/train")


def test_load_dataset_reads_names_and_paths(tmp_path, monkeypatch):
  (tmp_path / "pickscore_25k").mkdir()
  path = _write(tmp_path / "pickscore_25k", "train.txt", "x\n\ny\n")
  monkeypatch.setenv("MGRPO_DATASETS", str(tmp_path))
  expected = [prompts_lib.PromptRecord("x", {"line": 1}),
              prompts_lib.PromptRecord("y", {"line": 3})]
  assert prompts_lib.load_dataset("pickscore_25k", "train") == (expected, path)
  # A path ignores the split; a relative one counts as a path by its extension.
  assert prompts_lib.load_dataset(path, "test") == (expected, path)
  monkeypatch.chdir(tmp_path / "pickscore_25k")
  assert prompts_lib.load_dataset("train.txt", "test") == (expected, "train.txt")
  with pytest.raises(prompts_lib.PromptFileError, match=r"train\.txt:1: the ocr reward cannot"):
    prompts_lib.load_dataset("pickscore_25k", "train", reward_names=("ocr",))
  with pytest.raises(ValueError, match=r"unknown dataset 'coco'.*tfds:<name>"):
    prompts_lib.load_dataset("coco", "train")
  with pytest.raises(FileNotFoundError, match="prompt file /nowhere/p.csv does not exist"):
    prompts_lib.load_dataset("/nowhere/p.csv", "train")


def test_load_dataset_tfds_input_errors(monkeypatch):
  # Caught before TFDS is imported, so they read the same with or without it installed.
  with pytest.raises(ValueError, match="unknown TFDS dataset tfds:coco; known: "
                     "tfds:ocr_color_10, tfds:pickscore_25k"):
    prompts_lib.load_dataset("tfds:coco", "test")
  with pytest.raises(ValueError, match=r"'tfds:ocr_color_10': split '\.\./x' is not a split"):
    prompts_lib.load_dataset("tfds:ocr_color_10", "../x")
  # Without tensorflow-datasets (an import of a None module entry raises ImportError).
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match=r"need tensorflow-datasets: pip install -e \"\.\[tfds\]\""):
    prompts_lib.load_dataset("tfds:ocr_color_10", "test")


def _records(n):
  return [prompts_lib.PromptRecord(f"p{i}", {"line": i}) for i in range(n)]


def _take(loader, k):
  return np.stack([next(loader)["index"] for _ in range(k)])


def test_loader_epochs_are_seeded_permutations():
  n, b = 12, 4
  a = _take(loader_lib.PromptLoader(_records(n), b, seed=1), 9).reshape(-1)
  again = _take(loader_lib.PromptLoader(_records(n), b, seed=1), 9).reshape(-1)
  other = _take(loader_lib.PromptLoader(_records(n), b, seed=2), 9).reshape(-1)
  np.testing.assert_array_equal(a, again)
  assert not np.array_equal(a, other)
  epochs, other_epochs = a.reshape(3, n), other.reshape(3, n)
  for epoch in np.concatenate([epochs, other_epochs]):  # every prompt once per epoch
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
  assert len({tuple(e) for e in epochs}) == 3  # a fresh order each epoch
  # Nearby seeds are unrelated: seed 2 does not replay seed 1's epochs shifted by one.
  assert not np.array_equal(epochs[1], other_epochs[0])
  unshuffled = _take(loader_lib.PromptLoader(_records(n), b, seed=1, shuffle=False), 6)
  np.testing.assert_array_equal(unshuffled.reshape(-1), np.tile(np.arange(n), 2))
  records = _records(n)
  batch = next(loader_lib.PromptLoader(records, b, seed=1, shuffle=False))
  assert batch["prompts"] == ["p0", "p1", "p2", "p3"] and batch["metadata"][1] == {"line": 1}
  assert batch["index"].dtype == np.int32 and batch["index"].shape == (b,)
  batch["metadata"][0]["line"] = 99  # the batch holds copies: the records are not changed
  loader = loader_lib.PromptLoader(records, b, seed=1, shuffle=False)
  assert iter(loader) is loader and next(loader)["metadata"][0] == {"line": 0}


def test_loader_state_round_trip_through_json():
  loader = loader_lib.PromptLoader(_records(7), 3, seed=5)
  _take(loader, 4)
  state = json.loads(json.dumps(loader.get_state()))
  expected = _take(loader, 5)
  resumed = loader_lib.PromptLoader(_records(7), 3, seed=5)
  resumed.set_state(state)
  np.testing.assert_array_equal(_take(resumed, 5), expected)
  resumed.set_state({"batch": 4})  # a state holding only the position is accepted
  np.testing.assert_array_equal(_take(resumed, 5), expected)
  for bad in ({}, {"batch": -1}, {"batch": 1.5}, {"batch": "3"}, None):
    with pytest.raises(ValueError, match="batch"):
      resumed.set_state(bad)
  with pytest.raises(ValueError, match="num_records=7, this loader has num_records=8"):
    loader_lib.PromptLoader(_records(8), 3, seed=5).set_state(state)
  with pytest.raises(ValueError, match="global_batch_size=3, this loader has global_batch_size=4"):
    loader_lib.PromptLoader(_records(7), 2, seed=5, shard_count=2).set_state(state)


def test_shards_concatenate_to_the_global_batch():
  n, per_shard, shards = 10, 2, 3  # 6 per global batch: batches cross epoch boundaries
  whole = _take(loader_lib.PromptLoader(_records(n), per_shard * shards, seed=0), 5)
  parts = [_take(loader_lib.PromptLoader(_records(n), per_shard, seed=0, shard_index=i,
                                         shard_count=shards), 5) for i in range(shards)]
  np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)
  stream = whole.reshape(-1)
  for epoch in stream.reshape(3, n):
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
  # A state saved by one shard resumes any shard layout of the same global batch.
  single = loader_lib.PromptLoader(_records(n), per_shard * shards, seed=0)
  _take(single, 2)
  shard = loader_lib.PromptLoader(_records(n), per_shard, seed=0, shard_index=1,
                                  shard_count=shards)
  shard.set_state(json.loads(json.dumps(single.get_state())))
  np.testing.assert_array_equal(next(shard)["index"], whole[2, per_shard:2 * per_shard])


def test_dataset_smaller_than_a_batch():
  n, b = 3, 5  # every batch spans an epoch boundary; 3 batches = 5 whole epochs
  stream = _take(loader_lib.PromptLoader(_records(n), b, seed=4), 3).reshape(-1)
  for epoch in stream.reshape(5, n):
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
  np.testing.assert_array_equal(
      _take(loader_lib.PromptLoader(_records(1), 4, seed=0), 2), np.zeros((2, 4)))


def test_loader_rejects_bad_arguments():
  with pytest.raises(ValueError, match="no prompt records"):
    loader_lib.PromptLoader([], 2, seed=0)
  with pytest.raises(ValueError, match="batch_size=0"):
    loader_lib.PromptLoader(_records(3), 0, seed=0)
  with pytest.raises(ValueError, match="seed=-1"):
    loader_lib.PromptLoader(_records(3), 1, seed=-1)
  with pytest.raises(ValueError, match="shard_count=0"):
    loader_lib.PromptLoader(_records(3), 1, seed=0, shard_count=0)
  with pytest.raises(ValueError, match="shard_index=2"):
    loader_lib.PromptLoader(_records(3), 1, seed=0, shard_index=2, shard_count=2)


def test_make_ocr_color_training_file(tmp_path):
  from mgrpo_jax.data import make_ocr_color
  src = _write(tmp_path, "ocr.txt", 'A shop sign that says "Open Late" at night\n'
               'Bold red letters reading "Stop" on a wall\n')
  out = str(tmp_path / "train.csv")
  assert make_ocr_color.build(src, out, seed=3) == 2
  records = prompts_lib.load_ocr_color_csv(out)
  first, second = records
  assert first.metadata["text"] == "Open Late" and first.metadata["source"] == "augmented"
  color = first.metadata["color"]
  assert first.prompt == ('A shop sign that says "Open Late" at night The color of the text '
                          f'"Open Late" is {color}.')
  assert color in make_ocr_color.COLORS
  # A prompt naming one colour keeps it and is not rewritten.
  assert second.prompt == 'Bold red letters reading "Stop" on a wall'
  assert (second.metadata["color"], second.metadata["source"]) == ("red", "allowed")
  bad = _write(tmp_path, "bad.txt", 'fine "x"\nno quotes here\n')
  with pytest.raises(prompts_lib.PromptFileError, match=r"bad\.txt:2: prompt quotes no text"):
    make_ocr_color.build(bad, out)
