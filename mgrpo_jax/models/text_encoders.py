"""SD3's text encoders in Flax NNX: CLIP text models with projection (L and G) and T5 v1.1.

Both load Hugging Face `transformers` directories (config.json + safetensors) without torch, and
`encode_sd3_prompt` assembles the conditioning the way diffusers' StableDiffusion3Pipeline does:

  clip = concat_channels(CLIP-L penultimate, CLIP-G penultimate)     [B, 77, 768 + 1280]
  clip = zero-pad channels to the T5 width                           [B, 77, 4096]
  prompt_embeds = concat_sequence(clip, T5 last hidden state)        [B, 77 + L, 4096]
  pooled = concat(CLIP-L text_embeds, CLIP-G text_embeds)            [B, 2048]

"Penultimate" is the output of the second-to-last encoder layer, before the final layer norm
(transformers' `hidden_states[-2]`). State paths follow the checkpoints' names, e.g.
`text_model.encoder.layers.0.self_attn.q_proj.kernel`, `encoder.block.0.layer.0.SelfAttention.q
.kernel`, with `weight` -> `kernel` (Linear), `embedding` (Embedding) or `scale` (norms).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax.models import weights

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def _activation(name: str, key: str):
  if name not in _ACTIVATIONS:
    raise ValueError(f"text encoder config {key}={name!r} is not supported "
                     f"(supported: {sorted(_ACTIVATIONS)})")
  return _ACTIVATIONS[name]


def _dense(n_in, n_out, axes, dtype, param_dtype, rngs, bias=True):
  return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
                    rngs=rngs)


def _embedding(n, d, axes, param_dtype, rngs):
  return nnx.Embed(n, d, param_dtype=param_dtype,
                   embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), axes),
                   rngs=rngs)


class _LayerNorm(nnx.Module):
  """LayerNorm (with mean) or RMS norm (T5, no mean, no bias); statistics in float32."""

  def __init__(self, dim: int, eps: float, param_dtype, rms: bool = False):
    self.eps, self.rms = eps, rms
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.bias = None if rms else nnx.Param(jnp.zeros((dim,), param_dtype))

  def __call__(self, x):
    x = x.astype(jnp.float32)
    if self.rms:
      return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps) * \
          self.scale[...].astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32) + \
        self.bias[...].astype(jnp.float32)


# ---- CLIP ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Fields of transformers' CLIPTextConfig that change the computation."""

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _activation(self.hidden_act, "hidden_act")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIP config: hidden_size={self.hidden_size} is not divisible by "
                       f"num_attention_heads={self.num_attention_heads}")

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any], **overrides) -> CLIPTextConfig:
    """From a transformers config.json (a CLIPTextConfig, or a CLIPConfig's text_config)."""
    if "text_config" in config and "hidden_size" not in config:
      config = config["text_config"]
    return weights.config_fields(cls, config, **overrides)


class _CLIPAttention(nnx.Module):

  def __init__(self, cfg: CLIPTextConfig, rngs):
    d = cfg.hidden_size
    self.heads = cfg.num_attention_heads
    mk = lambda axes: _dense(d, d, axes, cfg.dtype, cfg.param_dtype, rngs)
    self.q_proj, self.k_proj, self.v_proj = (mk(("embed", "heads")) for _ in range(3))
    self.out_proj = mk(("heads", "embed"))

  def __call__(self, x, mask):
    b, n, d = x.shape
    split = lambda t: sharding_lib.constrain(t.reshape(b, n, self.heads, d // self.heads),
                                             ("batch", None, "heads", None))
    out = jax.nn.dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                       split(self.v_proj(x)), mask=mask)
    return self.out_proj(out.reshape(b, n, d))


class _CLIPMLP(nnx.Module):

  def __init__(self, cfg: CLIPTextConfig, rngs):
    self.act = _activation(cfg.hidden_act, "hidden_act")
    self.fc1 = _dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), cfg.dtype,
                      cfg.param_dtype, rngs)
    self.fc2 = _dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), cfg.dtype,
                      cfg.param_dtype, rngs)

  def __call__(self, x):
    return self.fc2(self.act(self.fc1(x)))


class _CLIPLayer(nnx.Module):

  def __init__(self, cfg: CLIPTextConfig, rngs):
    self.dtype = cfg.dtype
    self.layer_norm1 = _LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, cfg.param_dtype)
    self.self_attn = _CLIPAttention(cfg, rngs)
    self.layer_norm2 = _LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, cfg.param_dtype)
    self.mlp = _CLIPMLP(cfg, rngs)

  def __call__(self, x, mask):
    x = x + self.self_attn(self.layer_norm1(x).astype(self.dtype), mask).astype(jnp.float32)
    return x + self.mlp(self.layer_norm2(x).astype(self.dtype)).astype(jnp.float32)


