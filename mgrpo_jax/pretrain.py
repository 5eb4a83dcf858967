r"""Flow-matching pretraining of the tiny pixel-space text renderer on synthetic OCR-Color data.

  python -m mgrpo_jax.pretrain --workdir /tmp/tiny_text --seed 0
  python -m mgrpo_jax.pretrain --eval --weights mgrpo_jax/assets/tiny_text_renderer
  python -m mgrpo_jax.pretrain --run /tmp/mgrpo_tiny --run_step 12   # a main-job checkpoint

Training (`--workdir`): rectified flow on `data.synthetic_text` batches. For an image x0 in
[-1, 1] and noise eps, sigma ~ logit-normal(0, 1), x = (1 - sigma) x0 + sigma eps, and the model
regresses the velocity eps - x0 (SD3's convention, so the RL samplers use it unchanged), in a
mean over pixels that counts the word's glyphs 1 + `text_loss_weight` times (default 0: a
plain mean). The prompt is replaced by "" with probability `prompt_dropout` so classifier-free
guidance works.
AdamW with a short warm-up. Batches are a pure function of (seed, step), the noise of
fold_in(key(seed), step): a resumed run continues exactly where it stopped. Every
`checkpoint_every` steps the parameters and optimizer state go to WORKDIR/state.npz; the log
is WORKDIR/log.jsonl; at the end the weights are exported to WORKDIR/weights (model.safetensors
+ config.json with this command, the seed and the step count), the layout the `tiny_text`
generator loads.

Evaluation (`--eval`): ODE samples (the project's sampler and schedule, `--num_steps`,
`--guidance`, `--shift`) of a split's prompts, scored with the `ocr` and `text_color` rewards;
prints the means (and writes a grid PNG with --grid).

Flags override the defaults of `default_config()`: `--config.train.steps=7000`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from mgrpo_jax.data import synthetic_text
from mgrpo_jax.models import tiny_pixel


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Base seed: initial parameters, data order, noise.
  config.seed = 0
  # Model sizes (TinyPixelConfig fields; `path`, `dtype` and `display_scale` keep their defaults).
  config.model = ml_collections.ConfigDict(tiny_pixel.TinyPixelConfig().architecture())
  # How the step runs, not what it computes (the weights do not depend on these): the blocks as
  # one scan, rematerialised in the backward pass: on the 2-core CPU a step is ~1.9x faster than
  # with the blocks as a plain loop (`python bench/pretrain_step.py`).
  config.model.scan_layers = True
  config.model.remat = True
  config.train = ml_collections.ConfigDict()
  # Optimizer steps in all (the run stops there; decides the weights, not wall time). With the
  # plain mean (text_loss_weight 0), step 5000 of seed 0 scores held-out OCR ~0.28 and colour
  # ~0.63 at CFG 4.5 (the weights shipped until 2026-11-28); 7000 steps give ~0.66 / ~0.88.
  config.train.steps = 5000
  # Images per step.
  config.train.batch_size = 32
  # AdamW peak learning rate, linear warm-up steps, weight decay, gradient-norm clip.
  config.train.learning_rate = 6e-4
  config.train.warmup_steps = 200
  # After warm-up: "constant" (the shipped recipe; step N of a longer run is then a run of N
  # steps) or "cosine" (half a cosine from the peak down to final_lr_fraction x peak at
  # train.steps: short runs usually end at a lower loss, but intermediate exports are not
  # shorter runs).
  config.train.decay = "constant"
  config.train.final_lr_fraction = 0.0
  config.train.weight_decay = 0.0
  config.train.max_grad_norm = 1.0
  # Probability of training a sample on the empty prompt (for classifier-free guidance).
  config.train.prompt_dropout = 0.1
  # Exponential moving average of the parameters (0: off, the shipped recipe). When on, the
  # exported weights are the average: ema <- decay * ema + (1 - decay) * params after every
  # step, starting from the initial parameters; 1 / (1 - decay) steps is its window.
  config.train.ema_decay = 0.0
  # Extra loss weight on the glyphs (0: a plain mean over pixels).
  # Pixel p of an image counts 1 + text_loss_weight * m_p in a weighted mean, m the word's glyph
  # coverage dilated by one pixel (`text_loss_mask`). Why: text covers ~10% of a training image,
  # so in a plain mean the glyphs, the only part that depends on the word, are a small share of
  # the gradient. With 4, 2,500 steps reach the held-out rewards of 5,000 plain-mean steps: the
  # shipped weights are step 2,500 of seed 0 with weight 4 (README, "The CPU main job").
  config.train.text_loss_weight = 0.0
  config.log = ml_collections.ConfigDict()
  # Log every this many steps; save the resumable state every checkpoint_every steps.
  config.log.log_every = 50
  config.log.checkpoint_every = 250
  # Also export loadable weights to WORKDIR/weights_<step> every this many steps (0: only at the
  # end); the constant learning rate after warm-up makes step N of a longer run the weights of a
  # run of N steps.
  config.log.export_every = 0
  return config


def model_config(config) -> tiny_pixel.TinyPixelConfig:
  return tiny_pixel.TinyPixelConfig(**dict(config.model))


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warm-up from 0 to the peak, then constant or cosine decay (config.train.decay)."""
  t = config.train
  warmup = max(1, int(t.warmup_steps))
  if t.decay == "constant":
    return optax.linear_schedule(0.0, t.learning_rate, warmup)
  if t.decay == "cosine":
    if int(t.steps) <= warmup:
      raise ValueError(f"config.train.decay='cosine' needs train.steps ({t.steps}) > "
                       f"train.warmup_steps ({t.warmup_steps})")
    return optax.warmup_cosine_decay_schedule(
        0.0, t.learning_rate, warmup, int(t.steps), end_value=t.learning_rate * t.final_lr_fraction)
  raise ValueError(f"config.train.decay must be 'constant' or 'cosine', got {t.decay!r}")


