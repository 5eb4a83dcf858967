"""models/attention.py: every implementation that runs here against a numpy softmax attention,
the dispatcher's choice per backend / dtype / shape / mask, and its fallbacks and errors."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mgrpo_jax import sharding as sharding_lib
from mgrpo_jax.models import attention
from mgrpo_jax.models import flux_transformer, sd3_transformer, tiny_mmdit

Platform = attention.Platform
H100 = Platform("gpu", cuda=True, capability=(9, 0))
A100 = Platform("gpu", cuda=True, capability=(8, 0))
T4 = Platform("gpu", cuda=True, capability=(7, 5))
ROCM = Platform("gpu", cuda=False)
TPU = Platform("tpu")
CPU = Platform("cpu")


def numpy_attention(q, k, v, mask=None):
  """float64 reference: softmax(q k^T / sqrt(d) masked) v, [B, T, N, H] layout."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(np.broadcast_to(mask, logits.shape), logits, -np.inf)
  logits -= logits.max(-1, keepdims=True)
  w = np.exp(logits)
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", w, v)


def _qkv(b=2, t=7, s=11, n=3, h=16, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  mk = lambda length: jnp.asarray(rng.standard_normal((b, length, n, h)), dtype)
  return mk(t), mk(s), mk(s)


# ---- numerics ---------------------------------------------------------------------------------
def test_jax_xla_attention_matches_numpy():
  """jax.nn.dot_product_attention(implementation='xla') is an independent check of the math."""
  q, k, v = _qkv()
  ref = numpy_attention(q, k, v)
  out = jax.nn.dot_product_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_dispatcher_matches_numpy_unmasked(impl):
  q, k, v = _qkv(t=9, s=9)
  out = attention.dot_product_attention(q, k, v, implementation=impl)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_dispatcher_matches_numpy_masked(impl):
  q, k, v = _qkv(b=2, t=6, s=6)
  causal = np.tril(np.ones((6, 6), bool))[None, None]                     # [1, 1, T, S]
  padding = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], bool)[:, None, None, :]
  for mask in (causal, causal & padding):
    out = attention.dot_product_attention(q, k, v, mask=jnp.asarray(mask), implementation=impl)
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, mask), rtol=1e-5,
                               atol=1e-5)


def test_xla_path_is_the_previous_call_bit_for_bit():
  """'xla' (and 'auto' on CPU) is exactly the call the models made before, in f32 and bf16."""
  for dtype in (np.float32, jnp.bfloat16):
    q, k, v = _qkv(t=13, s=13, h=32, dtype=dtype)
    before = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v))(q, k, v)
    for impl in ("xla", "auto"):
      now = jax.jit(lambda q, k, v, i=impl: attention.dot_product_attention(
          q, k, v, implementation=i))(q, k, v)
      np.testing.assert_array_equal(np.asarray(now, np.float32), np.asarray(before, np.float32))


def test_splash_kernel_in_interpret_mode_matches_numpy():
  """The TPU splash path (padding to 128-token blocks as its own segment, head dim padded to
  128 lanes, pre-scaled q) run through Pallas' interpreter on CPU."""
  pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
  q, k, v = _qkv(b=1, t=150, s=150, n=2, h=64)
  out = jax.jit(lambda q, k, v: attention.splash_attention(q, k, v, interpret=True))(q, k, v)
  assert out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_splash_gradients_and_sharded_splash_match_xla():
  """Backward through the interpreted splash kernel, and the shard_map path on a 4 x 2
  (data, tensor) mesh of simulated CPU devices, against the XLA implementation."""
  pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
  q, k, v = _qkv(b=4, t=130, s=130, n=2, h=32)
  loss = lambda fn: (lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))))
  splash = lambda q, k, v: attention.splash_attention(q, k, v, interpret=True)
  xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v)
  g_splash = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
  g_xla = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_splash, g_xla):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)

  mesh = sharding_lib.make_mesh({"data": 4, "fsdp": 1, "tensor": 2}, jax.devices()[:8])
  with jax.set_mesh(mesh):
    sharded = jax.jit(splash)(q, k, v)
  np.testing.assert_allclose(np.asarray(sharded), numpy_attention(q, k, v), rtol=1e-5, atol=1e-5)


# ---- the dispatcher's choice ------------------------------------------------------------------
BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