class _CLIPEmbeddings(nnx.Module):

  def __init__(self, cfg, rngs):
    self.token_embedding = _embedding(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"),
                                      cfg.param_dtype, rngs)
    self.position_embedding = _embedding(cfg.max_position_embeddings, cfg.hidden_size,
                                         (None, "embed"), cfg.param_dtype, rngs)


class _CLIPTransformer(nnx.Module):

  def __init__(self, cfg, rngs):
    self.embeddings = _CLIPEmbeddings(cfg, rngs)
    self.encoder = nnx.Module()
    self.encoder.layers = nnx.List([_CLIPLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
    self.final_layer_norm = _LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, cfg.param_dtype)


class CLIPTextModelWithProjection(nnx.Module):
  """CLIP text tower + projection (SD3's `text_encoder` / `text_encoder_2`)."""

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.text_model = _CLIPTransformer(config, rngs)
    self.text_projection = _dense(config.hidden_size, config.projection_dim, ("embed", None),
                                  config.dtype, config.param_dtype, rngs, bias=False)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
    """Encodes token ids.

    Args:
      input_ids: int [B, L], L <= max_position_embeddings.
      attention_mask: optional [B, L] (1 = attend); SD3's pipeline passes none.

    Returns:
      dict with 'last_hidden_state' [B, L, D] (after the final norm), 'penultimate' [B, L, D]
      (output of the second-to-last layer, no final norm), 'pooled' [B, D] (last hidden state at
      the EOS token) and 'text_embeds' [B, projection_dim], all float32.
    """
    out = clip_text_forward(self.text_model, self.config, input_ids, attention_mask)
    out["text_embeds"] = self.text_projection(out["pooled"].astype(self.config.dtype)).astype(
        jnp.float32)
    return out


def clip_text_forward(tm: _CLIPTransformer, cfg: CLIPTextConfig, input_ids: jax.Array,
                      attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """The CLIP text transformer (shared by SD3's encoders and the CLIP reward models).

  Returns 'last_hidden_state', 'penultimate' and 'pooled' (see CLIPTextModelWithProjection).
  """
  b, n = input_ids.shape
  if n > cfg.max_position_embeddings:
    raise ValueError(f"input_ids length {n} exceeds max_position_embeddings="
                     f"{cfg.max_position_embeddings}")
  x = (tm.embeddings.token_embedding(input_ids).astype(jnp.float32) +
       tm.embeddings.position_embedding.embedding[...][:n].astype(jnp.float32)[None])
  mask = jnp.tril(jnp.ones((n, n), bool))[None, None]  # causal: [1, 1, q, k]
  if attention_mask is not None:
    mask = mask & (attention_mask.astype(bool)[:, None, None, :])
  hidden = [x]
  for layer in tm.encoder.layers:
    x = layer(x.astype(jnp.float32), mask)
    hidden.append(x)
  last = tm.final_layer_norm(x)
  # transformers' rule: the legacy eos id 2 means "the highest id", otherwise the first EOS.
  if cfg.eos_token_id == 2:
    eos = jnp.argmax(input_ids, axis=-1)
  else:
    eos = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
  return {"last_hidden_state": last, "penultimate": hidden[-2].astype(jnp.float32),
          "pooled": last[jnp.arange(b), eos]}


# ---- T5 ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class T5Config:
  """Fields of transformers' T5Config used by the encoder."""

  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    self.activation  # validates feed_forward_proj  # pylint: disable=pointless-statement

  @property
  def gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self):
    name = self.feed_forward_proj.split("-")[-1]
    # transformers maps "gated-gelu" to gelu_new (tanh approximation).
    return _activation("gelu_new" if name == "gelu" and self.gated else name,
                       "feed_forward_proj")

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any], **overrides) -> T5Config:
    return weights.config_fields(cls, config, **overrides)