def make_optimizer(config) -> optax.GradientTransformation:
  t = config.train
  schedule = learning_rate_schedule(config)
  return optax.chain(optax.clip_by_global_norm(t.max_grad_norm),
                     optax.adamw(schedule, weight_decay=t.weight_decay))


def flow_matching_loss(model: tiny_pixel.TinyPixelT2I, tokens, x0, key,
                       weights: jax.Array | None = None) -> jax.Array:
  """Squared velocity error, averaged over batch, pixels and channels.

  Args:
    model: the renderer.
    tokens: {'input_ids': int [B, L]}.
    x0: float [B, s, s, 3] in [-1, 1].
    key: draws sigma [B] and the noise [B, s, s, 3].
    weights: optional float [B, s, s] per-pixel weights: the weighted mean
      sum(w * err) / sum(w) over the batch (channels averaged); None: the plain mean.
  """
  k_sigma, k_noise = jax.random.split(key)
  b = x0.shape[0]
  sigma = jax.nn.sigmoid(jax.random.normal(k_sigma, (b,)))  # logit-normal(0, 1), SD3's choice
  eps = jax.random.normal(k_noise, x0.shape)
  s = sigma[:, None, None, None]
  x = (1.0 - s) * x0 + s * eps
  v = model.velocity(x, sigma, model.encode_text(tokens))
  err = jnp.square(v - (eps - x0))
  if weights is None:
    return jnp.mean(err)
  return jnp.sum(weights * jnp.mean(err, axis=-1)) / jnp.sum(weights)


def make_train_step(graphdef, tx):
  """(params, opt_state, input_ids [B, L], x0 [B, s, s, 3], key, weights [B, s, s] or None)
  -> (params, opt_state, loss)."""

  @jax.jit
  def train_step(params, opt_state, input_ids, x0, key, weights=None):
    def loss_fn(p):
      return flow_matching_loss(nnx.merge(graphdef, p), {"input_ids": input_ids}, x0, key,
                                weights)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