@pytest.mark.parametrize("platform,dtype,head_dim,kv,mask,expected", [
    (H100, BF16, 64, 1357, False, "cudnn_padded_bwd"),  # SD3.5-M: 24 x 64, 1024 + 333 tokens
    (H100, BF16, 64, 1358, False, "cudnn"),        # even length: cuDNN's backward too
    (H100, F16, 128, 1536, False, "cudnn"),        # FLUX: 24 heads x 128
    (H100, BF16, 256, 1024, False, "cudnn"),       # Hopper allows head_dim up to 256
    (A100, BF16, 64, 1357, False, "cudnn_padded_bwd"),
    (A100, BF16, 64, 1024, False, "cudnn"),
    (A100, BF16, 256, 1024, False, "xla"),         # pre-Hopper limit 128
    (H100, F32, 64, 1357, False, "xla"),           # cuDNN flash is half precision only
    (H100, BF16, 12, 1357, False, "xla"),          # head_dim not a multiple of 8
    (H100, BF16, 64, 77, True, "xla"),             # masked text-encoder attention
    (T4, F16, 64, 1357, False, "xla"),             # no flash attention before Ampere
    (ROCM, BF16, 64, 1357, False, "xla"),
    (TPU, BF16, 64, 1357, False, "splash"),
    (TPU, F32, 128, 4096, False, "splash"),
    (TPU, BF16, 64, 77, False, "xla"),             # too short to pay for block padding
    (TPU, BF16, 64, 1357, True, "xla"),
    (CPU, BF16, 64, 1357, False, "xla"),
])
def test_auto_choice(platform, dtype, head_dim, kv, mask, expected):
  if expected == "splash":
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
  impl, reason = attention.select_implementation("auto", dtype, head_dim, kv, mask, platform)
  assert impl == expected
  assert (reason is None) == (expected in ("cudnn", "splash"))


def test_auto_fallback_reasons_name_the_cause():
  why = lambda *a: attention.select_implementation("auto", *a)[1]
  assert "bfloat16/float16" in why(F32, 64, 1357, False, H100)
  assert "float32" in why(F32, 64, 1357, False, H100)
  assert "multiple of 8" in why(BF16, 12, 1357, False, H100)
  assert "<= 128" in why(BF16, 256, 1024, False, A100)
  assert "compute capability" in why(F16, 64, 1357, False, T4)
  assert "mask" in why(BF16, 64, 77, True, H100)
  assert "NVIDIA" in why(BF16, 64, 1357, False, ROCM)
  assert "cpu" in why(BF16, 64, 1357, False, CPU)
  assert "Q 1357, KV 1357" in why(BF16, 64, 1357, False, H100)
  assert "Q 1025, KV 1024" in attention.select_implementation(
      "auto", BF16, 64, 1024, False, H100, q_length=1025)[1]


def test_explicit_choices_that_cannot_run_are_errors():
  with pytest.raises(ValueError, match="attention='cudnn' cannot run: cuDNN needs an NVIDIA GPU"):
    attention.select_implementation("cudnn", BF16, 64, 1357, False, CPU)
  with pytest.raises(ValueError, match="cudnn.*float32"):
    attention.select_implementation("cudnn", F32, 64, 1357, False, H100)
  with pytest.raises(ValueError, match="attention='splash' cannot run: .*needs a TPU"):
    attention.select_implementation("splash", BF16, 64, 1357, False, H100)
  with pytest.raises(ValueError, match="'flash' is unknown"):
    attention.select_implementation("flash", BF16, 64, 1357, False, CPU)
  # Explicit choices that can run are kept as asked, short sequences included.
  assert attention.select_implementation("cudnn", BF16, 64, 77, False, H100) == ("cudnn", None)
  assert attention.select_implementation("xla", BF16, 64, 1357, False, H100) == ("xla", None)
  if attention.splash_unsupported(TPU, 77, False, for_auto=False) is None:
    assert attention.select_implementation("splash", BF16, 64, 77, False, TPU) == ("splash", None)


def test_explicit_cudnn_on_this_cpu_fails_at_trace_time():
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU behaviour")
  q, k, v = _qkv(dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="NVIDIA GPU"):
    attention.dot_product_attention(q, k, v, implementation="cudnn")


def test_fallback_is_logged_once(monkeypatch, caplog):
  monkeypatch.setattr(attention, "_logged", set())
  q, k, v = _qkv()
  with caplog.at_level(logging.INFO, logger=attention.__name__):
    for _ in range(3):
      attention.dot_product_attention(q, k, v, implementation="auto")
    attention.dot_product_attention(q, k, v, implementation="xla")  # asked for: nothing to log
  records = [r for r in caplog.records if r.name == attention.__name__]
  assert len(records) == 1
  assert "attention='auto' uses 'xla'" in records[0].getMessage()


