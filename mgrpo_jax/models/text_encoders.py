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

Residual streams, norms and softmax run in float32 whatever the compute dtype (`dtype`, used by
the matmuls); outputs are float32. Besides T5 v1.1 ("gated-gelu") the T5 encoder runs v1.0
("relu") and any "{act}" / "gated-{act}" feed-forward with an activation listed below.
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
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def _activation(name: str, key: str, value: str | None = None):
  """The activation function called `name` in transformers' ACT2FN.

  Raises:
    ValueError: an unsupported name, reported as config `key`=`value` (default: `name`).
  """
  if name not in _ACTIVATIONS:
    shown = name if value is None else value
    raise ValueError(f"text encoder config {key}={shown!r}: activation {name!r} is not "
                     f"supported (supported: {sorted(_ACTIVATIONS)})")
  return _ACTIVATIONS[name]


def _dense(n_in, n_out, axes, dtype, param_dtype, rngs, bias=True):
  """A Linear whose kernel [n_in, n_out] (and bias [n_out]) carry logical axes `axes`."""
  return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
                    rngs=rngs)


def _embedding(n, d, axes, param_dtype, rngs):
  """An Embed whose table [n, d] carries logical axes `axes`."""
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
    """[..., dim] any float dtype -> [..., dim] float32."""
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
  """Fields of transformers' CLIPTextConfig that change the computation.

  Defaults are transformers' own, so a config.json that omits a key means the same thing here.
  """

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
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
  """Multi-head self-attention with biased q/k/v/out projections (scaled by 1/sqrt(d_head))."""

  def __init__(self, cfg: CLIPTextConfig, rngs):
    d = cfg.hidden_size
    self.heads = cfg.num_attention_heads
    mk = lambda axes: _dense(d, d, axes, cfg.dtype, cfg.param_dtype, rngs)
    self.q_proj, self.k_proj, self.v_proj = (mk(("embed", "heads")) for _ in range(3))
    self.out_proj = mk(("heads", "embed"))

  def __call__(self, x, mask):
    """x [B, L, D] compute dtype, mask bool [1 or B, 1, L, L] or None -> [B, L, D]."""
    b, n, d = x.shape
    split = lambda t: sharding_lib.constrain(t.reshape(b, n, self.heads, d // self.heads),
                                             ("batch", None, "heads", None))
    out = jax.nn.dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                       split(self.v_proj(x)), mask=mask)
    if mask is not None:
      # A query with no key left (left padding under the causal mask) gets a zero output, as
      # torch's SDPA (transformers' default attention) gives; XLA would average all values.
      out = jnp.where(jnp.any(mask, axis=-1).transpose(0, 2, 1)[..., None], out, 0)
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
      dict of float32 arrays: 'last_hidden_state' [B, L, D] (after the final norm),
      'hidden_states' (tuple of num_hidden_layers + 1 arrays [B, L, D]: the embeddings, then
      each layer's output without the final norm, as transformers' `hidden_states`),
      'penultimate' (= hidden_states[-2], what SD3 conditions on), 'pooled' [B, D] (last hidden
      state at the EOS token) and 'text_embeds' [B, projection_dim].
    """
    out = clip_text_forward(self.text_model, self.config, input_ids, attention_mask)
    out["text_embeds"] = self.text_projection(out["pooled"].astype(self.config.dtype)).astype(
        jnp.float32)
    return out


class CLIPTextModel(nnx.Module):
  """CLIP text tower without projection (FLUX's `text_encoder`, transformers' CLIPTextModel)."""

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.text_model = _CLIPTransformer(config, rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
    """int [B, L] -> the dict of `clip_text_forward`; 'pooled' is transformers' pooler_output."""
    return clip_text_forward(self.text_model, self.config, input_ids, attention_mask)


