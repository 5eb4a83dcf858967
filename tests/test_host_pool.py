"""The host reward process pool (`reward.pool = "process"`) against serial calls and threads.

The test rewards are module-level classes registered at import, so that worker processes, which
rebuild rewards from their registered factory, can import them (by this module's name).
"""

import multiprocessing
import os
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from mgrpo_jax import rewards as rewards_lib
from mgrpo_jax.rewards import host as host_lib
from mgrpo_jax.rewards import ocr as ocr_lib
from mgrpo_jax.rewards import text_color as color_lib


class _Pid(rewards_lib.PerImageReward):
  """The id of the process that scored the image (float32 holds ids below 2**24 exactly)."""

  def score_one(self, image, prompt, metadata):
    return float(os.getpid())


class _Picky(rewards_lib.PerImageReward):
  """Mean pixel value; raises on prompt 'bad', NaN on 'nan please', kills its process on 'die'."""

  def score_one(self, image, prompt, metadata):
    if prompt == "bad":
      raise KeyError("boom")
    if prompt == "die":
      os._exit(3)  # a crash: no exception, no reply
    return float("nan") if prompt == "nan please" else float(image.mean())


class _BatchMax:
  """A whole-batch reward (no `per_image`): the max pixel of each image, float [N]."""

  def __call__(self, images, prompts, metadata):
    return images.reshape(len(images), -1).max(1).astype(np.float64)


for _name, _factory in (("pool_test_pid", _Pid), ("pool_test_picky", _Picky),
                        ("pool_test_batch_max", _BatchMax),
                        ("pool_test_lambda", lambda: _Pid())):
  if _name not in rewards_lib.available_rewards():
    rewards_lib.register(_name)(_factory)


def draw(text, fill, size=(320, 112)):
  """uint8 [H, W, 3]: `text` in Pillow's scalable default font (44 px) on white."""
  image = Image.new("RGB", size, (255, 255, 255))
  ImageDraw.Draw(image).text((12, 28), text, fill=fill, font=ImageFont.load_default(size=44))
  return np.asarray(image)


def _dead(pid, wait=5.0):
  """True once `pid` no longer exists (a worker is reaped by its forkserver, not by us)."""
  deadline = time.monotonic() + wait
  while time.monotonic() < deadline:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return True
    time.sleep(0.05)
  return False


def _serial(names, images, prompts, metadata, **kwargs):
  """Independent reference: each reward's score_one in a loop in this process, float32 [N]."""
  out = {}
  for name in names:
    reward = rewards_lib.get_reward(name, **kwargs.get(name, {}))
    out[name] = np.float32([reward.score_one(*args) for args in zip(images, prompts, metadata)])
  return out


def test_process_pool_matches_serial_and_threads_reuses_workers_and_closes():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (7, 24, 20, 3), dtype=np.uint8)
  images[2] = 0  # a compressible one
  prompts, metadata = [f"p{i}" for i in range(7)], [{}] * 7
  per_image = ("jpeg_compressibility", "blueness")
  serial = _serial(per_image, images, prompts, metadata)
  spec = {"jpeg_compressibility": {}, "blueness": {}, "pool_test_batch_max": {}}
  with rewards_lib.HostRewards(spec, max_workers=2, pool="thread") as host:
    threads = host.score(images, prompts, metadata)
  host = rewards_lib.HostRewards({**spec, "pool_test_pid": {}}, max_workers=2, pool="process")
  try:
    first = host.score(images, prompts, metadata)
    second = host.submit(images[::-1].copy(), prompts[::-1], metadata).result()
  finally:
    host.close()
  assert list(first) == [*spec, "pool_test_pid"]  # config order
  for name in per_image:
    np.testing.assert_array_equal(first[name], serial[name], err_msg=name)
    np.testing.assert_array_equal(threads[name], serial[name], err_msg=name)
    np.testing.assert_array_equal(second[name], serial[name][::-1], err_msg=name)
  for out in (first, threads):
    assert all(v.dtype == np.float32 and v.shape == (7,) for v in out.values())
    # The whole-batch reward, by hand.
    np.testing.assert_array_equal(out["pool_test_batch_max"], images.reshape(7, -1).max(1))
  # The per-image rewards of both batches ran in at most two other processes: the workers
  # were started once and reused (a fast worker may take every chunk of a batch).
  pids = {int(p) for out in (first, second) for p in out["pool_test_pid"]}
  assert os.getpid() not in pids and 1 <= len(pids) <= 2, pids
  # close() joined the workers: none is alive, none is left in multiprocessing's children.
  assert all(_dead(pid) for pid in pids), pids
  assert not {p.pid for p in multiprocessing.active_children()} & pids