# ---- wiring into the models --------------------------------------------------------------------
def test_configs_validate_and_default_to_auto():
  assert sd3_transformer.SD3TransformerConfig().attention == "auto"
  assert flux_transformer.FluxTransformerConfig().attention == "auto"
  # The tiny generator builds its transformer config without naming it: the default reaches it.
  assert tiny_mmdit.TinyConfig().transformer_config().attention == "auto"
  with pytest.raises(ValueError, match="'flash' is unknown"):
    sd3_transformer.SD3TransformerConfig(attention="flash")
  with pytest.raises(ValueError, match="'flash' is unknown"):
    flux_transformer.FluxTransformerConfig(attention="flash")


def test_config_reaches_every_attention_module():
  """The config's choice is what each attention layer calls with (abstract build, no compile);
  that 'auto' and 'xla' compute the same thing on CPU is checked bit for bit above."""
  sd3 = sd3_transformer.SD3TransformerConfig(
      sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
      num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
      pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8, dual_attention_layers=(0,),
      qk_norm="rms_norm", attention="xla")
  model = nnx.eval_shape(lambda: sd3_transformer.SD3Transformer(sd3, rngs=nnx.Rngs(0)))
  layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, sd3_transformer.Attention)]
  assert len(layers) == 3 and all(m.attention == "xla" for m in layers)  # 2 joint + 1 dual

  flux = flux_transformer.FluxTransformerConfig(
      in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
      num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
      axes_dims_rope=(2, 2, 4), attention="cudnn")
  model = nnx.eval_shape(lambda: flux_transformer.FluxTransformer(flux, rngs=nnx.Rngs(0)))
  layers = [m for _, m in nnx.iter_modules(model)
            if isinstance(m, flux_transformer.FluxAttention)]
  assert len(layers) == 2 and all(m.attention == "cudnn" for m in layers)


# ---- cuDNN forward, XLA backward (CPU stand-in for the kernel) ---------------------------------
def numpy_attention_vjp(q, k, v, g):
  """float64 reference gradients of sum(g * attention(q, k, v)) w.r.t. q, k, v (no mask)."""
  q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, g))
  scale = 1.0 / np.sqrt(q.shape[-1])
  logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  dv = np.einsum("bnts,btnh->bsnh", p, g)
  dp = np.einsum("btnh,bsnh->bnts", g, v)
  dlogits = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
  dq = np.einsum("bnts,bsnh->btnh", dlogits, k)
  dk = np.einsum("bnts,btnh->bsnh", dlogits, q)
  return dq, dk, dv


def _fake_cudnn(calls):
  """Stands in for jax's cuDNN call on CPU: XLA values, and jax's training-time check (its
  forward rule raises for odd lengths, as fused_attention_stablehlo does on a GPU)."""

  @jax.custom_vjp
  def fake(q, k, v, kv_lengths):
    calls.append("forward")
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths)

  def fwd(q, k, v, kv_lengths):
    calls.append("training forward" + ("" if kv_lengths is None else " masked"))
    if q.shape[1] % 2 or k.shape[1] % 2:
      raise NotImplementedError(f"Unsupported sequence length Q {q.shape[1]}, KV {k.shape[1]}.")
    out, vjp = jax.vjp(lambda *a: jax.nn.dot_product_attention(*a, key_value_seq_lengths=kv_lengths),
                       q, k, v)
    return out, (vjp, kv_lengths)

  def bwd(res, g):
    calls.append("cudnn backward")
    vjp, kv_lengths = res
    return vjp(g) + (None if kv_lengths is None else np.zeros(kv_lengths.shape, jax.dtypes.float0),)

  fake.defvjp(fwd, bwd)
  return lambda q, k, v, kv_lengths=None: fake(q, k, v, kv_lengths)


def test_numpy_attention_vjp_matches_jax_xla():
  """The float64 reference gradient formula is right (checked against jax.vjp in float32)."""
  q, k, v = _qkv(t=5, s=7)
  g = _qkv(t=5, s=5, seed=1)[0]
  _, vjp = jax.vjp(lambda *a: jax.nn.dot_product_attention(*a), q, k, v)
  for ours, ref in zip(vjp(g), numpy_attention_vjp(q, k, v, g)):
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-5)