@functools.lru_cache(maxsize=4096)
def text_loss_mask(word: str) -> np.ndarray:
  """The word's glyph coverage dilated by one pixel (3x3 maximum): float32 [s, s] in [0, 1]
  (read-only; cached, since every step draws from the same few hundred words).

  The dilation also weights the background right around the strokes, where a glyph's edges are.
  """
  alpha = np.pad(synthetic_text.glyph_alpha(word), 1)
  s = synthetic_text.IMAGE_SIZE
  mask = np.max([alpha[i:i + s, j:j + s] for i in range(3) for j in range(3)], axis=0)
  mask.setflags(write=False)
  return mask


def batch_for_step(config, tokenizer, step: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """A step's batch (deterministic): input_ids int32 [B, L], x0 float32 [B, s, s, 3] in
  [-1, 1], and the loss's per-pixel weights float32 [B, s, s] (None when
  config.train.text_loss_weight is 0)."""
  prompts, images, pairs = synthetic_text.sample_batch(config.seed, step,
                                                       config.train.batch_size)
  drop = np.random.default_rng([int(config.seed), int(step), 1]).random(len(prompts))
  prompts = ["" if d < config.train.prompt_dropout else p for p, d in zip(prompts, drop)]
  lam = float(config.train.text_loss_weight)
  if lam < 0:
    raise ValueError(f"config.train.text_loss_weight must be >= 0, got {lam}")
  # The image of a dropped prompt still shows the word: its glyphs are weighted all the same.
  weights = (1.0 + lam * np.stack([text_loss_mask(w) for w, _ in pairs])).astype(np.float32) \
      if lam else None
  return tokenizer(prompts)["input_ids"], images * 2.0 - 1.0, weights


def _save_state(path: str, step: int, state) -> None:
  """state: (params, opt_state) or (params, opt_state, ema)."""
  leaves = jax.tree.leaves(state)
  tmp = path + ".tmp.npz"
  np.savez(tmp, step=np.int64(step), **{f"leaf_{i}": np.asarray(x) for i, x in enumerate(leaves)})
  os.replace(tmp, path)


def _load_state(path: str, state):
  """(step, state) from `path`; `state` is the template (same structure as `_save_state`'s)."""
  with np.load(path, allow_pickle=False) as data:
    treedef = jax.tree.structure(state)
    template = jax.tree.leaves(state)
    saved = sum(1 for name in data.files if name.startswith("leaf_"))
    if saved != len(template):
      raise ValueError(f"{path} holds {saved} arrays, this run expects {len(template)} (was it "
                       f"written with another config.train.ema_decay, on or off, or other "
                       f"model sizes?)")
    leaves = [data[f"leaf_{i}"] for i in range(len(template))]
    for i, (a, t) in enumerate(zip(leaves, template)):
      if a.shape != t.shape:
        raise ValueError(f"{path}: saved leaf {i} has shape {a.shape}, the model expects "
                         f"{t.shape} (was it written with other model sizes?)")
    step = int(data["step"])
  return step, jax.tree.unflatten(treedef, [jnp.asarray(a) for a in leaves])


def make_ema_update(decay: float):
  """Jitted (ema, params) -> decay * ema + (1 - decay) * params, leaf by leaf."""
  if not 0.0 < decay < 1.0:
    raise ValueError(f"config.train.ema_decay must be 0 (off) or in (0, 1), got {decay}")
  return jax.jit(lambda ema, params: jax.tree.map(
      lambda e, p: decay * e + (1.0 - decay) * p, ema, params))


def train(config, workdir: str, command: str = "") -> str:
  """Runs (or resumes) pretraining in `workdir`; returns the exported weights directory."""
  os.makedirs(workdir, exist_ok=True)
  cfg = model_config(config)
  if cfg.image_size != synthetic_text.IMAGE_SIZE:
    raise ValueError(f"config.model.image_size={cfg.image_size}, but the synthetic data is "
                     f"{synthetic_text.IMAGE_SIZE} px")
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2) + "\n")
  model = tiny_pixel.TinyPixelT2I(cfg, rngs=nnx.Rngs(config.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = make_optimizer(config)
  opt_state = tx.init(params)
  decay = float(config.train.ema_decay)
  ema_update = make_ema_update(decay) if decay else None
  # The average starts from the initial parameters (a copy: the step does not alias it).
  ema = jax.tree.map(jnp.copy, params) if ema_update else None
  state_path = os.path.join(workdir, "state.npz")
  start = 0
  if os.path.exists(state_path):
    template = (params, opt_state, ema) if ema_update else (params, opt_state)
    start, loaded = _load_state(state_path, template)
    params, opt_state = loaded[:2]
    ema = loaded[2] if ema_update else None
    print(f"resumed from {state_path} at step {start}", flush=True)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"tiny text renderer: {n_params:,} parameters, steps {start}..{config.train.steps}",
        flush=True)
  tokenizer = tiny_pixel.PromptTokenizer(cfg.text_length)
  train_step = make_train_step(graphdef, tx)
  base_key = jax.random.key(config.seed)
  log = open(os.path.join(workdir, "log.jsonl"), "a")
  losses, t0, t_last = [], time.time(), time.time()
  for step in range(start, config.train.steps):
    ids, x0, weights = batch_for_step(config, tokenizer, step)
    params, opt_state, loss = train_step(params, opt_state, ids, x0,
                                         jax.random.fold_in(base_key, step), weights)
    if ema_update:
      ema = ema_update(ema, params)
    losses.append(loss)
    done = step + 1
    if done % config.log.log_every == 0 or done == config.train.steps:
      now = time.time()
      record = {"step": done, "loss": float(np.mean(jax.device_get(losses))),
                "s_per_step": (now - t_last) / len(losses), "elapsed_s": now - t0}
      losses, t_last = [], now
      log.write(json.dumps(record) + "\n")
      log.flush()
      print(json.dumps(record), flush=True)
    if done % config.log.checkpoint_every == 0 or done == config.train.steps:
      _save_state(state_path, done, (params, opt_state, ema) if ema_update else
                  (params, opt_state))
    every = config.log.export_every
    if every and done % every == 0 and done != config.train.steps:
      _export(graphdef, ema if ema_update else params, cfg, config,
              os.path.join(workdir, f"weights_{done}"), done, command)
  log.close()
  out = os.path.join(workdir, "weights")
  _export(graphdef, ema if ema_update else params, cfg, config, out, config.train.steps, command)
  return out


def _export(graphdef, params, cfg, config, out: str, step: int, command: str) -> None:
  tiny_pixel.save_weights(nnx.merge(graphdef, params), cfg, out, {
      "command": command, "seed": int(config.seed), "steps": int(step),
      "batch_size": int(config.train.batch_size), "learning_rate": config.train.learning_rate,
      "decay": config.train.decay, "ema_decay": float(config.train.ema_decay),
      "text_loss_weight": float(config.train.text_loss_weight),
      "font": f"Pillow ImageFont.load_default(size={synthetic_text.FONT_SIZE})",
      "jax_backend": jax.default_backend()})
  print(f"weights of step {step} written to {out}", flush=True)


# ---- evaluation ------------------------------------------------------------------------------

def load_model(weights_dir: str) -> tuple[tiny_pixel.TinyPixelT2I, tiny_pixel.TinyPixelConfig]:
  """The renderer with the weights of a directory written by `train` (eagerly, one device)."""
  arch = tiny_pixel.read_config(weights_dir)["architecture"]
  cfg = tiny_pixel.TinyPixelConfig(**arch, path=weights_dir)
  model = tiny_pixel.TinyPixelT2I(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  state = tiny_pixel.load_weights(cfg, state)
  return nnx.merge(graphdef, state), cfg


@functools.lru_cache(maxsize=8)
def _sampler(graphdef, latent_shape, num_steps: int, guidance: float, shift: float):
  """Jitted (state, ids [B, L], neg_ids [B, L], keys [B]) -> uint8 images, cached per setting."""
  from mgrpo_jax.sampling import schedule  # pylint: disable=import-outside-toplevel
  sigmas = jnp.asarray(schedule.flow_match_sigmas(num_steps, shift))

  @jax.jit
  def run(state, ids, neg_ids, keys):
    m = nnx.merge(graphdef, state)
    cond, uncond = m.encode_text({"input_ids": ids}), m.encode_text({"input_ids": neg_ids})
    x = jax.vmap(lambda k: jax.random.normal(k, latent_shape))(keys)

    def step(x, i):
      s = jnp.full((x.shape[0],), sigmas[i])
      v = m.velocity(x, s, cond)
      if guidance != 1.0:
        v_u = m.velocity(x, s, uncond)
        v = v_u + guidance * (v - v_u)
      return x + (sigmas[i + 1] - sigmas[i]) * v, None

    x, _ = jax.lax.scan(step, x, jnp.arange(num_steps))
    return jnp.round(m.decode(x) * 255).astype(jnp.uint8)

  return run


def sample_images(model, cfg, prompts: list[str], seed: int, num_steps: int, guidance: float,
                  shift: float, batch_size: int = 40) -> np.ndarray:
  """ODE (Euler) samples with CFG on the project's schedule: uint8 [N, H, W, 3].

  The noise of prompt i is `fold_in(key(seed), i)`, so an image does not depend on batching.
  """
  tokenizer = tiny_pixel.PromptTokenizer(cfg.text_length)
  graphdef, state = nnx.split(model)
  run = _sampler(graphdef, tuple(cfg.latent_shape), int(num_steps), float(guidance),
                 float(shift))
  out = []
  base = jax.random.key(seed)
  neg = tokenizer([""] * batch_size)["input_ids"]
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + batch_size))
    images = run(state, tokenizer(padded)["input_ids"], neg, keys)
    out.append(np.asarray(images)[:len(chunk)])
  return np.concatenate(out)


