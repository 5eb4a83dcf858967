"""Learned rewards that run on the device, jitted and batch-sharded with the policy's mesh.

  pickscore   PickScore_v1 (a CLIP-H/14): exp(logit_scale) * cos(image, prompt) / 26, the
              scaling Flow-GRPO reports (the raw score is around 20-23 for SD3.5 images).
  clipscore   CLIP (e.g. ViT-L/14) cosine similarity of image and prompt embeddings.
  aesthetic   the LAION aesthetic predictor: its linear head on the L2-normalised CLIP ViT-L/14
              image embedding (convert the published torch head with
              `python -m mgrpo_jax.rewards.convert_aesthetic`).

Each is built from local directories given in the config (`config.reward.pickscore_path`,
`clip_path`, `aesthetic_path`); a CLIP directory is a transformers CLIPModel directory that also
holds its tokenizer files. Scores are float32 [P, L] for images [P, L, H, W, 3] (prompt-major, as
sampled), so they join the host rewards without leaving the device until the end.
"""

from __future__ import annotations

import os


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax.models import clip as clip_lib
from mgrpo_jax.models import weights

PICKSCORE_SCALE = 1.0 / 26.0  # Flow-GRPO's normalisation of PickScore
DEVICE_REWARDS = ("pickscore", "clipscore", "aesthetic")
AESTHETIC_LAYERS = ((0, 768, 1024), (2, 1024, 128), (4, 128, 64), (6, 64, 16), (7, 16, 1))


class AestheticHead(nnx.Module):
  """The LAION predictor's MLP: five Linear layers (dropout between them, no activations)."""

  def __init__(self, in_features: int, *, rngs: nnx.Rngs):
    dims = [(i, in_features if k == 0 else n_in, n_out)
            for k, (i, n_in, n_out) in enumerate(AESTHETIC_LAYERS)]
    self.layers = nnx.Dict({str(i): nnx.Linear(n_in, n_out, rngs=rngs) for i, n_in, n_out in dims})

  def __call__(self, x):
    for i, _, _ in AESTHETIC_LAYERS:
      x = self.layers[str(i)](x)
    return x[..., 0]


def _require(path: str, what: str) -> str:
  if not path:
    raise ValueError(f"reward needs config.reward.{what}: a local directory or a Hub repo id")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.reward.{what}={path} does not exist")
  return path


class DeviceReward:
  """A CLIP-based reward: host tokenizer, sharded parameters, jitted `score`."""

  def __init__(self, name: str, reward_config, mesh):
    if name not in DEVICE_REWARDS:
      raise ValueError(f"{name!r} is not a device reward ({DEVICE_REWARDS})")
    self.name = name
    self.mesh = mesh
    key = {"pickscore": "pickscore_path"}.get(name, "clip_path")
    from mgrpo_jax import hub  # pylint: disable=import-outside-toplevel
    directory = _require(hub.model_dir(reward_config.get(key, ""), f"config.reward.{key}"), key)
    config = clip_lib.CLIPConfig.from_hf_config(weights.read_config(directory))
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: clip_lib.CLIPModel(config, rngs=nnx.Rngs(0))))
    state = {"clip": clip_lib.load_clip_state(directory, abstract, mesh=mesh)}
    head_graph = None
    if name == "aesthetic":
      head_path = _require(reward_config.get("aesthetic_path", ""), "aesthetic_path")
      head_graph, head_abstract = nnx.split(nnx.eval_shape(
          lambda: AestheticHead(config.projection_dim, rngs=nnx.Rngs(0))))
      checkpoint = weights.Checkpoint(head_path)
      state["head"] = weights.load_state(
          checkpoint, head_abstract,
          lambda p: (p.rsplit(".", 1)[0] + (".weight" if p.endswith("kernel") else ".bias"),
                     weights.linear_kernel if p.endswith("kernel") else None),
          component="aesthetic head", mesh=mesh)
    self.params = state
    # Only tokenizers are used: no "PyTorch was not found" advice when torch is absent.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    self._tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    self.text_length = config.text.max_position_embeddings
    size = config.vision.image_size

    def score(params, images, ids):
      """images uint8 [P, L, H, W, 3], ids int [P, T] -> float32 [P, L]."""
      p, l = images.shape[:2]
      model = nnx.merge(graphdef, params["clip"])
      pixels = clip_lib.preprocess(images.reshape((p * l,) + images.shape[2:]), size)
      image = model.image_features(pixels)
      image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
      if name == "aesthetic":
        return nnx.merge(head_graph, params["head"])(image).reshape(p, l)
      text = model.text_features(ids)
      text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
      cos = jnp.einsum("pld,pd->pl", image.reshape(p, l, -1), text)
      if name == "pickscore":
        return jnp.exp(params["clip"]["logit_scale"][...]) * cos * PICKSCORE_SCALE
      return cos

    self.score = sharding_lib.with_mesh(jax.jit(score), mesh)

  def tokenize(self, prompts: list[str]) -> np.ndarray:
    return np.asarray(self._tokenizer(list(prompts), padding="max_length",
                                      max_length=self.text_length, truncation=True)["input_ids"],
                      np.int32)

  def __call__(self, images: jax.Array, prompts: list[str]) -> jax.Array:
    """Device images [P, L, H, W, 3] (global, batch-sharded) and this process's P prompts."""
    ids = sharding_lib.global_batch(self.tokenize(prompts), self.mesh)
    return self.score(self.params, images, ids)
