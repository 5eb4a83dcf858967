"""A reward computed by a server elsewhere (ImageReward, HPSv2, UnifiedReward, GenEval, ...).

Many scorers exist only in PyTorch; like Flow-GRPO's reward server, they run as a separate
service and this client sends it the images. Select it in a config as

  config.reward.names = ("remote",)      # one remote reward: kwargs come from $MGRPO_REWARD_URL
  # or register named instances in code: rewards.register_remote("imagereward", url=...)

Protocol (HTTP POST, JSON both ways):
  request:  {"images": [base64 PNG, ...], "prompts": [...], "metadata": [{...}, ...]}
  response: {"scores": [float, ...]}   (one per image; anything else is an error)

Requests time out after `timeout` seconds and are retried `retries` times with exponential
backoff; after that the run stops with an error naming the URL and the last failure.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image

from mgrpo_jax.rewards.base import check_batch, register


class RemoteRewardError(RuntimeError):
  """The reward server could not be reached or answered something unusable."""


def encode_png(image: np.ndarray) -> str:
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
  return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(data: str) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


class RemoteReward:
  """Client of one reward server (see module docstring for the protocol).

  Args:
    url: the endpoint, e.g. "http://scorer:18085/imagereward"; default $MGRPO_REWARD_URL.
    timeout: seconds per request.
    retries: extra attempts after a failure (connection errors, HTTP 5xx, timeouts).
    backoff: seconds before the first retry, doubled each time.
  """

  per_image = False  # one request per batch

  def __init__(self, url: str | None = None, timeout: float = 120.0, retries: int = 3,
               backoff: float = 1.0):
    self.url = url or os.environ.get("MGRPO_REWARD_URL", "")
    if not self.url:
      raise ValueError("remote reward: no url (pass url= or set $MGRPO_REWARD_URL)")
    self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)

  def _post(self, body: bytes) -> dict:
    request = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=self.timeout) as response:
      return json.loads(response.read())

  def __call__(self, images, prompts, metadata) -> np.ndarray:
    check_batch(images, prompts, metadata)
    body = json.dumps({"images": [encode_png(im) for im in images], "prompts": list(prompts),
                       "metadata": [dict(m) for m in metadata]}).encode()
    delay, last = self.backoff, None
    for attempt in range(self.retries + 1):
      try:
        reply = self._post(body)
        break
      except urllib.error.HTTPError as e:
        last = f"HTTP {e.code}: {e.read()[:200]!r}"
        if e.code < 500:  # the request itself is wrong: retrying will not help
          raise RemoteRewardError(f"reward server {self.url} rejected the request ({last})") \
              from e
      except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as e:
        last = f"{type(e).__name__}: {e}"
      if attempt < self.retries:
        time.sleep(delay)
        delay *= 2
    else:
      raise RemoteRewardError(f"reward server {self.url} failed {self.retries + 1} times; last "
                              f"error: {last}")
    scores = reply.get("scores") if isinstance(reply, dict) else None
    if not isinstance(scores, list) or len(scores) != len(images):
      raise RemoteRewardError(f"reward server {self.url} answered {str(reply)[:200]!r}; expected "
                              f"{{'scores': [{len(images)} floats]}}")
    return np.asarray(scores, np.float32)


register("remote", placement="remote")(RemoteReward)


def register_remote(name: str, url: str, **kwargs) -> None:
  """Registers a remote reward under its own name, so it can sit beside others in a config."""
  register(name, placement="remote")(
      lambda **overrides: RemoteReward(url=url, **{**kwargs, **overrides}))