def evaluate(weights_dir: str, split: str = "heldout", seed: int = 0, num_steps: int = 10,
             guidance: float = 4.5, shift: float = 3.0, grid: str = "") -> dict[str, Any]:
  """Held-out OCR and text-colour rewards of ODE samples (see module docstring)."""
  from mgrpo_jax.rewards.ocr import OcrReward  # pylint: disable=import-outside-toplevel
  from mgrpo_jax.rewards.text_color import TextColorReward  # pylint: disable=import-outside-toplevel
  model, cfg = load_model(weights_dir)
  pairs = synthetic_text.split_pairs(split)
  prompts = [synthetic_text.prompt_for(w, c, i) for i, (w, c) in enumerate(pairs)]
  images = sample_images(model, cfg, prompts, seed, num_steps, guidance, shift)
  ocr, color = OcrReward(), TextColorReward()
  meta = [{"text": w, "color": c} for w, c in pairs]
  ocr_scores = np.array([ocr.score_one(im, p, m) for im, p, m in zip(images, prompts, meta)])
  color_scores = np.array([color.score_one(im, p, m) for im, p, m in zip(images, prompts, meta)])
  if grid:
    from mgrpo_jax import metrics  # pylint: disable=import-outside-toplevel
    metrics.make_grid(images, [tiny_pixel.condition_text(p) for p in prompts],
                      ncols=8).save(grid)
  return {"weights": weights_dir, "split": split, "seed": seed, "num_steps": num_steps,
          "guidance": guidance, "shift": shift, "num_images": len(prompts),
          "ocr": float(ocr_scores.mean()), "text_color": float(color_scores.mean()),
          "ocr_exact": float((ocr_scores >= 1).mean()),
          "color_correct": float((color_scores >= 1).mean())}


