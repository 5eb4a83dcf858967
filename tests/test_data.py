"""Prompt files (published formats, validation) and the grain prompt loader."""

import csv
import json
import os

import numpy as np
import pytest

from mgrpo_jax.data import loader as loader_lib
from mgrpo_jax.data import prompts as prompts_lib

DATASETS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "shared", "datasets")
needs_data = pytest.mark.skipif(not os.path.isdir(DATASETS), reason="../shared/datasets absent")


@needs_data
def test_ocr_color_file_loads_with_metadata():
  path = os.path.join(DATASETS, "ocr_color_10", "test.csv")
  records = prompts_lib.load_ocr_color_csv(path)
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))  # independent reading with the stdlib
  assert len(records) == len(rows) == 500
  for record, row in zip(records, rows):
    assert record.prompt == row["prompt"]
    assert record.metadata["text"] == row["text"]
    assert record.metadata["color"] == row["color"].lower()
    assert f'"{row["text"]}"' in record.prompt


@needs_data
def test_pickscore_file_and_named_dataset(monkeypatch):
  path = os.path.join(DATASETS, "pickscore_25k", "test.txt")
  with open(path, encoding="utf-8") as f:
    expected = [line.strip() for line in f if line.strip()]
  records = prompts_lib.load_prompts(path)
  assert [r.prompt for r in records] == expected
  monkeypatch.delenv("MGRPO_DATASETS", raising=False)
  assert os.path.samefile(prompts_lib.dataset_path("pickscore_25k", "test"), path)


def _write(tmp_path, name, text, mode="w"):
  p = tmp_path / name
  if mode == "wb":
    p.write_bytes(text)
  else:
    p.write_text(text, encoding="utf-8")
  return str(p)


def test_malformed_csv_rows_name_file_and_line(tmp_path):
  header = "line_id,prompt,text,color,source\n"
  good = '0,"A sign ""Hi"". The color of the text ""Hi"" is red.",Hi,red,x\n'
  path = _write(tmp_path, "file.csv", header + good + good + "3,a prompt,Hi\n")
  with pytest.raises(prompts_lib.PromptFileError, match=r"file\.csv:4: 3 fields"):
    prompts_lib.load_prompts(path)
  path = _write(tmp_path, "file.csv", header + good + "1,a prompt,,red,x\n")
  with pytest.raises(prompts_lib.PromptFileError, match=r"file\.csv:3: empty 'text'"):
    prompts_lib.load_prompts(path)
  path = _write(tmp_path, "file.csv", "line_id,prompt,text,source\n" + good)
  with pytest.raises(prompts_lib.PromptFileError, match=r"file\.csv:1: .*\['color'\]"):
    prompts_lib.load_prompts(path)
  path = _write(tmp_path, "file.csv", header)
  with pytest.raises(prompts_lib.PromptFileError, match="no prompts"):
    prompts_lib.load_prompts(path)


def test_text_file_errors(tmp_path):
  path = _write(tmp_path, "p.txt", b"first\nsecond \xff\xfe\n", mode="wb")
  with pytest.raises(prompts_lib.PromptFileError, match=r"p\.txt:2: invalid UTF-8"):
    prompts_lib.load_prompts(path)
  path = _write(tmp_path, "blank.txt", "\n  \n")
  with pytest.raises(prompts_lib.PromptFileError, match="no prompts"):
    prompts_lib.load_prompts(path)
  path = _write(tmp_path, "p.json", "[]")
  with pytest.raises(prompts_lib.PromptFileError, match="unknown prompt file type"):
    prompts_lib.load_prompts(path)
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    prompts_lib.load_prompts(str(tmp_path / "nope.txt"))
  records = prompts_lib.load_prompts(_write(tmp_path, "ok.txt", "a\n\nb\n"))
  assert [(r.prompt, r.metadata["line"]) for r in records] == [("a", 1), ("b", 3)]


def test_dataset_path_override_and_errors(tmp_path, monkeypatch):
  (tmp_path / "pickscore_25k").mkdir()
  _write(tmp_path / "pickscore_25k", "train.txt", "x\n")
  monkeypatch.setenv("MGRPO_DATASETS", str(tmp_path))
  assert prompts_lib.dataset_path("pickscore_25k", "train") == str(
      tmp_path / "pickscore_25k" / "train.txt")
  with pytest.raises(FileNotFoundError, match="MGRPO_DATASETS"):
    prompts_lib.dataset_path("pickscore_25k", "validation")
  with pytest.raises(ValueError, match="ocr_color_10"):
    prompts_lib.dataset_path("coco", "train")


def _records(n):
  return [prompts_lib.PromptRecord(f"p{i}", {"line": i}) for i in range(n)]


def _take(loader, k):
  return np.stack([next(loader)["index"] for _ in range(k)])


def test_loader_epochs_are_seeded_permutations():
  n, b = 12, 4
  a = _take(loader_lib.PromptLoader(_records(n), b, seed=1), 6).reshape(-1)
  again = _take(loader_lib.PromptLoader(_records(n), b, seed=1), 6).reshape(-1)
  other = _take(loader_lib.PromptLoader(_records(n), b, seed=2), 6).reshape(-1)
  np.testing.assert_array_equal(a, again)
  assert not np.array_equal(a, other)
  for epoch in a.reshape(2, n):  # each epoch visits every prompt once, in a fresh order
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
  assert not np.array_equal(a[:n], a[n:])
  unshuffled = _take(loader_lib.PromptLoader(_records(n), b, seed=1, shuffle=False), 3)
  np.testing.assert_array_equal(unshuffled.reshape(-1), np.arange(n))
  batch = next(loader_lib.PromptLoader(_records(n), b, seed=1, shuffle=False))
  assert batch["prompts"] == ["p0", "p1", "p2", "p3"] and batch["metadata"][1] == {"line": 1}
  assert batch["index"].dtype == np.int32


def test_loader_state_round_trip_through_json():
  loader = loader_lib.PromptLoader(_records(7), 3, seed=5)
  _take(loader, 4)
  state = json.loads(json.dumps(loader.get_state()))
  expected = _take(loader, 5)
  resumed = loader_lib.PromptLoader(_records(7), 3, seed=5)
  resumed.set_state(state)
  np.testing.assert_array_equal(_take(resumed, 5), expected)
  with pytest.raises(ValueError, match="batch"):
    resumed.set_state({})


def test_shards_concatenate_to_the_global_batch():
  n, per_shard, shards = 10, 2, 3  # 6 per global batch: batches cross epoch boundaries
  whole = _take(loader_lib.PromptLoader(_records(n), per_shard * shards, seed=0), 5)
  parts = [_take(loader_lib.PromptLoader(_records(n), per_shard, seed=0, shard_index=i,
                                         shard_count=shards), 5) for i in range(shards)]
  np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)
  stream = whole.reshape(-1)
  np.testing.assert_array_equal(np.sort(stream[:n]), np.arange(n))
  np.testing.assert_array_equal(np.sort(stream[n:2 * n]), np.arange(n))


def test_loader_rejects_bad_arguments():
  with pytest.raises(ValueError, match="no prompt records"):
    loader_lib.PromptLoader([], 2, seed=0)
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