def clip_text_forward(tm: _CLIPTransformer, cfg: CLIPTextConfig, input_ids: jax.Array,
                      attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """The CLIP text transformer (shared by SD3's encoders and the CLIP reward models).

  Args:
    tm: the text transformer's modules.
    cfg: its config (sequence limit and EOS rule).
    input_ids: int [B, L], L <= max_position_embeddings.
    attention_mask: optional [B, L] (nonzero = real token), applied on top of the causal mask.

  Returns:
    'last_hidden_state', 'hidden_states', 'penultimate' and 'pooled' (see
    CLIPTextModelWithProjection.__call__).

  Raises:
    ValueError: input_ids longer than max_position_embeddings.
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
  return {"last_hidden_state": last, "hidden_states": tuple(hidden), "penultimate": hidden[-2],
          "pooled": last[jnp.arange(b), eos]}


# ---- T5 ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class T5Config:
  """Fields of transformers' T5Config used by the encoder.

  Defaults are transformers' own (T5 v1.0 small: "relu" feed-forward), so a config.json that
  omits a key means the same thing here; SD3's T5-XXL config sets them all.
  """

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    parts = self.feed_forward_proj.split("-")
    # transformers' rule: "{act}" or "gated-{act}", nothing else.
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(f"T5 config feed_forward_proj={self.feed_forward_proj!r} is not of the "
                       "form '{act}' or 'gated-{act}' (e.g. 'relu', 'gated-gelu')")
    self.activation  # validates the activation name  # pylint: disable=pointless-statement
    if self.relative_attention_num_buckets < 4:
      # Bidirectional buckets split in two, each half again into exact and log-spaced ones.
      raise ValueError(f"T5 config relative_attention_num_buckets="
                       f"{self.relative_attention_num_buckets} is below 4")

  @property
  def gated(self) -> bool:
    """Whether the feed-forward is act(wi_0 x) * wi_1 x (v1.1) rather than act(wi x) (v1.0)."""
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self):
    name = self.feed_forward_proj.split("-")[-1]
    # transformers maps exactly "gated-gelu" to gelu_new (the tanh approximation); a plain
    # "gelu" stays exact.
    return _activation("gelu_new" if self.feed_forward_proj == "gated-gelu" else name,
                       "feed_forward_proj", self.feed_forward_proj)

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any], **overrides) -> T5Config:
    return weights.config_fields(cls, config, **overrides)


def relative_position_buckets(query_len: int, key_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """T5's bidirectional bucket of each (key - query) offset: int32 [query_len, key_len].

  Half the buckets are for keys after the query. Within a half, offsets below a quarter of
  `num_buckets` get a bucket each and larger ones log-spaced buckets up to `max_distance`, beyond
  which they share the last. The logarithm is taken in float32 as torch does, so offsets that
  land on a bucket boundary round the same way.
  """
  rel = np.arange(key_len)[None, :] - np.arange(query_len)[:, None]
  half = num_buckets // 2
  max_exact = half // 2
  side = np.where(rel > 0, half, 0)
  dist = np.abs(rel)
  # Offsets below max_exact (including 0, whose log is -inf) take the exact branch below.
  ratio = np.maximum(dist, max_exact).astype(np.float32) / np.float32(max_exact)
  log_bucket = (np.log(ratio) / np.float32(math.log(max_distance / max_exact)) *
                np.float32(half - max_exact)).astype(np.int64)
  large = np.minimum(max_exact + log_bucket, half - 1)
  return (side + np.where(dist < max_exact, dist, large)).astype(np.int32)


class _T5Attention(nnx.Module):
  """Self-attention without 1/sqrt(d) scaling; the first block's also owns the position bias."""

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
    """x [B, L, d_model] compute dtype, bias [1 or B, heads, L, L] float32 -> [B, L, d_model]."""
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
  """T5 encoder stack (v1.1 for SD3's `text_encoder_3`; v1.0 "relu" works too)."""

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
    """Encodes token ids.

    Args:
      input_ids: int [B, L]; any L (relative positions need no table).
      attention_mask: optional [B, L] (nonzero = real token); SD3 passes none, so its padding
        tokens are attended to.

    Returns:
      last hidden state [B, L, d_model] float32, after the final RMS norm.
    """
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
                      t5_length: int = 256, clip_skip: int | None = None
                      ) -> tuple[jax.Array, jax.Array]:
  """SD3's conditioning from the three tokenizations (see module docstring).

  Args:
    clip_l, clip_g: the two CLIP text models.
    t5: the T5 encoder, or None (then zeros [B, t5_length, t5_width] take its place, as diffusers
      does without `text_encoder_3`; t5_width is the transformer's joint_attention_dim).
    ids_l, ids_g: int [B, 77] (no attention mask: SD3 runs CLIP on the padded ids).
    ids_t5: int [B, L_t5]; required with t5, ignored without.
    t5_width, t5_length: shape of the stand-in for the T5 states when t5 is None.
    clip_skip: as diffusers' `clip_skip`: use CLIP hidden_states[-(clip_skip + 2)]; None (the
      default) is the penultimate layer's output.

  Returns:
    (prompt_embeds [B, 77 + L_t5, W] float32, pooled [B, P_l + P_g] float32), W = T5's width.
    Like diffusers' `F.pad`, CLIP features wider than W are cut to W rather than refused.

  Raises:
    ValueError: t5 given without ids_t5, mismatched batch sizes, or a clip_skip past the
      first layer.
  """
  if ids_l.shape[0] != ids_g.shape[0]:
    raise ValueError(f"ids_l has batch {ids_l.shape[0]} but ids_g has {ids_g.shape[0]}")
  out_l, out_g = clip_l(ids_l), clip_g(ids_g)
  if clip_skip is None:
    feats_l, feats_g = out_l["penultimate"], out_g["penultimate"]
  else:
    depth = min(len(out_l["hidden_states"]), len(out_g["hidden_states"]))
    if not 0 <= clip_skip <= depth - 2:
      raise ValueError(f"clip_skip={clip_skip} is outside [0, {depth - 2}] for these CLIP models")
    feats_l = out_l["hidden_states"][-(clip_skip + 2)]
    feats_g = out_g["hidden_states"][-(clip_skip + 2)]
  clip = jnp.concatenate([feats_l, feats_g], axis=-1)
  if t5 is None:
    t5_states = jnp.zeros((ids_l.shape[0], t5_length, t5_width), jnp.float32)
  else:
    if ids_t5 is None:
      raise ValueError("encode_sd3_prompt got a T5 encoder but ids_t5=None")
    if ids_t5.shape[0] != ids_l.shape[0]:
      raise ValueError(f"ids_t5 has batch {ids_t5.shape[0]} but ids_l has {ids_l.shape[0]}")
    t5_states = t5(ids_t5)
  width = t5_states.shape[-1]
  clip = jnp.pad(clip[..., :width], ((0, 0), (0, 0), (0, max(width - clip.shape[-1], 0))))
  pooled = jnp.concatenate([out_l["text_embeds"], out_g["text_embeds"]], axis=-1)
  return jnp.concatenate([clip, t5_states], axis=1), pooled


