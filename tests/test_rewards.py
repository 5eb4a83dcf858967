"""Rewards on images drawn with Pillow: OCR accuracy, text colour, JPEG size, the host pool."""

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from mgrpo_jax import rewards as rewards_lib
from mgrpo_jax.rewards import ocr as ocr_lib
from mgrpo_jax.rewards import text_color as color_lib


def draw(text, fill=(0, 0, 0), background=(255, 255, 255), size=(320, 112)):
  image = Image.new("RGB", size, background)
  ImageDraw.Draw(image).text((12, 28), text, fill=fill, font=ImageFont.load_default(size=44))
  return np.asarray(image)


def test_levenshtein_by_hand():
  assert ocr_lib.levenshtein("kitten", "sitting") == 3
  assert ocr_lib.levenshtein("", "abc") == 3
  assert ocr_lib.levenshtein("flaw", "lawn") == 2
  assert ocr_lib.levenshtein("same", "same") == 0


def test_ocr_score_rules_by_hand():
  assert ocr_lib.ocr_score("Open Now", "open now") == 1.0  # case and spaces ignored
  assert ocr_lib.ocr_score("BIG SALE today", "sale") == 1.0  # target contained
  assert ocr_lib.ocr_score("HELLQ", "hello") == pytest.approx(1 - 1 / 5)
  assert ocr_lib.ocr_score("", "hello") == 0.0
  assert ocr_lib.ocr_score("a completely different text", "hi") == 0.0  # capped at len
  with pytest.raises(ValueError, match="no target text"):
    ocr_lib.target_text("no quotes here", {})
  assert ocr_lib.target_text('a sign that says "Hi there" twice', None) == "Hi there"


def test_ocr_reward_on_rendered_text():
  reward = rewards_lib.get_reward("ocr")
  images = np.stack([draw("HELLO 42"), draw("HELLO 4Z"), draw("")])
  meta = [{"text": "Hello 42"}] * 3
  scores = reward(images, ["p"] * 3, meta)
  assert scores.dtype == np.float32 and scores.shape == (3,)
  assert scores[0] == 1.0
  assert scores[1] == pytest.approx(1 - 1 / 7)  # one of the 7 non-space characters differs
  assert scores[2] == 0.0
  # Target from the prompt when the metadata has none.
  assert reward(images[:1], ['a sign reading "hello 42"'], [{}])[0] == 1.0


@pytest.mark.parametrize("color", ["red", "blue", "green", "black", "orange", "purple"])
def test_text_color_on_rendered_text(color):
  reward = rewards_lib.get_reward("text_color")
  rgb = color_lib.COLORS[color]
  image = draw("OPEN DAILY", fill=rgb)
  meta = {"text": "OPEN DAILY", "color": color}
  measured = reward.measure(image, "p", meta)
  # Anti-aliased glyph edges blend with the background; the median stays near the fill.
  assert np.abs(measured - np.array(rgb)).max() < 40, measured
  assert reward.score_one(image, "p", meta) == 1.0
  other = "yellow" if color != "yellow" else "blue"
  wrong = reward.score_one(image, "p", {"text": "OPEN DAILY", "color": other})
  lab = color_lib.srgb_to_lab(measured)
  d = {n: np.linalg.norm(lab - color_lib.srgb_to_lab(np.array(c)))
       for n, c in color_lib.COLORS.items()}
  assert wrong == pytest.approx(np.exp(-(d[other] - min(d.values())) / 25.0), rel=1e-6)
  assert wrong < 0.5


def test_text_color_white_on_dark_and_errors():
  reward = rewards_lib.get_reward("text_color")
  image = draw("NIGHT CLUB", fill=(255, 255, 255), background=(20, 20, 60))
  assert reward.score_one(image, "p", {"text": "NIGHT CLUB", "color": "white"}) == 1.0
  assert reward.score_one(draw(""), "p", {"text": "x", "color": "red"}) == 0.0
  with pytest.raises(ValueError, match="'teal'"):
    reward.score_one(image, "p", {"text": "NIGHT CLUB", "color": "teal"})


def test_srgb_to_lab_reference_values():
  # Published CIELAB (D65) values of sRGB primaries, e.g. from Bruce Lindbloom's calculator.
  np.testing.assert_allclose(color_lib.srgb_to_lab([255, 255, 255]), [100, 0, 0], atol=0.01)
  np.testing.assert_allclose(color_lib.srgb_to_lab([255, 0, 0]), [53.24, 80.09, 67.20], atol=0.05)
  np.testing.assert_allclose(color_lib.srgb_to_lab([0, 0, 255]), [32.30, 79.19, -107.86],
                             atol=0.05)


def test_jpeg_rewards_equal_pillow_sizes():
  rng = np.random.default_rng(0)
  flat = np.full((64, 64, 3), 128, np.uint8)
  noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
  images = np.stack([flat, noise])
  expected = []
  for im in images:
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="JPEG", quality=95)
    expected.append(len(buf.getvalue()) / 1000)
  comp = rewards_lib.get_reward("jpeg_compressibility")(images, ["a", "b"], [{}, {}])
  incomp = rewards_lib.get_reward("jpeg_incompressibility")(images, ["a", "b"], [{}, {}])
  np.testing.assert_allclose(comp, -np.array(expected), rtol=1e-6)
  np.testing.assert_allclose(incomp, expected, rtol=1e-6)
  assert comp[0] > comp[1]


