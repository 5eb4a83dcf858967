"""Scaled dot-product attention with a per-backend kernel choice, shared by every model.

  out = attention.dot_product_attention(q, k, v, implementation=cfg.attention)

Implementations (the `attention` field of the transformer configs and model settings):

  "xla"     jax.nn.dot_product_attention's XLA path: the einsum / softmax / einsum every model used
            before this module existed (bit for bit the same computation), any backend, dtype,
            mask.
  "cudnn"   cuDNN flash attention through jax.nn.dot_product_attention(implementation="cudnn"):
            NVIDIA GPUs of compute capability >= 8.0, bfloat16/float16 inputs, head_dim a
            multiple of 8 and at most 128 (256 from Hopper on). About 2x on the SD3.5-M forward.
  "splash"  the Pallas splash-attention kernel (jax.experimental.pallas.ops.tpu) on TPU: sequences
            are padded to whole blocks (padding is its own segment, so real tokens never see it),
            the head dim is zero-padded to a multiple of 128 lanes, and under a multi-device mesh
            the kernel runs per shard inside `shard_map` (batch over data/fsdp, heads over
            tensor). Not importable or runnable elsewhere; it is only imported when chosen.
  "auto"    the fastest of the above that supports the backend, dtype, shape and mask, else "xla";
            the reason for a fallback is logged once per distinct reason, not per call. On an
            NVIDIA GPU with an odd query or key length (SD3: 1,024 image + 333 text tokens),
            "auto" runs "cudnn_padded_bwd": the plain cuDNN forward when not differentiated, and
            under differentiation cuDNN's forward and backward at the length rounded up to even
            with the padded key masked (cuDNN's backward refuses odd lengths, see
            `cudnn_backward_unsupported`).

An explicit "cudnn" or "splash" that cannot run raises a ValueError naming why, rather than silently
running something else. The choice is made at trace time from static shapes and dtypes, so it costs
nothing per call and never changes between iterations.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")

# cuDNN's fused flash attention needs Ampere or newer; the head-dim limit doubles from Hopper on
# (jax's own check in jax/_src/cudnn/fused_attention_stablehlo.py).
_CUDNN_MIN_CAPABILITY = (8, 0)
_CUDNN_HOPPER = (9, 0)
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Splash works on 128-lane tiles: sequences pad to a multiple of the block, head dims to 128.
_SPLASH_BLOCK = 128
_TPU_LANES = 128
# Below this many keys the padding to whole splash blocks costs more than XLA's fused softmax
# saves (text-encoder lengths), so "auto" keeps XLA there.
_SPLASH_MIN_KV = 256

_log = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()


@dataclasses.dataclass(frozen=True)
class Platform:
  """What the dispatcher needs to know about the device (injectable for tests).

  Attributes:
    backend: jax.default_backend(): "cpu", "gpu", "tpu".
    cuda: the GPU backend is NVIDIA's (not ROCm).
    capability: CUDA compute capability (major, minor), or None.
  """

  backend: str
  cuda: bool = False
  capability: tuple[int, int] | None = None


@functools.lru_cache(maxsize=None)
def current_platform() -> Platform:
  """The default backend's Platform (cached: devices do not change within a process)."""
  backend = jax.default_backend()
  if backend != "gpu":
    return Platform(backend)
  device = jax.devices()[0]
  cap = getattr(device, "compute_capability", None)
  capability = tuple(int(x) for x in str(cap).split(".")[:2]) if cap else None
  try:
    cuda = "cuda" in device.client.platform_version.lower()
  except AttributeError:
    cuda = capability is not None
  return Platform(backend, cuda=cuda, capability=capability)


def check_implementation(name: str) -> str:
  """Returns `name` if it is a known implementation.

  Raises:
    ValueError: naming the value and the choices.
  """
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {name!r} is unknown; expected one of "
                     f"{IMPLEMENTATIONS}")
  return name