# ---- loading -------------------------------------------------------------------------------------
def _load_state(directory: str, abstract_state, mesh, rules, component: str,
                ignore=lambda name: False, aliases: Mapping[str, str] | None = None) -> nnx.State:
  """Fills `abstract_state` from a transformers directory's safetensors.

  Args:
    directory: holds *.safetensors (or shards + index).
    abstract_state: the module's state (arrays or ShapeDtypeStructs).
    mesh, rules: placement by logical axes (see `weights.load_state`).
    component: name for error messages.
    ignore: checkpoint tensor name -> whether it is unused on purpose.
    aliases: our expected tensor name -> the name to read instead when the first is absent
      and the alias present (errors name the expected tensor).
  """
  checkpoint = weights.Checkpoint(directory)

  def name_fn(path):
    name, transform = weights.torch_name(path, weights.linear_kernel)
    if aliases and name not in checkpoint and aliases.get(name) in checkpoint:
      name = aliases[name]
    return name, transform

  used = {name_fn(".".join(str(k) for k in path))[0]
          for path, _ in nnx.to_flat_state(abstract_state)}
  # Tensors the model reads are never ignored: a tied table must still be found somewhere.
  ignored = [n for n in checkpoint.keys() if n not in used and ignore(n)]
  return weights.load_state(checkpoint, abstract_state, name_fn, component=component, mesh=mesh,
                            rules=rules, ignore_unexpected=ignored)


