"""Rewards on images drawn with Pillow: OCR accuracy, text colour, JPEG size, the host pool."""

import concurrent.futures as cf
import io
import math
import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from mgrpo_jax import rewards as rewards_lib
from mgrpo_jax.rewards import ocr as ocr_lib
from mgrpo_jax.rewards import text_color as color_lib

WHITE, NAVY, DARK = (255, 255, 255), (20, 20, 60), (30, 30, 30)


def draw(text, fill=(0, 0, 0), background=WHITE, size=(320, 112), lines=None):
  """uint8 [H, W, 3]: `text` in Pillow's scalable default font (44 px, legible to PP-OCR).

  `lines` = [(text, fill, y)] draws several lines instead.
  """
  image = Image.new("RGB", size, background)
  font = ImageFont.load_default(size=44)
  for line, colour, y in lines or [(text, fill, 28)]:
    ImageDraw.Draw(image).text((12, y), line, fill=colour, font=font)
  return np.asarray(image)


# ---- Levenshtein and the OCR score rules, by hand ------------------------------------------------


def test_levenshtein_by_hand():
  assert ocr_lib.levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
  assert ocr_lib.levenshtein("sitting", "kitten") == 3  # symmetric
  assert ocr_lib.levenshtein("", "abc") == 3
  assert ocr_lib.levenshtein("abc", "") == 3
  assert ocr_lib.levenshtein("flaw", "lawn") == 2  # -f, +n
  assert ocr_lib.levenshtein("same", "same") == 0
  assert ocr_lib.levenshtein("abcd", "acbd") == 2  # a transposition is two substitutions
  assert ocr_lib.levenshtein("hello42", "hello") == 2


def test_substring_distance_by_hand():
  assert ocr_lib.substring_distance("daily", "opendaily") == 0
  assert ocr_lib.substring_distance("dai1y", "opendaily") == 1  # one substitution
  assert ocr_lib.substring_distance("nof", "noparking") == 1  # "no" + one extra letter
  assert ocr_lib.substring_distance("xyz", "opendaily") == 2  # "y": delete x and z
  assert ocr_lib.substring_distance("xyz", "open") == 3  # no letter in common
  assert ocr_lib.substring_distance("", "abc") == 0


def test_normalize_keeps_letters_and_digits():
  assert ocr_lib.normalize("Don’t Burn the Bread!") == "dontburnthebread"
  assert ocr_lib.normalize("100% Chance of Rain") == "100chanceofrain"
  assert ocr_lib.normalize("E=mc²") == "emc2"  # NFKC: superscript two -> 2
  assert ocr_lib.normalize("  ") == ""


def test_ocr_score_rules_by_hand():
  assert ocr_lib.ocr_score("Open Now", "open now") == 1.0  # case and spaces ignored
  assert ocr_lib.ocr_score("THATS ALL FOLKS", "That's All Folks!") == 1.0  # punctuation too
  assert ocr_lib.ocr_score("BIG SALE today", "sale") == 1.0  # target contained (Flow-GRPO)
  assert ocr_lib.ocr_score("BIG SALE today", "sale", substring_match=False) == 0.0  # 9 edits >= 4
  assert ocr_lib.ocr_score("HELLQ", "hello") == pytest.approx(1 - 1 / 5)
  assert ocr_lib.ocr_score("HELL", "hello") == pytest.approx(1 - 1 / 5)
  assert ocr_lib.ocr_score("", "hello") == 0.0
  assert ocr_lib.ocr_score("!!", "hello") == 0.0  # nothing left to compare
  assert ocr_lib.ocr_score("a completely different text", "hi") == 0.0  # capped at len
  with pytest.raises(ValueError, match="no letter or digit"):
    ocr_lib.ocr_score("abc", "?!")


def test_target_text():
  assert ocr_lib.target_text('a sign that says "Hi there" and "not this"', None) == "Hi there"
  assert ocr_lib.target_text('says "Hi there"', {"text": "From metadata"}) == "From metadata"
  assert ocr_lib.target_text('says "Hi there"', {"line": 3}) == "Hi there"
  with pytest.raises(ValueError, match="no target text.*'no quotes here'"):
    ocr_lib.target_text("no quotes here", {})
  with pytest.raises(ValueError, match=r"'\?\?\?'.*prompt 'a sign'"):
    ocr_lib.normalized_target("a sign", {"text": "???"})