def cudnn_unsupported(platform: Platform, dtype, head_dim: int, has_mask: bool) -> str | None:
  """Why cuDNN flash attention cannot run these inputs here, or None if it can."""
  if platform.backend != "gpu" or not platform.cuda:
    return f"cuDNN needs an NVIDIA GPU (backend is {platform.backend})"
  if platform.capability is None or platform.capability < _CUDNN_MIN_CAPABILITY:
    return (f"cuDNN flash attention needs compute capability >= 8.0 (this GPU: "
            f"{platform.capability})")
  if jnp.dtype(dtype) not in _CUDNN_DTYPES:
    return f"cuDNN flash attention needs bfloat16/float16 inputs, got {jnp.dtype(dtype)}"
  limit = 256 if platform.capability >= _CUDNN_HOPPER else 128
  if head_dim % 8 or head_dim > limit:
    return f"cuDNN flash attention needs head_dim a multiple of 8 and <= {limit}, got {head_dim}"
  if has_mask:
    # jax turns a boolean mask into a dense bias, which loses most of the gain and constrains
    # sequence lengths in the backward pass; masked calls (text encoders) are short anyway.
    return "an attention mask is given (cuDNN path is only used unmasked)"
  return None


def splash_unsupported(platform: Platform, kv_length: int, has_mask: bool,
                       for_auto: bool) -> str | None:
  """Why the splash kernel should not / cannot run these inputs here, or None."""
  if platform.backend != "tpu":
    return f"splash attention needs a TPU (backend is {platform.backend})"
  if has_mask:
    return "an attention mask is given (splash path only pads by segments)"
  if for_auto and kv_length < _SPLASH_MIN_KV:
    return f"sequence of {kv_length} keys is below {_SPLASH_MIN_KV}, where XLA is as fast"
  try:
    _splash_modules()
  except ImportError as err:
    return f"the Pallas splash kernel does not import ({err})"
  return None


def cudnn_backward_unsupported(q_length: int, kv_length: int) -> str | None:
  """Why cuDNN's flash attention cannot be differentiated at these lengths, or None.

  jax checks the pattern again when the cuDNN call is differentiated (`check_is_flash_attention`
  with is_training=True in jax/_src/cudnn/fused_attention_stablehlo.py, jax 0.10.2 and later):
  its forward rule always passes a bias (an empty placeholder when there is none), and with a
  bias the backward needs even query and key lengths. That raised "Unsupported sequence length
  Q 1357, KV 1357" in the SD3.5-M LoRA step. The other training-only conditions there (FP8,
  packed segments, head dims of q and v differing) never apply to the calls made here.
  """
  if q_length % 2 or kv_length % 2:
    return (f"cuDNN's backward needs even sequence lengths (Q {q_length}, KV {kv_length}): "
            "cuDNN padded to even lengths when differentiated")
  return None


def select_implementation(requested: str, dtype, head_dim: int, kv_length: int,
                          has_mask: bool = False,
                          platform: Platform | None = None,
                          q_length: int | None = None) -> tuple[str, str | None]:
  """Resolves `requested` to the implementation that will run, and why "auto" fell back.

  Args:
    requested: one of IMPLEMENTATIONS.
    dtype: the query/key/value dtype.
    head_dim: channels per head.
    kv_length: keys per sequence.
    has_mask: a boolean mask is passed.
    platform: defaults to `current_platform()`.
    q_length: queries per sequence; defaults to kv_length (self-attention).

  Returns:
    (implementation, reason): implementation is one of IMPLEMENTATIONS other than "auto", or
    "cudnn_padded_bwd" (only from "auto": the plain cuDNN call, differentiated through a call
    padded to even lengths, because cuDNN's backward refuses these lengths). reason is None
    unless "auto" did not run this backend's fused kernel as is: "xla" (why the kernel was not
    used) or "cudnn_padded_bwd" (why the backward needs padding). An explicit "cudnn" is taken as
    asked: differentiating it at odd lengths raises jax's NotImplementedError.

  Raises:
    ValueError: unknown name, or an explicit "cudnn"/"splash" that cannot run (naming why).
  """
  check_implementation(requested)
  platform = current_platform() if platform is None else platform
  if requested == "xla":
    return "xla", None
  if requested == "cudnn":
    why = cudnn_unsupported(platform, dtype, head_dim, has_mask)
    if why:
      raise ValueError(f"attention='cudnn' cannot run: {why}; use 'auto' or 'xla'")
    return "cudnn", None
  if requested == "splash":
    why = splash_unsupported(platform, kv_length, has_mask, for_auto=False)
    if why:
      raise ValueError(f"attention='splash' cannot run: {why}; use 'auto' or 'xla'")
    return "splash", None
  # auto
  if platform.backend == "gpu":
    why = cudnn_unsupported(platform, dtype, head_dim, has_mask)
    if why is not None:
      return "xla", why
    why = cudnn_backward_unsupported(kv_length if q_length is None else q_length, kv_length)
    return ("cudnn", None) if why is None else ("cudnn_padded_bwd", why)
  if platform.backend == "tpu":
    why = splash_unsupported(platform, kv_length, has_mask, for_auto=True)
    return ("splash", None) if why is None else ("xla", why)
  return "xla", f"no fused attention kernel for backend {platform.backend}"