@pytest.mark.slow  # OCR engines load and read under onnxruntime: ~20-40 s on 2 busy cores
def test_process_pool_ocr_matches_serial_and_threads():
  words = [("OPEN", "red"), ("DAILY", "blue"), ("EXIT", "purple")]
  images = np.stack([draw(w, color_lib.COLORS[c]) for w, c in words] + [draw("", (0, 0, 0))])
  prompts = [f'a sign that says "{w}"' for w, _ in words] + ['a sign that says "NOTHING"']
  metadata = [{"text": w, "color": c} for w, c in words] + [{"text": "NOTHING", "color": "red"}]
  # One engine of the test's own, shared by the two serial rewards (as the pool's rewards
  # share theirs): the reference does not touch the pool's engines or cache.
  engine = ocr_lib.OcrEngine()
  serial = _serial(("ocr", "text_color"), images, prompts, metadata,
                   ocr={"engine": engine}, text_color={"engine": engine})
  np.testing.assert_array_equal(serial["ocr"], [1, 1, 1, 0])  # the images are legible
  spec = {"ocr": {}, "text_color": {}}
  with rewards_lib.HostRewards(spec, max_workers=2, pool="thread") as host:
    threads = host.score(images, prompts, metadata)
  with rewards_lib.HostRewards(spec, max_workers=2, pool="process") as host:
    processes = host.score(images, prompts, metadata)
  for name in spec:
    np.testing.assert_array_equal(processes[name], serial[name], err_msg=name)
    np.testing.assert_array_equal(threads[name], serial[name], err_msg=name)


def test_process_pool_errors_name_reward_and_prompt():
  images = np.full((4, 8, 8, 3), 7, np.uint8)
  with rewards_lib.HostRewards({"pool_test_picky": {}}, max_workers=2, pool="process") as host:
    np.testing.assert_array_equal(host.score(images, ["a"] * 4, [{}] * 4)["pool_test_picky"], 7)
    with pytest.raises(rewards_lib.RewardError,
                       match=r"'pool_test_picky' raised on image 2 \(prompt 'bad'\): KeyError"):
      host.score(images, ["a", "b", "bad", "c"], [{}] * 4)
    with pytest.raises(rewards_lib.RewardError,
                       match=r"'pool_test_picky' returned nan for image 3 \(prompt 'nan please'\)"):
      host.submit(images, ["a", "b", "c", "nan please"], [{}] * 4).result()
    with pytest.raises(rewards_lib.RewardError, match=r"worker process died.*'pool_test_picky'"):
      host.score(images, ["a", "die", "b", "c"], [{}] * 4)
    # The dead pool is replaced by fresh workers on the next batch.
    np.testing.assert_array_equal(host.score(images, ["a"] * 4, [{}] * 4)["pool_test_picky"], 7)
    with pytest.raises(ValueError, match="uint8"):
      host.submit(images.astype(np.float32), ["a"] * 4, [{}] * 4)


def test_bad_pool_settings_are_rejected():
  with pytest.raises(ValueError, match=r"reward.num_workers must be >= 0.*got -1"):
    rewards_lib.HostRewards({"jpeg_compressibility": {}}, max_workers=-1)
  with pytest.raises(ValueError, match=r"reward.num_workers must be an integer.*'two'"):
    rewards_lib.HostRewards({"jpeg_compressibility": {}}, max_workers="two")
  with pytest.raises(ValueError, match=r"reward.pool must be one of \('thread', 'process'\)"):
    rewards_lib.HostRewards({"jpeg_compressibility": {}}, pool="fork")
  # A lambda cannot be sent to a worker process: said at construction, naming the reward.
  with pytest.raises(ValueError, match=r"'pool_test_lambda' cannot run in a worker process"):
    rewards_lib.HostRewards({"pool_test_lambda": {}}, pool="process")
  with rewards_lib.HostRewards({"pool_test_lambda": {}}, max_workers=0) as host:  # threads: fine
    assert host.max_workers == len(os.sched_getaffinity(0))
  assert host_lib.resolve_num_workers(3) == 3


def test_config_reaches_the_pool():
  from configs import base  # pylint: disable=import-outside-toplevel
  from mgrpo_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from mgrpo_jax.rewards.scorer import RewardScorer  # pylint: disable=import-outside-toplevel
  from mgrpo_jax.workdir import RESUMABLE_FIELDS  # pylint: disable=import-outside-toplevel
  config = base.get_config()
  assert config.reward.pool == "thread" and "reward.pool" in RESUMABLE_FIELDS
  config.lock()  # as mgrpo-train loads it: only existing keys may be set
  config.reward.pool, config.reward.num_workers = "process", 0
  scorer = RewardScorer(config.reward, sharding_lib.make_mesh(config.mesh),
                        names=("jpeg_compressibility",))
  try:
    assert scorer.host.pool == "process"
    assert scorer.host.max_workers == len(os.sched_getaffinity(0))
  finally:
    scorer.close()