def evaluate_run(config_path: str, workdir: str, step: int, split: str = "heldout",
                 seed: int = 0, out: str = "") -> dict[str, Any]:
  """`mgrpo-eval` of a main-job checkpoint on a synthetic split (default the held-out prompts).

  `step` 0 evaluates the initial (pretrained) model.
  """
  from mgrpo_jax import evaluate as evaluate_lib  # pylint: disable=import-outside-toplevel
  from mgrpo_jax.config_utils import load_sibling  # pylint: disable=import-outside-toplevel
  from mgrpo_jax.data import prompts as prompts_lib  # pylint: disable=import-outside-toplevel
  path, _, variant = config_path.partition(":")
  config = load_sibling(path, os.path.splitext(os.path.basename(path))[0]).get_config(
      variant or None)
  records = prompts_lib.load_prompts(synthetic_text.prompt_csv(split))
  out = out or os.path.join(workdir, f"eval_{split}_{step:06d}_seed{seed}")
  title = f"{split}, iteration {step}, seed {seed}"
  result = evaluate_lib.evaluate_checkpoint(config, workdir if step > 0 else None, records, out,
                                            step=step if step > 0 else None, seed=seed,
                                            title=title)
  print(evaluate_lib.markdown(result, title))
  print(f"wrote {out}", flush=True)
  return result