def _log_fallback(impl: str, reason: str, platform: Platform) -> None:
  key = (platform.backend, reason)
  if key in _logged:
    return
  _logged.add(key)
  # On CPU XLA is the expected choice, and padding for cuDNN's backward costs one token; an
  # accelerator falling back to XLA costs speed, so say that louder.
  level = (logging.INFO if platform.backend == "cpu" or impl == "cudnn_padded_bwd"
           else logging.WARNING)
  _log.log(level, "attention='auto' uses '%s': %s", impl, reason)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          mask: jax.Array | None = None,
                          implementation: str = "auto") -> jax.Array:
  """softmax(q k^T / sqrt(head_dim) [masked]) v per head, by the chosen implementation.

  Args:
    query: [B, T, N, H] float.
    key, value: [B, S, N, H], same dtype as query.
    mask: optional bool, broadcastable to [B, N, T, S]; True = attend.
    implementation: one of IMPLEMENTATIONS.

  Returns:
    [B, T, N, H] in the query dtype. Softmax statistics are float32 in every implementation.

  Raises:
    ValueError: see `select_implementation`.
  """
  platform = current_platform()
  impl, reason = select_implementation(implementation, query.dtype, query.shape[-1],
                                       key.shape[1], mask is not None, platform,
                                       q_length=query.shape[1])
  if reason is not None:
    _log_fallback(impl, reason, platform)
  if impl == "xla":
    # Exactly the call the models made before (implementation=None is XLA).
    return jax.nn.dot_product_attention(query, key, value, mask=mask)
  if impl == "cudnn":
    return _cudnn_call(query, key, value)  # never masked (cudnn_unsupported)
  if impl == "cudnn_padded_bwd":
    return cudnn_padded_backward(query, key, value)
  return splash_attention(query, key, value)


# ---- cuDNN at odd lengths: padded for the backward ----------------------------------------------
def _cudnn_call(query: jax.Array, key: jax.Array, value: jax.Array,
                kv_lengths: jax.Array | None = None) -> jax.Array:
  """The one place the cuDNN kernel is called (a module attribute, so CPU tests can stand in).

  kv_lengths: optional int32 [B]; keys at or after it are padding (cuDNN's padding mask)."""
  return jax.nn.dot_product_attention(query, key, value, key_value_seq_lengths=kv_lengths,
                                      implementation="cudnn")


def _cudnn_padded(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
  """The cuDNN call at even lengths: one zero query and/or key appended, the padded key masked
  out by cuDNN's padding mask (so the softmax is over the real keys only) and the padded query's
  row sliced off. The same function as the unpadded call, but differentiable by cuDNN."""
  b, t, s = query.shape[0], query.shape[1], key.shape[1]
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n % 2), (0, 0), (0, 0)))
  lengths = jnp.full((b,), s, jnp.int32)
  return _cudnn_call(pad(query, t), pad(key, s), pad(value, s), lengths)[:, :t]


