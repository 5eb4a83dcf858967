r"""Host reward throughput, and how much of it hides behind device sampling.

  python bench/rewards.py                     # 64 px tiny-model images and 512 px text images
  python bench/rewards.py --batches 4 --workers 1 2 4

Part 1 prints images/s of every built-in host reward on two kinds of images: the tiny model's
64 px samples, and 512 px images with rendered text (what OCR sees on SD3.5-M), for each thread
count in --workers.
Part 2 runs the trainer's pattern on the tiny model: sample batch b on the device, submit its
rewards to the pool, sample b + 1 while they run. It prints the wall time of --batches batches
done that way against sampling and scoring one after the other.
With --ocr-scaling it prints only a Markdown table of OCR images/s on the 512 px text images
against the number of workers, for the thread and the process pool (`reward.pool`), each
batch of --images fresh images cut over the workers as in training; "first batch" is the
pool's start-up (forkserver, worker processes, OCR model loads) plus that batch. A line above
it gives the share of one thread's OCR time spent in onnxruntime, which bounds what threads
can gain (the rest holds the GIL):

  python bench/rewards.py --ocr-scaling --workers 1 2 --images 32

Part 3 prints images/s of the on-device rewards (pickscore, clipscore, aesthetic) on a tiny
random CLIP (2 layers of width 64 per tower, 224 px input, 32 px patches) that it writes as a
transformers CLIPModel directory without torch, for the same two kinds of images. Their cost on
real PickScore / CLIP-L weights scales with the model, so read these as the cost of the
preprocessing and plumbing, not of a CLIP-H forward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mgrpo_jax import policy as policy_lib
from mgrpo_jax import rewards as rewards_lib
from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax import train_step as train_step_lib
from mgrpo_jax.config_utils import load_sibling
from mgrpo_jax.models import clip as clip_lib
from mgrpo_jax.models import registry
from mgrpo_jax.rewards import device as device_lib
from mgrpo_jax.rewards import ocr as ocr_lib
from mgrpo_jax.sampling import rollout as rollout_lib
from mgrpo_jax.sampling import schedule
from mgrpo_jax.sampling.tree import tree_spec_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REWARDS = ("ocr", "text_color", "jpeg_compressibility")


def text_images(n: int, size: int = 512) -> np.ndarray:
  colors = [(220, 30, 30), (30, 30, 220), (20, 140, 20), (0, 0, 0)]
  out = []
  for i in range(n):
    image = Image.new("RGB", (size, size), (235, 230, 220))
    ImageDraw.Draw(image).text((40, size // 2 - 40), f"OPEN {i:03d}", fill=colors[i % 4],
                               font=ImageFont.load_default(size=72))
    out.append(np.asarray(image))
  return np.stack(out)


_fresh = iter(range(1, 1 << 30))


def throughput(images, workers, repeats=2) -> dict[str, float]:
  n = len(images)
  prompts = [f'a sign that reads "OPEN {i:03d}"' for i in range(n)]
  metadata = [{"text": f"OPEN {i:03d}", "color": "red"} for i in range(n)]
  out = {}
  for name in REWARDS:
    with rewards_lib.HostRewards({name: {}}, max_workers=workers) as host:
      host.score(images[:2], prompts[:2], metadata[:2])  # load the OCR models
      best = float("inf")
      for r in range(repeats):
        # Fresh pixels every call, so the OCR cache (shared by ocr and text_color) never answers.
        del r
        batch = images.copy()
        batch[:, 0, :3] = np.asarray(np.unravel_index(next(_fresh), (256, 256, 256)),
                                     np.uint8)[:, None].T
        t0 = time.perf_counter()
        host.score(batch, prompts, metadata)
        best = min(best, time.perf_counter() - t0)
    out[name] = n / best
  return out


def ocr_scaling(images: np.ndarray, workers, pools=("thread", "process"), repeats: int = 2):
  """OCR images/s on `images` [N, H, W, 3] per (pool, workers), and each pool's first batch s.

  Every timed batch gets fresh pixels, so no worker's OCR cache answers; the best of `repeats`
  batches is kept (the machine may be shared).
  """
  n = len(images)
  prompts = [f'a sign that reads "OPEN {i:03d}"' for i in range(n)]
  metadata = [{"text": f"OPEN {i:03d}"} for i in range(n)]

  def fresh():
    batch = images.copy()
    batch[:, 0, :3] = np.asarray(np.unravel_index(next(_fresh), (256, 256, 256)),
                                 np.uint8)[:, None].T
    return batch

  rows = []
  for pool in pools:
    for w in workers:
      t0 = time.perf_counter()
      with rewards_lib.HostRewards({"ocr": {}}, max_workers=w, pool=pool) as host:
        # The whole batch, so that every worker starts and loads its OCR models.
        host.score(fresh(), prompts, metadata)
        first = time.perf_counter() - t0
        best = float("inf")
        for _ in range(repeats):
          batch = fresh()
          t0 = time.perf_counter()
          host.score(batch, prompts, metadata)
          best = min(best, time.perf_counter() - t0)
      rows.append((pool, host.max_workers, n / best, first))
      # One line per row as it is measured, so a run cut at its time limit still reports.
      print(f"ocr scaling: {pool} pool, {host.max_workers} workers: {n / best:.1f} images/s "
            f"(first batch {first:.1f} s)", flush=True)
  return rows


def ocr_released_share(images: np.ndarray) -> float:
  """Share of one thread's OCR wall time spent inside onnxruntime's `run`, which releases the
  GIL; the rest (RapidOCR's Python and numpy pre- and post-processing) holds it, so threads
  can speed OCR up at most 1 / (1 - share) times (Amdahl), processes are not so bounded."""
  import onnxruntime  # pylint: disable=import-outside-toplevel
  engine = ocr_lib.OcrEngine()
  engine(images[0, ::-1].copy())  # load the models (a flipped image: not cached)
  inside = [0.0]
  run = onnxruntime.InferenceSession.run

  def timed_run(self, *args, **kwargs):
    t0 = time.perf_counter()
    try:
      return run(self, *args, **kwargs)
    finally:
      inside[0] += time.perf_counter() - t0

  onnxruntime.InferenceSession.run = timed_run
  try:
    t0 = time.perf_counter()
    for image in images:
      engine(image)
    total = time.perf_counter() - t0
  finally:
    onnxruntime.InferenceSession.run = run
  return inside[0] / total


def print_ocr_scaling(rows) -> None:
  """The rows of `ocr_scaling` as a Markdown table, speed-up against the pool's fewest workers."""
  print("| pool | workers | OCR images/s | speed-up | first batch s |")
  print("| --- | ---: | ---: | ---: | ---: |")
  base = {}
  for pool, w, rate, first in rows:
    base.setdefault(pool, rate)
    print(f"| {pool} | {w} | {rate:.1f} | {rate / base[pool]:.2f}x | {first:.1f} |")


def overlap(batches: int, workers: int) -> tuple[float, float, float]:
  """Seconds for `batches` tiny-model batches: sampling alone, sampling then scoring each batch,
  and scoring in the pool while the next batch samples. Overlap can hide at most the sampling
  time, and only while the device (here the same 2 CPU cores) has cycles to spare."""
  config = load_sibling(os.path.join(ROOT, "configs", "tiny_ocr_color.py"),
                        "tiny_ocr_color").get_config()
  mesh = sharding_lib.make_mesh(config.mesh)
  generator = registry.get_generator(config.model)
  graphdef, trainable, frozen = policy_lib.build_model_states(generator, config, mesh)
  policy = policy_lib.Policy(graphdef, True)
  spec = tree_spec_from_config(config)
  sigmas = schedule.generator_sigmas(generator, config, config.sample.num_steps)
  sample = jax.jit(train_step_lib.make_sample_fn(
      policy, spec, rollout_lib.sampler_from_config(config), sigmas, generator.latent_shape))
  P = config.data.prompts_per_batch
  prompts = [f'a sign that reads "word {i}"' for i in range(P)]
  tokens = sharding_lib.global_batch(generator.tokenize(prompts), mesh)
  neg = sharding_lib.global_batch(generator.tokenize([""] * P), mesh)
  L = spec.num_leaves
  flat_prompts = [p for p in prompts for _ in range(L)]
  meta = [{"text": p.split('"')[1], "color": "red"} for p in flat_prompts]

  def images_of(b):
    out = sample(trainable, frozen, tokens, neg, jax.random.key(b))[3]
    return np.asarray(out).reshape((-1,) + generator.image_shape)

  images_of(0)  # compile
  t0 = time.perf_counter()
  for b in range(batches):
    images_of(300 + b)
  sampling = time.perf_counter() - t0
  with rewards_lib.HostRewards({n: {} for n in REWARDS}, max_workers=workers) as host:
    host.score(images_of(0)[:2], flat_prompts[:2], meta[:2])
    t0 = time.perf_counter()
    for b in range(batches):
      host.score(images_of(100 + b), flat_prompts, meta)
    serial = time.perf_counter() - t0
    t0 = time.perf_counter()
    futures = [host.submit(images_of(200 + b), flat_prompts, meta) for b in range(batches)]
    for f in futures:
      f.result()
    pipelined = time.perf_counter() - t0
  return sampling, serial, pipelined


def write_random_clip(directory: str, seed: int = 0) -> None:
  """A random tiny CLIPModel directory (config.json, safetensors, tokenizer) and an aesthetic
  head in `directory/aesthetic`, written from our own modules in transformers' layout."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, ROOT)
  from tests import sd3_tiny  # pylint: disable=import-outside-toplevel
  tokenizer = sd3_tiny._clip_tokenizer(directory, "<|endoftext|>")  # pylint: disable=protected-access
  tokenizer.save_pretrained(directory)
  vocab = len(tokenizer)
  config = {
      "projection_dim": 32,
      "text_config": dict(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                          max_position_embeddings=77, eos_token_id=vocab - 1),
      "vision_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, image_size=224, patch_size=32),
  }
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  model = clip_lib.CLIPModel(clip_lib.CLIPConfig.from_hf_config(config), rngs=nnx.Rngs(seed))
  tensors = {}
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    key = ".".join(str(k) for k in path)
    name, transform = clip_lib._name(key)  # pylint: disable=protected-access
    value = np.asarray(variable.get_value())
    if transform is not None:  # back to torch's layout: the inverse of the loader's transposes
      value = np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value.T
    tensors[name] = np.array(value, order="C")  # (ascontiguousarray would make 0-d 1-d)
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  head = device_lib.AestheticHead(32, rngs=nnx.Rngs(seed + 1))
  head_tensors = {}
  for path, variable in nnx.to_flat_state(nnx.state(head, nnx.Param)):
    key = ".".join(str(k) for k in path)
    stem, leaf = key.rsplit(".", 1)
    value = np.asarray(variable.get_value())
    head_tensors[stem + (".weight" if leaf == "kernel" else ".bias")] = np.ascontiguousarray(
        value.T if leaf == "kernel" else value)
  os.makedirs(os.path.join(directory, "aesthetic"))
  save_file(head_tensors, os.path.join(directory, "aesthetic", "model.safetensors"))


def device_throughput(images: np.ndarray, directory: str, repeats: int = 3) -> dict[str, float]:
  """images/s of each device reward on `images` [N, H, W, 3] (one image per prompt)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  cfg = ml_collections.ConfigDict({"pickscore_path": directory, "clip_path": directory,
                                   "aesthetic_path": os.path.join(directory, "aesthetic")})
  prompts = [f"a sign that reads OPEN {i}" for i in range(len(images))]
  batch = sharding_lib.global_batch(images[:, None], mesh)
  out = {}
  for name in device_lib.DEVICE_REWARDS:
    reward = device_lib.DeviceReward(name, cfg, mesh)
    reward(batch, prompts).block_until_ready()  # compile
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      reward(batch, prompts).block_until_ready()
      times.append(time.perf_counter() - t0)
    out[name] = len(images) / float(np.median(times))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=16)
  parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--batches", type=int, default=4)
  parser.add_argument("--ocr-scaling", action="store_true",
                      help="only the OCR images/s table, thread vs process pool, per --workers")
  args = parser.parse_args()
  print(f"cpu cores={os.cpu_count()} images per call={args.images}")
  if args.ocr_scaling:
    images = text_images(args.images)
    share = ocr_released_share(images[:8])
    print(f"one thread: {share:.0%} of OCR wall time inside onnxruntime (GIL released), so "
          f"threads can speed OCR up at most {1 / max(1 - share, 1e-9):.0f}x")
    print_ocr_scaling(ocr_scaling(images, args.workers))
    return
  rng = np.random.default_rng(0)
  kinds = {"tiny 64px": rng.integers(0, 256, (args.images, 64, 64, 3), dtype=np.uint8),
           "text 512px": text_images(args.images)}
  print(f"{'images':<12}{'workers':>8}" + "".join(f"{n + ' img/s':>28}" for n in REWARDS))
  for kind, images in kinds.items():
    for w in args.workers:
      res = throughput(images, w)
      print(f"{kind:<12}{w:>8}" + "".join(f"{res[n]:>28.1f}" for n in REWARDS))
  sampling, serial, pipelined = overlap(args.batches, max(args.workers))
  print(f"tiny model, {args.batches} batches, rewards {REWARDS}: sampling alone "
        f"{sampling:.2f} s, sample-then-score "
        f"{serial:.2f} s, overlapped {pipelined:.2f} s ({serial / pipelined:.2f}x)")
  with tempfile.TemporaryDirectory() as directory:
    write_random_clip(directory)
    names = device_lib.DEVICE_REWARDS
    print(f"device rewards, tiny random CLIP, {jax.device_count()} device(s)")
    print(f"{'images':<12}" + "".join(f"{n + ' img/s':>20}" for n in names))
    for kind, images in kinds.items():
      res = device_throughput(images, directory)
      print(f"{kind:<12}" + "".join(f"{res[n]:>20.1f}" for n in names))


if __name__ == "__main__":
  main()