def main(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise SystemExit(f"pretrain: unexpected arguments {argv[1:]}")
  if FLAGS.run:
    from absl import logging  # pylint: disable=import-outside-toplevel
    if not FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every restore phase at INFO
    evaluate_run(FLAGS.run_config, FLAGS.run, FLAGS.run_step, FLAGS.split, FLAGS.seed,
                 FLAGS.grid)
    return
  if FLAGS.eval:
    result = evaluate(FLAGS.weights, FLAGS.split, FLAGS.seed, FLAGS.num_steps, FLAGS.guidance,
                      FLAGS.shift, FLAGS.grid)
    print(json.dumps(result, indent=2))
    return
  if not FLAGS.workdir:
    raise SystemExit("pretrain: --workdir is required for training (or pass --eval)")
  config = FLAGS.config
  config.seed = FLAGS.seed
  command = "python -m mgrpo_jax.pretrain " + " ".join(sys.argv[1:])
  train(config, FLAGS.workdir, command)


def run():
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_dict("config", default_config(), "Pretraining settings.")
  flags.DEFINE_string("workdir", None, "Training: output directory (resumes if it has state).")
  flags.DEFINE_integer("seed", 0, "Training: base seed. Evaluation: noise seed.")
  flags.DEFINE_bool("eval", False, "Evaluate weights instead of training.")
  flags.DEFINE_string("weights", tiny_pixel.ASSET_DIR, "Evaluation: weights directory.")
  flags.DEFINE_string("split", "heldout", "Evaluation: 'heldout', 'heldout_words' or 'train'.")
  flags.DEFINE_integer("num_steps", 10, "Evaluation: ODE steps.")
  flags.DEFINE_float("guidance", 4.5, "Evaluation: classifier-free guidance scale.")
  flags.DEFINE_float("shift", 3.0, "Evaluation: SD3 timestep shift of the schedule.")
  flags.DEFINE_string("grid", "", "Evaluation: write the images to this PNG (--run: the output "
                      "directory).")
  flags.DEFINE_string("run", "", "Evaluate this mgrpo-train workdir's checkpoint on --split "
                      "instead (held-out prompts of the main job).")
  flags.DEFINE_string("run_config", os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
      "tiny_ocr_color.py"), "--run: the run's config file (':variant' allowed).")
  flags.DEFINE_integer("run_step", -1, "--run: iteration of the checkpoint (0: the initial "
                       "model, -1: the latest).")
  app.run(main, argv=sys.argv)


if __name__ == "__main__":
  run()