# ---- OCR reward on rendered text -----------------------------------------------------------------


def test_ocr_reward_on_rendered_text():
  reward = rewards_lib.get_reward("ocr")
  images = np.stack([draw("HELLO 42"), draw("HELLO 4Z"), draw("")])
  meta = [{"text": "Hello 42"}] * 3
  scores = reward(images, ["p"] * 3, meta)
  assert scores.dtype == np.float32 and scores.shape == (3,)
  assert scores[0] == 1.0
  assert scores[1] == pytest.approx(1 - 1 / 7)  # one of the 7 letters and digits differs
  assert scores[2] == 0.0  # nothing detected
  # Target from the prompt's first quoted span when the metadata has none.
  assert reward(images[:1], ['a sign reading "hello 42" above "x"'], [{}])[0] == 1.0
  # Extra text around the target: free with Flow-GRPO's substring rule, else 2 edits of 5.
  assert reward.score_one(images[0], "p", {"text": "hello"}) == 1.0
  strict = rewards_lib.get_reward("ocr", substring_match=False)
  assert strict.score_one(images[0], "p", {"text": "hello"}) == pytest.approx(1 - 2 / 5)
  with pytest.raises(ValueError, match="'!!'.*'the prompt'"):
    reward.score_one(images[0], "the prompt", {"text": "!!"})