def load_clip_text_state(directory: str, abstract_state, mesh=None, rules=None) -> nnx.State:
  """Fills the state of a `CLIPTextModelWithProjection` or `CLIPTextModel` from a directory.

  The non-persistent `position_ids` buffer, which some checkpoints carry, is skipped. A
  CLIPTextModel saved by transformers 5 names its tensors without the `text_model.` prefix that
  transformers 4 (and the published FLUX.1 / SD checkpoints) use; both are read.

  Args:
    directory: a CLIPTextModelWithProjection / CLIPTextModel directory (config.json +
      safetensors).
    abstract_state: the module's state, e.g. from `nnx.split(nnx.eval_shape(...))`.
    mesh, rules: if given, place by logical axis names (else by the leaves' `.sharding`).

  Raises:
    ValueError: an unsupported config value (e.g. hidden_act), named.
    CheckpointError: missing / unexpected / mis-shaped tensors, named.
  """
  CLIPTextConfig.from_hf_config(weights.read_config(directory))  # names unsupported values
  prefix = "text_model."
  aliases = {}
  for path, _ in nnx.to_flat_state(abstract_state):
    name = weights.torch_name(".".join(str(k) for k in path), weights.linear_kernel)[0]
    if name.startswith(prefix):
      aliases[name] = name[len(prefix):]
  return _load_state(directory, abstract_state, mesh, rules, "CLIP text encoder",
                     ignore=lambda name: name.endswith("position_ids"), aliases=aliases)


def load_t5_state(directory: str, abstract_state, mesh=None, rules=None) -> nnx.State:
  """Fills the state of a `T5EncoderModel` from a transformers directory.

  The token table is tied: checkpoints store `shared.weight`, `encoder.embed_tokens.weight` or
  both; the first present is read and the other skipped. The decoder half of a full
  encoder-decoder checkpoint (`decoder.*`, `lm_head.weight`) is skipped too, as transformers'
  T5EncoderModel does.

  Args and Raises: as `load_clip_text_state`.
  """
  T5Config.from_hf_config(weights.read_config(directory))  # names unsupported values
  return _load_state(directory, abstract_state, mesh, rules, "T5 encoder",
                     ignore=lambda name: name in ("encoder.embed_tokens.weight", "lm_head.weight")
                     or name.startswith("decoder."),
                     aliases={"shared.weight": "encoder.embed_tokens.weight"})


def _from_pretrained(config, module_cls, load_fn, directory, mesh, rules):
  # Built abstractly: no random initialisation of weights that the checkpoint replaces.
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: module_cls(config, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, load_fn(directory, abstract, mesh=mesh, rules=rules))


def load_clip_text(directory: str, mesh=None, rules=None, **overrides
                   ) -> CLIPTextModelWithProjection:
  """A transformers CLIPTextModelWithProjection directory -> our module with its weights.

  Args:
    directory: config.json + *.safetensors (single file or sharded with an index).
    mesh, rules: if given, shard the weights by logical axes over `mesh` (rules default to
      `mgrpo_jax.sharding.LOGICAL_RULES`).
    **overrides: config fields to replace, typically `dtype` (compute) and `param_dtype`
      (storage), e.g. `dtype=jnp.bfloat16`.

  Raises:
    ValueError / CheckpointError: as `load_clip_text_state`.
  """
  config = CLIPTextConfig.from_hf_config(weights.read_config(directory), **overrides)
  return _from_pretrained(config, CLIPTextModelWithProjection, load_clip_text_state, directory,
                          mesh, rules)


def load_t5_encoder(directory: str, mesh=None, rules=None, **overrides) -> T5EncoderModel:
  """A transformers T5EncoderModel directory -> our module with its weights.

  Args and Raises: as `load_clip_text` (and `load_t5_state` for the tensors it skips).
  """
  config = T5Config.from_hf_config(weights.read_config(directory), **overrides)
  return _from_pretrained(config, T5EncoderModel, load_t5_state, directory, mesh, rules)