@jax.custom_vjp
def cudnn_padded_backward(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
  """Unmasked cuDNN attention that can be differentiated at odd sequence lengths.

  Undifferentiated calls (sampling) are exactly the plain cuDNN call. Under differentiation the
  forward and its VJP are those of `_cudnn_padded`: cuDNN's own training kernels at the lengths
  rounded up to even (`cudnn_backward_unsupported`), one padded key masked out. On an H200 the
  SD3.5-M LoRA step took 172.1 ms at 1,357 tokens with this, 167.5 ms at an even 1,358, and
  277.6 ms at 1,357 with the cuDNN forward and XLA's recomputed backward that this replaces
  (bench/results/h200/).

  Args:
    query: [B, T, N, H]; key, value: [B, S, N, H] (bfloat16/float16 for the real kernel).

  Returns:
    [B, T, N, H] in the query dtype.
  """
  return _cudnn_call(query, key, value)


def _cudnn_padded_fwd(query, key, value):
  # The padded call's own VJP (cuDNN's backward and its saved softmax statistics) is the residual.
  return jax.vjp(_cudnn_padded, query, key, value)


def _cudnn_padded_bwd(vjp, grad_out):
  return vjp(grad_out)


cudnn_padded_backward.defvjp(_cudnn_padded_fwd, _cudnn_padded_bwd)


# ---- TPU splash attention ------------------------------------------------------------------------
def _splash_modules():
  """(kernel module, mask module); imported only when splash is chosen (TPU-only code)."""
  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask
  return splash_attention_kernel, splash_attention_mask


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
  kernel_lib, mask_lib = _splash_modules()
  mask = mask_lib.MultiHeadMask([mask_lib.FullMask((q_len, kv_len))] * heads)
  # The kernel holds its block-mask tables as arrays: make them concrete, not tracers of the
  # first jit that asked (they are cached across traces).
  with jax.ensure_compile_time_eval():
    return kernel_lib.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _splash_local(query, key, value, interpret: bool):
  """Splash on arrays local to one device: [b, T, n, H] x [b, S, n, H] -> [b, T, n, H]."""
  kernel_lib, _ = _splash_modules()
  b, t, n, h = query.shape
  s = key.shape[1]
  tp, sp, hp = _round_up(t, _SPLASH_BLOCK), _round_up(s, _SPLASH_BLOCK), _round_up(h, _TPU_LANES)
  # The kernel does not scale the logits; scaling q first (in float32) is the same math.
  q = (query.astype(jnp.float32) * (1.0 / math.sqrt(h))).astype(query.dtype)

  def to_kernel(x, length, padded):  # [b, L, n, h] -> [b, n, L', h'] zero-padded
    x = jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, hp - h)))
    return x.transpose(0, 2, 1, 3)

  # Padding forms segment 1: real queries see only real keys; padded queries see only padding
  # (so no softmax row is empty) and are sliced off. Zero head-dim padding changes no dot product.
  seg = lambda length, padded: (jnp.arange(padded) >= length).astype(jnp.int32)
  segments = kernel_lib.SegmentIds(q=seg(t, tp), kv=seg(s, sp))
  kernel = _splash_kernel(n, tp, sp, interpret)
  out = jax.vmap(lambda a, b_, c: kernel(a, b_, c, segments))(
      to_kernel(q, t, tp), to_kernel(key, s, sp), to_kernel(value, s, sp))
  return out.transpose(0, 2, 1, 3)[:, :t, :, :h].astype(query.dtype)


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                     interpret: bool = False) -> jax.Array:
  """The Pallas splash kernel with dot_product_attention's interface (no mask).

  Under a mesh context with more than one device the kernel runs per shard in `shard_map`
  (a Pallas call cannot be partitioned by XLA): batch split over ('data', 'fsdp'), heads over
  'tensor', sequences whole. `interpret=True` runs the kernel in Pallas' interpreter (any
  backend; used by the tests on CPU).

  Args:
    query: [B, T, N, H]; key, value: [B, S, N, H].

  Returns:
    [B, T, N, H] in the query dtype.
  """
  mesh = jax.sharding.get_abstract_mesh()
  local = functools.partial(_splash_local, interpret=interpret)
  if mesh.empty or mesh.size == 1:
    return local(query, key, value)
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  heads_axis = "tensor" if "tensor" in mesh.axis_names else None
  spec = P(batch_axes or None, None, heads_axis, None)
  return jax.shard_map(local, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(query, key, value)