def relative_position_buckets(query_len: int, key_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """T5's bidirectional bucket of (key - query) offsets: int32 [query_len, key_len]."""
  rel = np.arange(key_len)[None, :] - np.arange(query_len)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  rel = np.abs(rel)
  max_exact = half // 2
  with np.errstate(divide="ignore"):
    large = max_exact + (np.log(np.maximum(rel, 1) / max_exact) / math.log(max_distance / max_exact)
                         * (half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


class _T5Attention(nnx.Module):

  def __init__(self, cfg: T5Config, has_bias: bool, rngs):
    inner = cfg.num_heads * cfg.d_kv
    self.cfg = cfg
    mk = lambda i, o, axes: _dense(i, o, axes, cfg.dtype, cfg.param_dtype, rngs, bias=False)
    self.q = mk(cfg.d_model, inner, ("embed", "heads"))
    self.k = mk(cfg.d_model, inner, ("embed", "heads"))
    self.v = mk(cfg.d_model, inner, ("embed", "heads"))
    self.o = mk(inner, cfg.d_model, ("heads", "embed"))
    self.relative_attention_bias = _embedding(
        cfg.relative_attention_num_buckets, cfg.num_heads, (None, "heads"), cfg.param_dtype,
        rngs) if has_bias else None

  def position_bias(self, n: int) -> jax.Array:
    """[1, heads, n, n] float32 additive bias."""
    buckets = relative_position_buckets(n, n, self.cfg.relative_attention_num_buckets,
                                        self.cfg.relative_attention_max_distance)
    values = self.relative_attention_bias.embedding[...][buckets].astype(jnp.float32)
    return jnp.transpose(values, (2, 0, 1))[None]

  def __call__(self, x, bias):
    b, n, _ = x.shape
    split = lambda t: sharding_lib.constrain(t.reshape(b, n, self.cfg.num_heads, self.cfg.d_kv),
                                             ("batch", None, "heads", None))
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    # T5 does not scale scores by 1/sqrt(d_kv) (it is folded into the initialisation).
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, -1)
    return self.o(out)


class _T5FF(nnx.Module):

  def __init__(self, cfg: T5Config, rngs):
    self.act = cfg.activation
    mk = lambda i, o, axes: _dense(i, o, axes, cfg.dtype, cfg.param_dtype, rngs, bias=False)
    if cfg.gated:
      self.wi_0 = mk(cfg.d_model, cfg.d_ff, ("embed", "mlp"))
      self.wi_1 = mk(cfg.d_model, cfg.d_ff, ("embed", "mlp"))
    else:
      self.wi = mk(cfg.d_model, cfg.d_ff, ("embed", "mlp"))
    self.wo = mk(cfg.d_ff, cfg.d_model, ("mlp", "embed"))
    self.gated = cfg.gated

  def __call__(self, x):
    h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
    return self.wo(h)


class _T5Sublayer(nnx.Module):
  """Pre-norm residual sublayer: x + f(RMSNorm(x))."""

  def __init__(self, cfg, inner, name, rngs):
    del rngs
    setattr(self, name, inner)
    self.name = name
    self.layer_norm = _LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, cfg.param_dtype, rms=True)
    self.dtype = cfg.dtype


class _T5Block(nnx.Module):

  def __init__(self, cfg: T5Config, first: bool, rngs):
    self.layer = nnx.List([
        _T5Sublayer(cfg, _T5Attention(cfg, first, rngs), "SelfAttention", rngs),
        _T5Sublayer(cfg, _T5FF(cfg, rngs), "DenseReluDense", rngs)])
    self.dtype = cfg.dtype

  def __call__(self, x, bias):
    attn, ff = self.layer
    x = x + attn.SelfAttention(attn.layer_norm(x).astype(self.dtype), bias).astype(jnp.float32)
    return x + ff.DenseReluDense(ff.layer_norm(x).astype(self.dtype)).astype(jnp.float32)


class T5EncoderModel(nnx.Module):
  """T5 (v1.1) encoder stack: SD3's `text_encoder_3`."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
    self.config = config
    self.shared = _embedding(config.vocab_size, config.d_model, ("vocab", "embed"),
                             config.param_dtype, rngs)
    self.encoder = nnx.Module()
    self.encoder.block = nnx.List([_T5Block(config, i == 0, rngs)
                                   for i in range(config.num_layers)])
    self.encoder.final_layer_norm = _LayerNorm(config.d_model, config.layer_norm_epsilon,
                                               config.param_dtype, rms=True)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """int [B, L] -> last hidden state [B, L, d_model] float32 (SD3 passes no mask)."""
    n = input_ids.shape[1]
    x = self.shared(input_ids).astype(jnp.float32)
    # Computed once by the first block and shared by all (as in T5).
    bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(n)
    if attention_mask is not None:
      bias = bias + jnp.where(attention_mask.astype(bool)[:, None, None, :], 0.0,
                              jnp.finfo(jnp.float32).min)
    for block in self.encoder.block:
      x = block(x, bias)
    return self.encoder.final_layer_norm(x)


# ---- SD3 prompt assembly ---------------------------------------------------------------------
def encode_sd3_prompt(clip_l: CLIPTextModelWithProjection, clip_g: CLIPTextModelWithProjection,
                      t5: T5EncoderModel | None, ids_l: jax.Array, ids_g: jax.Array,
                      ids_t5: jax.Array | None = None, *, t5_width: int = 4096,
                      t5_length: int = 256) -> tuple[jax.Array, jax.Array]:
  """SD3's conditioning from the three tokenizations (see module docstring).

  Args:
    clip_l, clip_g: the two CLIP text models.
    t5: the T5 encoder, or None (then zeros [B, t5_length, t5_width] take its place, as diffusers
      does without `text_encoder_3`).
    ids_l, ids_g: int [B, 77]; ids_t5: int [B, L_t5] (ignored without t5).

  Returns:
    (prompt_embeds [B, 77 + L_t5, W] float32, pooled [B, P_l + P_g] float32).
  """
  out_l, out_g = clip_l(ids_l), clip_g(ids_g)
  clip = jnp.concatenate([out_l["penultimate"], out_g["penultimate"]], axis=-1)
  if t5 is None:
    t5_states = jnp.zeros((ids_l.shape[0], t5_length, t5_width), jnp.float32)
  else:
    t5_states = t5(ids_t5)
  width = t5_states.shape[-1]
  if clip.shape[-1] > width:
    raise ValueError(f"CLIP features ({clip.shape[-1]}) are wider than T5's ({width})")
  clip = jnp.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
  pooled = jnp.concatenate([out_l["text_embeds"], out_g["text_embeds"]], axis=-1)
  return jnp.concatenate([clip, t5_states], axis=1), pooled


# ---- loading -------------------------------------------------------------------------------------
def _hf_name(path: str):
  """Dotted state path -> (transformers tensor name, transform to our layout)."""
  return weights.torch_name(path, weights.linear_kernel)


def _load_state(config_cls, module_cls, directory, abstract_state, mesh, rules, component,
                ignore_suffixes=(), aliases=None, overrides=None):
  """Fills `abstract_state` (of `module_cls`) from a transformers directory's safetensors."""
  config_cls.from_hf_config(weights.read_config(directory), **(overrides or {}))  # validates
  checkpoint = weights.Checkpoint(directory)

  def name_fn(path):
    name, transform = _hf_name(path)
    if aliases and name not in checkpoint:
      name = aliases.get(name, name)
    return name, transform

  ignored = tuple(n for n in checkpoint.keys() if n.endswith(tuple(ignore_suffixes)))
  del module_cls
  return weights.load_state(checkpoint, abstract_state, name_fn, component=component, mesh=mesh,
                            rules=rules, ignore_unexpected=ignored)


def load_clip_text_state(directory: str, abstract_state, mesh=None, rules=None) -> nnx.State:
  """Fills the state of a `CLIPTextModelWithProjection` from a transformers directory.

  Raises:
    ValueError: an unsupported config value (e.g. hidden_act), named.
    CheckpointError: missing / unexpected / mis-shaped tensors, named.
  """
  return _load_state(CLIPTextConfig, CLIPTextModelWithProjection, directory, abstract_state,
                     mesh, rules, "CLIP text encoder", ignore_suffixes=("position_ids",))


def load_t5_state(directory: str, abstract_state, mesh=None, rules=None) -> nnx.State:
  """Fills the state of a `T5EncoderModel` from a transformers directory.

  The token table is stored as `shared.weight` and/or `encoder.embed_tokens.weight` (tied);
  whichever is present is used and the other is ignored.
  """
  return _load_state(T5Config, T5EncoderModel, directory, abstract_state, mesh, rules,
                     "T5 encoder", ignore_suffixes=("encoder.embed_tokens.weight",),
                     aliases={"shared.weight": "encoder.embed_tokens.weight"})


def _from_pretrained(config, module_cls, load_fn, directory, mesh, rules):
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: module_cls(config, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, load_fn(directory, abstract, mesh=mesh, rules=rules))


def load_clip_text(directory: str, mesh=None, rules=None, **overrides
                   ) -> CLIPTextModelWithProjection:
  """A transformers CLIPTextModelWithProjection directory -> our module with its weights."""
  config = CLIPTextConfig.from_hf_config(weights.read_config(directory), **overrides)
  return _from_pretrained(config, CLIPTextModelWithProjection, load_clip_text_state, directory,
                          mesh, rules)


def load_t5_encoder(directory: str, mesh=None, rules=None, **overrides) -> T5EncoderModel:
  """A transformers T5EncoderModel directory -> our module with its weights."""
  config = T5Config.from_hf_config(weights.read_config(directory), **overrides)
  return _from_pretrained(config, T5EncoderModel, load_t5_state, directory, mesh, rules)