def test_auto_on_gpu_trains_at_odd_lengths_with_padded_cudnn_backward(monkeypatch):
  """On an (injected) H100 with the cuDNN call replaced by a stand-in that refuses odd lengths
  in training like jax does: 'cudnn' fails to differentiate at 1 + 2k tokens (the SD3 failure);
  'auto' runs the plain kernel when sampling and, under differentiation, the kernel's training
  forward and backward at even lengths with the padded key masked, with values and gradients
  equal to the float64 reference; even lengths keep the kernel's own backward unpadded."""
  calls = []
  monkeypatch.setattr(attention, "current_platform", lambda: H100)
  monkeypatch.setattr(attention, "_cudnn_call", _fake_cudnn(calls))
  monkeypatch.setattr(attention, "_logged", set())
  q, k, v = _qkv(b=2, t=9, s=9, n=2, h=16, dtype=jnp.bfloat16)
  g = _qkv(b=2, t=9, s=9, n=2, h=16, seed=1, dtype=jnp.bfloat16)[0]
  loss = lambda impl: (lambda q, k, v: jnp.sum(
      g.astype(jnp.float32)
      * attention.dot_product_attention(q, k, v, implementation=impl).astype(jnp.float32)))

  with pytest.raises(NotImplementedError, match="Q 9, KV 9"):
    jax.grad(loss("cudnn"), argnums=(0, 1, 2))(q, k, v)

  calls.clear()
  out = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v))(q, k, v)
  assert calls == ["forward"]                                  # sampling: the kernel alone
  np.testing.assert_allclose(np.asarray(out, np.float32), numpy_attention(q, k, v),
                             rtol=2e-2, atol=2e-2)
  calls.clear()
  grads = jax.jit(jax.grad(loss("auto"), argnums=(0, 1, 2)))(q, k, v)
  assert calls == ["training forward masked", "cudnn backward"]  # at 10 tokens, one masked
  for ours, ref in zip(grads, numpy_attention_vjp(q, k, v, g)):
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ours, np.float32), ref, rtol=3e-2, atol=3e-2)
  # Same gradient as differentiating the XLA attention itself.
  for ours, xla in zip(grads, jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(xla, np.float32),
                               rtol=1e-2, atol=1e-2)

  calls.clear()
  q2, k2, v2 = _qkv(b=2, t=8, s=10, n=2, h=16, dtype=jnp.bfloat16)
  g2 = _qkv(b=2, t=8, s=8, n=2, h=16, seed=1, dtype=jnp.bfloat16)[0]
  grads = jax.grad(lambda q, k, v: jnp.sum(g2.astype(jnp.float32) * attention.dot_product_attention(
      q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))(q2, k2, v2)
  assert calls == ["training forward", "cudnn backward"]     # even: no padding, no mask
  for ours, ref in zip(grads, numpy_attention_vjp(q2, k2, v2, g2)):
    np.testing.assert_allclose(np.asarray(ours, np.float32), ref, rtol=3e-2, atol=3e-2)


def test_auto_logs_the_backward_fallback_once(monkeypatch, caplog):
  monkeypatch.setattr(attention, "current_platform", lambda: H100)
  monkeypatch.setattr(attention, "_cudnn_call", _fake_cudnn([]))
  monkeypatch.setattr(attention, "_logged", set())
  q, k, v = _qkv(t=9, s=9, dtype=jnp.bfloat16)
  with caplog.at_level(logging.INFO, logger=attention.__name__):
    for _ in range(2):
      attention.dot_product_attention(q, k, v)
  records = [r for r in caplog.records if r.name == attention.__name__]
  # Padding costs one token, not speed: said once, at INFO.
  assert len(records) == 1 and records[0].levelno == logging.INFO
  assert "uses 'cudnn_padded_bwd'" in records[0].getMessage()


def _real_cudnn_missing() -> str | None:
  try:
    return attention.cudnn_unsupported(attention.current_platform(), jnp.bfloat16, 64, False)
  except Exception as err:  # pylint: disable=broad-except
    return str(err)


@pytest.mark.skipif(_real_cudnn_missing() is not None, reason="needs cuDNN flash attention "
                    "(run on an NVIDIA GPU with JAX_PLATFORMS=cuda)")
def test_real_cudnn_odd_length_values_and_gradients_match_numpy():
  """On a GPU: 'auto' at SD3.5-M's odd length (1,024 + 333 tokens, 64-channel heads) samples
  with the plain kernel and trains through the padded one; both match the float64 reference
  to bfloat16 accuracy."""
  q, k, v = _qkv(b=2, t=1357, s=1357, n=2, h=64, dtype=jnp.bfloat16)
  g = _qkv(b=2, t=1357, s=1357, n=2, h=64, seed=1, dtype=jnp.bfloat16)[0]
  impl, _ = attention.select_implementation("auto", jnp.bfloat16, 64, 1357)
  assert impl == "cudnn_padded_bwd"
  out = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v))(q, k, v)
  ref = numpy_attention(q, k, v)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2 * np.abs(ref).max())
  loss = lambda q, k, v: jnp.sum(g.astype(jnp.float32) * attention.dot_product_attention(
      q, k, v).astype(jnp.float32))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  for ours, want in zip(grads, numpy_attention_vjp(q, k, v, g)):
    np.testing.assert_allclose(np.asarray(ours, np.float32), want, atol=3e-2 * np.abs(want).max())
