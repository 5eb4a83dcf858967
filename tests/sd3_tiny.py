"""Writes tiny random Stable Diffusion 3 and FLUX.1 directories in the real diffusers layout.

Test helpers. Every component is a real diffusers / transformers torch model with small sizes,
saved with the pipeline's `save_pretrained` (safetensors), and the tokenizers are built
offline: byte-level CLIP BPE vocabularies without merges and a character Unigram model for T5.
Requires torch, diffusers and transformers.
"""

import json
import os

RESOLUTION = 32  # the tiny VAE downsamples 2x: 16 x 16 latents
T5_LENGTH = 16


def _byte_chars():
  """CLIP's printable stand-ins for the 256 bytes (written here, not imported)."""
  keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
  chars, extra = [], 0
  for b in range(256):
    if b in keep:
      chars.append(chr(b))
    else:
      chars.append(chr(256 + extra))
      extra += 1
  return chars


def _clip_tokenizer(directory, pad_token):
  from transformers import CLIPTokenizer
  os.makedirs(directory, exist_ok=True)
  chars = _byte_chars()
  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  vocab_file, merges_file = os.path.join(directory, "v.json"), os.path.join(directory, "m.txt")
  json.dump(vocab, open(vocab_file, "w"))
  open(merges_file, "w").write("#version: 0.2\n")
  tok = CLIPTokenizer(vocab_file, merges_file, pad_token=pad_token, model_max_length=77)
  os.remove(vocab_file)
  os.remove(merges_file)
  return tok


def _t5_tokenizer(directory):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import T5TokenizerFast
  os.makedirs(directory, exist_ok=True)
  letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-"
  pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
  pieces += [(c, -2.0) for c in letters]
  tok = Tokenizer(models.Unigram(pieces, unk_id=2))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  path = os.path.join(directory, "t.json")
  tok.save(path)
  out = T5TokenizerFast(tokenizer_file=path, eos_token="</s>", pad_token="<pad>",
                        unk_token="<unk>", extra_ids=0, model_max_length=512)
  os.remove(path)
  return out


def write_tiny_sd3(directory: str, seed: int = 0):
  """Saves a random tiny SD3 pipeline to `directory`; returns the torch pipeline."""
  import diffusers
  import torch
  import transformers

  torch.manual_seed(seed)
  tmp = os.path.join(directory, "_tok")
  tokenizer = _clip_tokenizer(tmp + "1", "<|endoftext|>")
  tokenizer_2 = _clip_tokenizer(tmp + "2", "!")  # SD3's CLIP-G tokenizer pads with "!"
  tokenizer_3 = _t5_tokenizer(tmp + "3")
  vocab = len(tokenizer)
  clip_l = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=64, projection_dim=16,
      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
      hidden_act="quick_gelu", eos_token_id=2, bos_token_id=vocab - 2, pad_token_id=1))
  clip_g = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=40, intermediate_size=80, projection_dim=24,
      num_hidden_layers=2, num_attention_heads=5, max_position_embeddings=77,
      hidden_act="gelu", eos_token_id=vocab - 1, bos_token_id=vocab - 2, pad_token_id=0))
  t5 = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=80, d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
      relative_attention_num_buckets=8, relative_attention_max_distance=20,
      feed_forward_proj="gated-gelu", is_encoder_decoder=False))
  transformer = diffusers.SD3Transformer2DModel(
      sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
      num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32,
      pooled_projection_dim=40, out_channels=16, pos_embed_max_size=16,
      dual_attention_layers=(0,), qk_norm="rms_norm")
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
      up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
      latent_channels=16, norm_num_groups=4, sample_size=RESOLUTION, scaling_factor=1.5305,
      shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
  with torch.no_grad():  # move norms, biases and the zero-initialised adaLN-Zero gates off 0 / 1
    for model in (clip_l, clip_g, t5, transformer, vae):
      for name, p in model.named_parameters():
        if "norm" in name or name.endswith("bias") or "adaLN" in name:
          p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name and
                                               name.endswith("weight") else 0.0))
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
  pipe = diffusers.StableDiffusion3Pipeline(
      transformer=transformer.eval(), scheduler=scheduler, vae=vae.eval(),
      text_encoder=clip_l.eval(), tokenizer=tokenizer, text_encoder_2=clip_g.eval(),
      tokenizer_2=tokenizer_2, text_encoder_3=t5.eval(), tokenizer_3=tokenizer_3)
  pipe.save_pretrained(directory, safe_serialization=True)
  for i in "123":
    if os.path.isdir(tmp + i):
      os.rmdir(tmp + i)
  return pipe


def write_tiny_flux(directory: str, seed: int = 0, guidance_embeds: bool = True):
  """Saves a random tiny FLUX.1 pipeline (dev-style: guidance embedding, dynamic shift) to
  `directory`; returns the torch pipeline."""
  import diffusers
  import torch
  import transformers

  torch.manual_seed(seed)
  tmp = os.path.join(directory, "_tok")
  tokenizer = _clip_tokenizer(tmp + "1", "<|endoftext|>")
  tokenizer_2 = _t5_tokenizer(tmp + "2")
  vocab = len(tokenizer)
  clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
      eos_token_id=2, bos_token_id=vocab - 2, pad_token_id=1))
  t5 = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=80, d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
      relative_attention_num_buckets=8, relative_attention_max_distance=20,
      feed_forward_proj="gated-gelu", is_encoder_decoder=False))
  transformer = diffusers.FluxTransformer2DModel(
      patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
      num_attention_heads=2, joint_attention_dim=48, pooled_projection_dim=32,
      guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
      up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
      latent_channels=16, norm_num_groups=4, sample_size=RESOLUTION, scaling_factor=0.3611,
      shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
  with torch.no_grad():  # norms and biases off their constant initial values
    for model in (clip, t5, transformer, vae):
      for name, p in model.named_parameters():
        if "norm" in name or name.endswith("bias"):
          p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name and
                                               name.endswith("weight") else 0.0))
  # FLUX.1-dev's scheduler settings (resolution-dependent exponential shift).
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
      shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
      base_image_seq_len=256, max_image_seq_len=4096)
  pipe = diffusers.FluxPipeline(
      transformer=transformer.eval(), scheduler=scheduler, vae=vae.eval(),
      text_encoder=clip.eval(), tokenizer=tokenizer, text_encoder_2=t5.eval(),
      tokenizer_2=tokenizer_2)
  pipe.save_pretrained(directory, safe_serialization=True)
  for i in "12":
    if os.path.isdir(tmp + i):
      os.rmdir(tmp + i)
  return pipe


def write_tiny_clip(directory: str, seed: int = 0):
  """A tiny random transformers CLIPModel directory with tokenizer (a PickScore / CLIP stand-in).

  Returns:
    (torch model, tokenizer).
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  tokenizer = _clip_tokenizer(directory, "<|endoftext|>")
  vocab = len(tokenizer)
  model = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                       eos_token_id=vocab - 1, bos_token_id=vocab - 2, pad_token_id=1),
      vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, image_size=32, patch_size=8),
      projection_dim=24)).eval()
  with torch.no_grad():
    model.logit_scale.fill_(3.0)
  model.save_pretrained(directory, safe_serialization=True)
  tokenizer.save_pretrained(directory)
  return model, tokenizer
