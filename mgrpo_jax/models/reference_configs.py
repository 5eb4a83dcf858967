"""Architecture configs of the published checkpoints, for planning without their weights.

`mgrpo-train --plan` must resolve SD3.5-Medium and FLUX.1-dev runs on abstract shapes before
anyone has downloaded 20-30 GB of weights. These are the architecture fields of the public
diffusers directories' `config.json` files (model_index.json, transformer, vae, text encoders,
scheduler); `write_config_directory` lays them out as a diffusers directory without weights or
tokenizers, which `SD3Model` / `FluxModel` accept under `nnx.eval_shape`.
"""

from __future__ import annotations

import json
import os

# stabilityai/stable-diffusion-3.5-medium (MMDiT-X: dual attention in blocks 0-12, RMS qk-norm).
SD35_MEDIUM_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2,
    "in_channels": 16, "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24,
    "joint_attention_dim": 4096, "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
    "out_channels": 16, "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm"}
# black-forest-labs/FLUX.1-dev (19 double-stream + 38 single-stream blocks, guidance embedding).
FLUX1_DEV_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64,
    "out_channels": None, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}


def _vae(scaling_factor: float, shift_factor: float) -> dict:
  return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
          "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4,
          "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu",
          "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024,
          "scaling_factor": scaling_factor, "shift_factor": shift_factor,
          "use_quant_conv": False, "use_post_quant_conv": False}


def _clip(hidden: int, layers: int, heads: int, act: str, projection: int | None) -> dict:
  config = {"architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
            "model_type": "clip_text_model", "hidden_size": hidden,
            "intermediate_size": 4 * hidden, "num_attention_heads": heads,
            "num_hidden_layers": layers, "max_position_embeddings": 77, "vocab_size": 49408,
            "hidden_act": act, "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2,
            "pad_token_id": 1}
  if projection:
    config["projection_dim"] = projection
  return config


# google/t5-v1_1-xxl encoder, as shipped in both pipelines.
T5_XXL = {"architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": 4096,
          "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
          "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
          "layer_norm_epsilon": 1e-6}

PIPELINES = {
    "sd35m": {
        "model_index.json": {"_class_name": "StableDiffusion3Pipeline"},
        "transformer": SD35_MEDIUM_TRANSFORMER,
        "vae": _vae(1.5305, 0.0609),
        "text_encoder": _clip(768, 12, 12, "quick_gelu", 768),
        "text_encoder_2": _clip(1280, 32, 20, "gelu", 1280),
        "text_encoder_3": T5_XXL,
        "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler",
                      "num_train_timesteps": 1000, "shift": 3.0},
    },
    "flux1dev": {
        "model_index.json": {"_class_name": "FluxPipeline"},
        "transformer": FLUX1_DEV_TRANSFORMER,
        "vae": _vae(0.3611, 0.1159),
        "text_encoder": _clip(768, 12, 12, "quick_gelu", None),
        "text_encoder_2": T5_XXL,
        "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler",
                      "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                      "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                      "max_image_seq_len": 4096},
    },
}
# The checkpoint each registry generator is planned with when `config.model.path` is empty.
DEFAULT_FOR_GENERATOR = {"sd3": "sd35m", "flux": "flux1dev"}


def write_config_directory(directory: str, name: str) -> str:
  """Writes the config files (no weights, no tokenizers) of pipeline `name` into `directory`.

  Returns:
    `directory`.
  """
  if name not in PIPELINES:
    raise ValueError(f"unknown reference pipeline {name!r}; known: {sorted(PIPELINES)}")
  os.makedirs(directory, exist_ok=True)
  index = dict(PIPELINES[name]["model_index.json"])
  for component, config in PIPELINES[name].items():
    if component == "model_index.json":
      continue
    os.makedirs(os.path.join(directory, component), exist_ok=True)
    filename = "scheduler_config.json" if component == "scheduler" else "config.json"
    with open(os.path.join(directory, component, filename), "w") as f:
      json.dump(config, f, indent=1)
    index[component] = ["diffusers" if component != "text_encoder_2" or name != "flux1dev"
                        else "transformers", config.get("_class_name", "")]
  with open(os.path.join(directory, "model_index.json"), "w") as f:
    json.dump(index, f, indent=1)
  return directory