def test_unknown_reward_lists_available():
  with pytest.raises(ValueError, match="ocr.*text_color|text_color"):
    rewards_lib.get_reward("imagereward")


class _Constant(rewards_lib.PerImageReward):
  def __init__(self, value=1.0, fail_on=None, delay=0.0):
    self.value, self.fail_on, self.delay = value, fail_on, delay
    self.threads = set()

  def score_one(self, image, prompt, metadata):
    self.threads.add(threading.get_ident())
    time.sleep(self.delay)
    if prompt == self.fail_on:
      raise KeyError("boom")
    return float("nan") if prompt == "nan please" else self.value


@pytest.fixture(scope="module", autouse=True)
def _test_rewards():
  for name, factory in (("test_constant", _Constant),
                        ("test_slow", lambda: _Constant(delay=0.2))):
    if name not in rewards_lib.available_rewards():
      rewards_lib.register(name)(factory)


def _batch(prompts):
  return np.zeros((len(prompts), 8, 8, 3), np.uint8), list(prompts), [{}] * len(prompts)


def test_host_rewards_nan_names_reward_and_prompt():
  with rewards_lib.HostRewards({"test_constant": {}}, max_workers=2) as host:
    out = host.score(*_batch(["a", "b", "c"]))
    assert out["test_constant"].dtype == np.float32
    np.testing.assert_array_equal(out["test_constant"], [1, 1, 1])
    with pytest.raises(rewards_lib.RewardError, match="'test_constant'.*'nan please'"):
      host.score(*_batch(["a", "nan please", "c"]))


def test_host_rewards_exception_is_chained():
  with rewards_lib.HostRewards({"test_constant": {"fail_on": "bad"}}, max_workers=2) as host:
    with pytest.raises(rewards_lib.RewardError, match="'test_constant'.*'bad'") as info:
      host.score(*_batch(["ok", "bad"]))
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(ValueError, match="uint8"):
      host.submit(np.zeros((2, 8, 8, 3), np.float32), ["a", "b"], [{}, {}])


def test_host_rewards_run_in_parallel_and_in_background():
  with rewards_lib.HostRewards({"test_slow": {}}, max_workers=4) as host:
    t0 = time.perf_counter()
    future = host.submit(*_batch(["p"] * 8))  # 8 x 0.2 s of work on 4 threads
    submitted = time.perf_counter() - t0
    future.result()
    elapsed = time.perf_counter() - t0
  assert submitted < 0.1  # submit returns at once; scoring continues in the background
  assert elapsed < 0.8 * 8 * 0.2  # well below the serial 1.6 s
  assert len(host.rewards["test_slow"].threads) > 1


# ---- remote reward against a small server on loopback ------------------------------------------
import http.server  # noqa: E402
import json  # noqa: E402

from mgrpo_jax.rewards import remote as remote_lib  # noqa: E402


class _Scorer(http.server.BaseHTTPRequestHandler):
  """Scores each image by its mean red value; fails the first `fail_first` requests with 503."""

  fail_first = 0
  calls = 0

  def do_POST(self):  # noqa: N802
    type(self).calls += 1
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    if type(self).calls <= type(self).fail_first:
      self.send_response(503)
      self.end_headers()
      return
    if self.path == "/bad":
      reply = {"score": 1}
    else:
      images = [remote_lib.decode_png(b) for b in body["images"]]
      reply = {"scores": [float(im[..., 0].mean()) + len(p) for im, p in
                          zip(images, body["prompts"])]}
    data = json.dumps(reply).encode()
    self.send_response(200)
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, *args):
    pass


@pytest.fixture()
def server():
  _Scorer.calls, _Scorer.fail_first = 0, 0
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scorer)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}"
  httpd.shutdown()


def test_remote_reward_round_trip_and_retry(server):
  images = np.zeros((2, 8, 8, 3), np.uint8)
  images[0, ..., 0] = 200
  _Scorer.fail_first = 2  # two 503s, then an answer: retried with backoff
  reward = rewards_lib.get_reward("remote", url=server + "/score", retries=3, backoff=0.01)
  scores = reward(images, ["ab", "abcd"], [{}, {}])
  np.testing.assert_allclose(scores, [200 + 2, 0 + 4])  # PNG is lossless
  assert _Scorer.calls == 3


def test_remote_reward_errors_name_the_server(server):
  images = np.zeros((1, 8, 8, 3), np.uint8)
  bad = rewards_lib.get_reward("remote", url=server + "/bad", retries=0)
  with pytest.raises(remote_lib.RemoteRewardError, match="expected {'scores'"):
    bad(images, ["p"], [{}])
  _Scorer.fail_first = 10
  down = rewards_lib.get_reward("remote", url=server + "/score", retries=1, backoff=0.01)
  with pytest.raises(remote_lib.RemoteRewardError, match=r"failed 2 times.*HTTP 503"):
    down(images, ["p"], [{}])
  nowhere = rewards_lib.get_reward("remote", url="http://127.0.0.1:9/x", retries=0, timeout=2)
  with pytest.raises(remote_lib.RemoteRewardError, match="127.0.0.1:9"):
    nowhere(images, ["p"], [{}])