class _CountingEngine(ocr_lib.OcrEngine):
  """OcrEngine whose reads are slow fakes that count themselves."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.reads = 0

  def _read(self, image):
    self.reads += 1
    time.sleep(0.2)
    if image[0, 0, 0] == 1:
      raise RuntimeError("engine failed")
    return [(np.zeros((4, 2), np.float32), "TEXT", 0.9)]


def test_ocr_engine_reads_each_image_once():
  engine = _CountingEngine(cache_size=2)
  image = np.zeros((8, 8, 3), np.uint8)
  with cf.ThreadPoolExecutor(4) as pool:  # concurrent requests for one image wait for one read
    results = list(pool.map(lambda _: engine(image), range(4)))
  assert engine.reads == 1 and all(r[0][1] == "TEXT" for r in results)
  engine(image + 2)
  engine(image + 3)  # evicts the first image (cache of 2)
  engine(image)
  assert engine.reads == 4
  failing = image + 1
  with pytest.raises(RuntimeError, match="engine failed"):
    engine(failing)
  with pytest.raises(RuntimeError, match="engine failed"):
    engine(failing)  # failures are retried, not cached
  assert engine.reads == 6
  with pytest.raises(ValueError, match="uint8"):
    engine(np.zeros((8, 8), np.uint8))


# ---- text colour ---------------------------------------------------------------------------------


def test_srgb_to_lab_reference_values():
  # Published CIELAB (D65) values of sRGB colours (e.g. Bruce Lindbloom's calculator).
  np.testing.assert_allclose(color_lib.srgb_to_lab([255, 255, 255]), [100, 0, 0], atol=0.01)
  np.testing.assert_allclose(color_lib.srgb_to_lab([0, 0, 0]), [0, 0, 0], atol=0.01)
  np.testing.assert_allclose(color_lib.srgb_to_lab([255, 0, 0]), [53.24, 80.09, 67.20], atol=0.05)
  np.testing.assert_allclose(color_lib.srgb_to_lab([0, 0, 255]), [32.30, 79.19, -107.86],
                             atol=0.05)
  np.testing.assert_allclose(color_lib.srgb_to_lab([128, 128, 128]), [53.59, 0, 0], atol=0.05)


def test_color_names_match_the_dataset_and_stay_apart():
  # The colour words of OCR-Color-10 (test.csv's `color` column).
  assert sorted(color_lib.SHADES) == sorted(
      ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"])
  for name, shades in color_lib.SHADES.items():
    for shade in shades:  # every shade is nearest to its own name, by a clear margin
      d = color_lib.color_distances(np.array(shade))
      assert d[name] == pytest.approx(0, abs=1e-9)
      assert min(v for k, v in d.items() if k != name) > 25, (name, shade)


def test_color_score_by_hand():
  assert color_lib.color_score([250, 5, 5], "red") == 1.0
  assert color_lib.color_score([0, 255, 0], "Green ") == 1.0  # lime counts as green
  # Shades a single reference per name misreads (see the module docstring).
  assert color_lib.nearest_color([120, 0, 0]) == "red"  # not brown
  assert color_lib.nearest_color([65, 105, 225]) == "blue"  # not purple
  assert color_lib.nearest_color([255, 105, 180]) == "pink"  # not purple
  # Pure red asked to be orange: its nearest orange shade is coral (255, 127, 80).
  d = np.linalg.norm(np.array([53.24, 80.09, 67.20]) - np.array([67.30, 45.35, 47.49]))
  assert color_lib.color_score([255, 0, 0], "orange") == pytest.approx(math.exp(-d / 25),
                                                                       rel=2e-3)
  with pytest.raises(ValueError, match="'teal'.*'black'"):
    color_lib.color_score([0, 0, 0], "teal")


def test_glyph_mask_on_synthetic_crop():
  rng = np.random.default_rng(0)
  crop = np.clip(rng.normal(200, 6, (20, 40, 3)), 0, 255)  # noisy light-grey background
  crop[6:14, 5:35] = (200, 30, 30)  # a red bar for the text
  crop[5, 5:35] = (200, 115, 115)  # an anti-aliased edge, halfway to the background
  yy, xx = np.mgrid[0:20, 0:40]
  border = (yy == 0) | (xx == 0) | (yy == 19) | (xx == 39)
  mask = color_lib.glyph_mask(color_lib.srgb_to_lab(crop.reshape(-1, 3)), border.reshape(-1))
  mask = mask.reshape(20, 40)
  assert not mask[5].any() and not mask[border].any()  # edge blend and background left out
  assert mask[6:14, 5:35].any()
  np.testing.assert_array_equal(np.median(crop[mask], axis=0), [200, 30, 30])


# Text colour -> background it is drawn on (contrasting, as a generated sign would be).
_SAMPLES = {"red": WHITE, "orange": NAVY, "yellow": NAVY, "green": WHITE, "blue": WHITE,
            "purple": WHITE, "pink": DARK, "brown": WHITE, "black": WHITE, "white": NAVY}


@pytest.fixture(scope="module")
def colour_images():
  return {name: draw("OPEN DAILY", fill=color_lib.COLORS[name], background=bg)
          for name, bg in _SAMPLES.items()}


def test_text_color_on_rendered_text(colour_images):
  reward = rewards_lib.get_reward("text_color")
  names = sorted(_SAMPLES)
  scores = np.zeros((len(names), len(names)))  # [drawn colour, requested colour]
  for i, drawn in enumerate(names):
    image = colour_images[drawn]
    measured = reward.measure(image, "p", {"text": "OPEN DAILY"})
    # Sharp glyphs: the kept core pixels are the fill colour itself.
    delta_e = np.linalg.norm(color_lib.srgb_to_lab(measured)
                             - color_lib.srgb_to_lab(color_lib.COLORS[drawn]))
    assert delta_e < 5, (drawn, measured)
    d = color_lib.color_distances(measured)
    for j, requested in enumerate(names):
      scores[i, j] = reward.score_one(image, "p", {"text": "OPEN DAILY", "color": requested})
      # The documented formula, from the measured colour.
      assert scores[i, j] == pytest.approx(math.exp(-(d[requested] - min(d.values())) / 25))
  np.testing.assert_array_equal(np.diag(scores), 1.0)  # the drawn colour is correct ...
  off_diagonal = scores[~np.eye(len(names), dtype=bool)]
  assert off_diagonal.max() < 0.5  # ... and every other one is clearly wrong,
  # so for each requested colour the image drawn in it scores highest.
  np.testing.assert_array_equal(scores.argmax(0), np.arange(len(names)))
  # Batch call: float32 [N].
  batch = reward(np.stack([colour_images["red"], colour_images["blue"]]), ["p", "p"],
                 [{"text": "OPEN DAILY", "color": "red"}] * 2)
  assert batch.dtype == np.float32 and batch.shape == (2,)
  assert batch[0] == 1.0 and batch[1] == np.float32(scores[names.index("blue"),
                                                           names.index("red")])


def test_text_color_picks_the_target_boxes():
  reward = rewards_lib.get_reward("text_color")
  image = draw(None, size=(320, 224), lines=[("OPEN DAILY", (255, 0, 0), 28),
                                             ("NO PARKING", (0, 0, 255), 130)])
  assert reward.score_one(image, "p", {"text": "Open Daily", "color": "red"}) == 1.0
  assert reward.score_one(image, "p", {"text": "No parking", "color": "blue"}) == 1.0
  assert reward.score_one(image, "p", {"text": "No parking", "color": "red"}) < 0.5
  # No box is part of the target (misspelt beyond recognition): every box is used.
  single = draw("OPEN DAILY", fill=(0, 128, 0))
  assert reward.score_one(single, 'the "XQZW" sign', {"color": "green"}) == 1.0


def test_text_color_no_text_and_errors(colour_images):
  reward = rewards_lib.get_reward("text_color")
  assert reward.score_one(draw(""), "p", {"text": "OPEN", "color": "red"}) == 0.0
  with pytest.raises(ValueError, match="'teal'.*'black'"):
    reward.score_one(colour_images["white"], "p", {"text": "OPEN DAILY", "color": "teal"})
  with pytest.raises(ValueError, match="metadata\\['color'\\].*'the prompt'"):
    reward.score_one(colour_images["white"], "the prompt", {"text": "OPEN DAILY"})


# ---- JPEG ----------------------------------------------------------------------------------------


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
  assert comp.dtype == np.float32 and comp.shape == (2,)
  np.testing.assert_allclose(comp, -np.array(expected), rtol=1e-6)
  np.testing.assert_allclose(incomp, expected, rtol=1e-6)
  assert comp[0] > comp[1] and incomp[0] < incomp[1]  # flat compresses better than noise


# ---- registry ------------------------------------------------------------------------------------


def test_registry():
  names = rewards_lib.available_rewards()
  for name in ("ocr", "text_color", "jpeg_compressibility", "jpeg_incompressibility"):
    assert name in names
  with pytest.raises(ValueError, match="'imagereward'.*'jpeg_compressibility'.*'ocr'"):
    rewards_lib.get_reward("imagereward")
  with pytest.raises(ValueError, match="'ocr' is already registered"):
    rewards_lib.register("ocr")(lambda: None)


def test_every_reward_declares_where_it_runs():
  expected = {"ocr": "host", "text_color": "host", "jpeg_compressibility": "host",
              "blueness": "host", "remote": "remote", "pickscore": "device",
              "clipscore": "device", "aesthetic": "device"}
  assert {name: rewards_lib.placement(name) for name in expected} == expected
  with pytest.raises(ValueError, match="'imagereward'"):
    rewards_lib.placement("imagereward")
  with pytest.raises(ValueError, match="placement must be one of .*'gpu'"):
    rewards_lib.register("gpu_reward", placement="gpu")


# ---- host pool -----------------------------------------------------------------------------------


class _Constant(rewards_lib.PerImageReward):
  def __init__(self, value=1.0, fail_on=None, delay=0.0):
    self.value, self.fail_on, self.delay = value, fail_on, delay
    self.threads = set()

  def score_one(self, image, prompt, metadata):
    self.threads.add(threading.get_ident())
    time.sleep(self.delay)
    if prompt == self.fail_on:
      raise KeyError("boom")
    return float("inf") if prompt == "inf please" else (
        float("nan") if prompt == "nan please" else self.value)


class _SleepyBatch:
  """A whole-batch reward (no `per_image`) that sleeps, then returns `shape` zeros."""

  def __init__(self, delay=0.5, shape=None):
    self.delay, self.shape = delay, shape

  def __call__(self, images, prompts, metadata):
    time.sleep(self.delay)
    return np.zeros(self.shape if self.shape is not None else (len(prompts),))


@pytest.fixture(scope="module", autouse=True)
def _test_rewards():
  for name, factory in (("test_constant", _Constant),
                        ("test_slow", lambda: _Constant(delay=0.2)),
                        ("test_sleepy_a", _SleepyBatch), ("test_sleepy_b", _SleepyBatch)):
    if name not in rewards_lib.available_rewards():
      rewards_lib.register(name)(factory)


def _batch(prompts):
  return np.zeros((len(prompts), 8, 8, 3), np.uint8), list(prompts), [{}] * len(prompts)


def test_host_rewards_results_and_nan():
  with rewards_lib.HostRewards({"test_constant": {"value": 2.5},
                                "jpeg_compressibility": {}}, max_workers=2) as host:
    out = host.score(*_batch(["a", "b", "c"]))
    assert sorted(out) == ["jpeg_compressibility", "test_constant"]
    for values in out.values():
      assert values.dtype == np.float32 and values.shape == (3,)
    np.testing.assert_array_equal(out["test_constant"], [2.5, 2.5, 2.5])
    with pytest.raises(rewards_lib.RewardError,
                       match=r"'test_constant'.*image 1 \(prompt 'nan please'\)"):
      host.score(*_batch(["a", "nan please", "c", "nan please"]))
    with pytest.raises(rewards_lib.RewardError, match=r"'test_constant'.*'inf please'"):
      host.submit(*_batch(["a", "b", "inf please"])).result()


def test_host_rewards_exception_is_chained():
  with rewards_lib.HostRewards({"test_constant": {"fail_on": "bad"}}, max_workers=2) as host:
    with pytest.raises(rewards_lib.RewardError, match="'test_constant'.*'bad'") as info:
      host.score(*_batch(["ok", "bad"]))
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(ValueError, match="uint8"):
      host.submit(np.zeros((2, 8, 8, 3), np.float32), ["a", "b"], [{}, {}])
  with rewards_lib.HostRewards({"test_sleepy_a": {"delay": 0, "shape": (2, 1)}}) as host:
    with pytest.raises(rewards_lib.RewardError, match=r"'test_sleepy_a'.*shape \(2, 1\)"):
      host.score(*_batch(["a", "b"]))
  with rewards_lib.HostRewards({"test_sleepy_a": {"delay": 0, "shape": ()}}) as host:
    with pytest.raises(rewards_lib.RewardError, match=r"'test_sleepy_a'.*shape \(\)"):
      host.score(*_batch(["a", "b"]))


def test_host_rewards_run_concurrently_and_in_background():
  # Two whole-batch rewards of 0.5 s each: together well under the serial 1 s.
  with rewards_lib.HostRewards({"test_sleepy_a": {}, "test_sleepy_b": {}}, max_workers=2) as host:
    t0 = time.perf_counter()
    future = host.submit(*_batch(["p"] * 3))
    submitted = time.perf_counter() - t0
    out = future.result()
    elapsed = time.perf_counter() - t0
  assert submitted < 0.25  # submit returns at once; scoring continues in the background
  assert elapsed < 0.9, elapsed
  assert sorted(out) == ["test_sleepy_a", "test_sleepy_b"]
  # A per-image reward is spread over the threads: 8 x 0.2 s of work on 4 threads.
  with rewards_lib.HostRewards({"test_slow": {}}, max_workers=4) as host:
    t0 = time.perf_counter()
    host.score(*_batch(["p"] * 8))
    elapsed = time.perf_counter() - t0
  assert elapsed < 0.8 * 8 * 0.2, elapsed
  assert len(host.rewards["test_slow"].threads) > 1


def test_host_rewards_ocr_and_colour_together(colour_images):
  images = np.stack([colour_images["red"], colour_images["blue"], draw("")])
  meta = [{"text": "OPEN DAILY", "color": "red"}] * 3
  with rewards_lib.HostRewards({"ocr": {}, "text_color": {}}, max_workers=2) as host:
    out = host.submit(images, ["p"] * 3, meta).result()
  np.testing.assert_array_equal(out["ocr"], [1, 1, 0])
  assert out["text_color"][0] == 1.0 and out["text_color"][1] < 0.5 and out["text_color"][2] == 0


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
