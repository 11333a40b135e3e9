"""ParC: position-aware circular convolution along one spatial axis, and Fast-ParC.

A ParC-H (ParC-W) convolution mixes every row (column) of a feature map with a kernel as long as
the map itself, wrapping around the border, so one layer already has a global receptive field
along its axis. The official ParC-Net code pads the map with its own first ``n - 1`` rows and runs
a VALID convolution, which gives the (non-centred) alignment used throughout this module::

    y[i] = sum_k w[k] * x[(i + k) mod n]        (i, k = 0 .. n-1)

Three pieces live here:

* :func:`resample_1d` turns the stored *meta* kernel / position embedding (length ``K``, the
  feature size at the training resolution) into the *instance* one for the runtime size ``n``.
  It is linear interpolation with PyTorch's ``align_corners=True`` sampling grid, which
  ``jax.image.resize`` cannot express.
* :func:`circular_conv` evaluates the operator directly (O(n) work per output) either as a
  matmul with the circulant kernel matrix ('direct', one GEMM) or as the official wrapped VALID
  convolution ('conv'), or as Fast-ParC through the FFT ('fft', O(log n) per output): by the
  correlation theorem ``y = irfft(rfft(x) * conj(rfft(w)))``. The conjugate is what makes it a
  correlation (tap 0 aligned to output i) rather than a convolution.
* :class:`ParCConv`, the Flax module holding the meta kernel (+ optional position embedding and
  bias), and :func:`parc_hw_fused`, which runs an H-then-W pair of depthwise ParCs in a single
  ``rfft2``.

``method='auto'`` picks the FFT from :data:`FFT_CROSSOVER` on, a length measured by
``experiments/bench/bench_parc_fft.py`` (not a guess); see the constant for the numbers.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mobilevis_jax.layers import kernels
from mobilevis_jax.layers.conv import fan_in_uniform, torch_default_kernel_init
from mobilevis_jax.layers.macs import add_macs

METHODS = ("auto", "direct", "conv", "fft")

# Smallest axis length from which ``method='auto'`` uses the FFT, per JAX backend; None means the
# FFT was never faster in the measured range. Measured with
# ``python experiments/bench/bench_parc_fft.py`` (jitted forward of one depthwise ParC-H on a
# (B, n, n, C) map with B=8, C=96; 'direct' is the circulant-matmul form):
#   cpu (2 shared cores, jax 0.10.2): FFT/direct speed-up 0.13-0.86x for n = 7..128, 0.8x at
#     128, 1.06x at 160, 0.98x at 192, 1.74x at 256  -> 256.
#   gpu (one H100, jax 0.11.2): 0.5-1.0x for every n = 7..128, at B=8 and at B=128  -> None.
# The FFT's O(log n) advantage only pays off at sizes far beyond ParC-Net's (n <= 64 at 512 px),
# because the direct form runs as one large GEMM. A backend not listed here (e.g. TPU) has not
# been measured; 'auto' then raises instead of guessing, and callers pick 'direct' or 'fft'.
FFT_CROSSOVER: dict[str, int | None] = {"cpu": 256, "gpu": None}


@functools.cache
def _warn_no_crossover(backend: str) -> None:
  # 'direct' is exact everywhere and the fastest form at the sizes the models use on the measured
  # backends; a backend without a measurement (TPU today) gets it, said once per process.
  logging.getLogger(__name__).warning(
      "ParC: no measured FFT crossover for backend %r (measured: %s); method='auto' uses 'direct'. "
      "Pass method='fft' (or parc_method) to choose otherwise.", backend, sorted(FFT_CROSSOVER))


def _resolve_method(method: str, n: int) -> str:
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if method != "auto":
    return method
  backend = jax.default_backend()
  if backend not in FFT_CROSSOVER:
    _warn_no_crossover(backend)
    return "direct"
  crossover = FFT_CROSSOVER[backend]
  return "fft" if crossover is not None and n >= crossover else "direct"


# ----------------------------------------------------------------------------------------------
# Resampling of meta kernels / position embeddings
# ----------------------------------------------------------------------------------------------
@functools.cache
def _align_corners_taps(size_in: int, size_out: int):
  """Left tap, right tap and right weight of align_corners=True linear interpolation."""
  # Positions are computed in float32 like PyTorch's CPU kernel, so the blend weights match bit
  # for bit rather than to ~1e-6.
  if size_out == 1:
    # PyTorch's scale is 0 for a single output sample: it takes tap 0.
    pos = np.zeros((1,), np.float32)
  else:
    scale = np.float32(size_in - 1) / np.float32(size_out - 1)
    pos = np.arange(size_out, dtype=np.float32) * scale
  left = np.minimum(np.floor(pos).astype(np.int64), size_in - 1)
  right = np.minimum(left + 1, size_in - 1)
  frac = np.clip(pos - left.astype(np.float32), 0.0, 1.0).astype(np.float32)
  return left, right, frac


def resample_1d(v: jax.Array, n: int, axis: int = 0) -> jax.Array:
  """Resample ``v`` along ``axis`` to length ``n`` like ``F.interpolate(bilinear,
  align_corners=True)``.

  Output sample ``i`` sits at input position ``i * (K - 1) / (n - 1)`` and is the linear blend of
  its two neighbours; ``n == 1`` takes sample 0 and ``n == K`` returns ``v`` unchanged.
  """
  if n < 1:
    raise ValueError(f"target length must be >= 1, got {n}")
  axis = axis % v.ndim
  size_in = v.shape[axis]
  if size_in < 1:
    raise ValueError("cannot resample an empty axis")
  if n == size_in:
    return v
  left, right, frac = _align_corners_taps(size_in, n)
  shape = [1] * v.ndim
  shape[axis] = n
  frac = jnp.asarray(frac, v.dtype).reshape(shape)
  v_left = jnp.take(v, left, axis=axis)
  v_right = jnp.take(v, right, axis=axis)
  return (1.0 - frac) * v_left + frac * v_right


# ----------------------------------------------------------------------------------------------
# Circular convolution: direct and Fast-ParC
# ----------------------------------------------------------------------------------------------
def _check_operands(x: jax.Array, kernel: jax.Array, axis: int, dense: bool) -> int:
  if x.ndim != 4:
    raise ValueError(f"circular_conv expects an NHWC map, got shape {x.shape}")
  if axis not in (1, 2):
    raise ValueError(f"axis must be 1 (H) or 2 (W) of an NHWC map, got {axis}")
  n, channels = x.shape[axis], x.shape[-1]
  want_ndim = 3 if dense else 2
  if kernel.ndim != want_ndim:
    layout = "(n, Cin, Cout)" if dense else "(n, C)"
    raise ValueError(f"{'dense' if dense else 'depthwise'} kernel must have shape {layout}, "
                     f"got {kernel.shape}")
  if kernel.shape[0] != n:
    raise ValueError(f"kernel length {kernel.shape[0]} != feature length {n} along axis {axis}; "
                     "resample the kernel first (resample_1d)")
  if kernel.shape[1] != channels:
    raise ValueError(f"kernel has {kernel.shape[1]} input channels, the map has {channels}")
  return n


@functools.cache
def _circulant_index(n: int) -> np.ndarray:
  """``idx[i, j] = (j - i) mod n``: row i of the circulant matrix reads tap (j - i) mod n."""
  return (np.arange(n)[None, :] - np.arange(n)[:, None]) % n


def _direct(x: jax.Array, kernel: jax.Array, axis: int, dense: bool) -> jax.Array:
  """The spatial form as a matmul with the circulant matrix ``M[i, j] = w[(j - i) mod n]``.

  Same sum, same O(n) work per output as the official pad-and-convolve formulation (``_conv``),
  but XLA runs it as a batched GEMM, which on CPU is 10-200x faster than a depthwise
  convolution with an n x 1 kernel (``bench_parc_fft.py`` prints both).
  """
  m = kernel.astype(x.dtype)[_circulant_index(x.shape[axis])]  # (n, n, C[, Cout])
  if dense:
    eq = "ijco,bjwc->biwo" if axis == 1 else "ijco,bhjc->bhio"
  else:
    eq = "ijc,bjwc->biwc" if axis == 1 else "ijc,bhjc->bhic"
  return jnp.einsum(eq, m, x, precision=jax.lax.Precision.HIGHEST)


def _conv(x: jax.Array, kernel: jax.Array, axis: int, dense: bool) -> jax.Array:
  """The official formulation: append the first n-1 rows (columns), then a VALID convolution."""
  n = x.shape[axis]
  head = jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)
  wrapped = jnp.concatenate([x, head], axis=axis)
  cin = x.shape[-1]
  if dense:
    w = kernel  # (n, Cin, Cout)
    groups = 1
  else:
    w = kernel[:, None, :]  # (n, 1, C): depthwise HWIO slice with I = 1
    groups = cin
  w = w[:, None] if axis == 1 else w[None, :]  # HWIO: (n, 1, I, O) or (1, n, I, O)
  return jax.lax.conv_general_dilated(
      wrapped, w.astype(x.dtype), window_strides=(1, 1), padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
      precision=jax.lax.Precision.HIGHEST)


def _fft(x: jax.Array, kernel: jax.Array, axis: int, dense: bool) -> jax.Array:
  n = x.shape[axis]
  dtype = x.dtype
  # The FFT runs in float32 even for bfloat16 activations (XLA has no half-precision FFT).
  xs = jnp.fft.rfft(x.astype(jnp.float32), axis=axis)
  ws = jnp.conj(jnp.fft.rfft(kernel.astype(jnp.float32), axis=0))  # (n//2+1, C[, Cout])
  if dense:
    eq = "bfwc,fco->bfwo" if axis == 1 else "bhfc,fco->bhfo"
    ys = jnp.einsum(eq, xs, ws, precision=jax.lax.Precision.HIGHEST)
  else:
    ys = xs * (ws[:, None, :] if axis == 1 else ws[None, :, :])
  return jnp.fft.irfft(ys, n=n, axis=axis).astype(dtype)


def circular_conv(x: jax.Array, kernel: jax.Array, axis: int, *, method: str = "auto",
                  dense: bool = False) -> jax.Array:
  """Global circular cross-correlation along ``axis`` of an NHWC map.

  Args:
    x: (B, H, W, C) map.
    kernel: instance kernel, ``(n, C)`` depthwise or ``(n, Cin, Cout)`` dense, where ``n`` is the
      map's length along ``axis``.
    axis: 1 for ParC-H (along the height), 2 for ParC-W.
    method: 'direct' (circulant matmul), 'conv' (the official pad + VALID conv; same values,
      slow on CPU), 'fft' (Fast-ParC) or 'auto' ('fft' from :data:`FFT_CROSSOVER` on, else
      'direct').
    dense: full channel mixing (ParC-ResNet50) instead of depthwise.

  Returns:
    ``y[..., i, ...] = sum_k kernel[k] * x[..., (i + k) mod n, ...]``, same spatial shape as ``x``.
  """
  n = _check_operands(x, kernel, axis, dense)
  cout = kernel.shape[-1]
  other = x.shape[3 - axis]
  add_macs(x.shape[0] * n * other * n * (x.shape[-1] * cout if dense else cout), "parc")
  resolved = _resolve_method(method, n)
  kernels.note("parc", resolved, x=tuple(x.shape), axis=axis, dense=dense)
  if resolved == "fft":
    return _fft(x, kernel, axis, dense)
  if resolved == "conv":
    return _conv(x, kernel, axis, dense)
  return _direct(x, kernel, axis, dense)


def circular_conv_hw(x: jax.Array, kernel_h: jax.Array, kernel_w: jax.Array) -> jax.Array:
  """Depthwise ParC-H followed by ParC-W in one ``rfft2`` (the 2-D correlation theorem).

  Equal to ``circular_conv(circular_conv(x, kernel_h, 1), kernel_w, 2)``; one forward and one
  inverse 2-D transform replace two of each.
  """
  _check_operands(x, kernel_h, 1, dense=False)
  _check_operands(x, kernel_w, 2, dense=False)
  b, h, w, c = x.shape
  add_macs(b * h * w * c * (h + w), "parc")
  kernels.note("parc", "fft2", x=tuple(x.shape))
  dtype = x.dtype
  xs = jnp.fft.rfft2(x.astype(jnp.float32), axes=(1, 2))  # (B, H, W//2+1, C)
  sh = jnp.conj(jnp.fft.fft(kernel_h.astype(jnp.float32), axis=0))  # (H, C)
  sw = jnp.conj(jnp.fft.rfft(kernel_w.astype(jnp.float32), axis=0))  # (W//2+1, C)
  ys = xs * sh[:, None, :] * sw[None, :, :]
  return jnp.fft.irfft2(ys, s=(h, w), axes=(1, 2)).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Flax module
# ----------------------------------------------------------------------------------------------
class ParCConv(nn.Module):
  """One ParC-H or ParC-W convolution with a resolution-adaptive meta kernel.

  Parameters are stored in NHWC/HWIO-native shapes (``K`` = ``meta_kernel_size``), so that they
  map onto PyTorch's ``(C, 1, K, 1)`` conv weights and ``(1, C, K, 1)`` embeddings by a plain
  transpose:

  ============  =============================  =============================
  parameter     ParC-H                         ParC-W
  ============  =============================  =============================
  ``kernel``    (K, 1, 1, C) / (K, 1, C, F)    (1, K, 1, C) / (1, K, C, F)
  ``pe``        (1, K, 1, C)                   (1, 1, K, C)
  ``bias``      (C,) / (F,)                    (C,) / (F,)
  ============  =============================  =============================

  (depthwise / ``dense=True`` with ``features`` = F outputs). The PE is broadcast over the other
  axis and added *before* the convolution, the bias after it.

  At call time kernel and PE are resampled (:func:`resample_1d`) to the map's length along
  ``axis``: H-kernels to H, W-kernels to W, so non-square maps work. With ``resample=False``
  the length must equal K (the official ParC-ConvNets behaviour) and a mismatch is an error.

  ``__call__(x, operands_only=True)`` returns ``(pe, kernel, bias)`` at the map's size, with
  ``pe`` broadcastable to ``x``, ``kernel`` as ``(n, C[, F])`` and ``None`` for absent parts,
  without convolving; :func:`parc_hw_fused` uses it.
  """
  axis: str  # 'H' or 'W'
  meta_kernel_size: int
  dense: bool = False
  features: int | None = None
  use_bias: bool = False
  use_pe: bool = False
  resample: bool = True
  method: str = "auto"
  kernel_init: Callable = torch_default_kernel_init
  pe_init: Callable = nn.initializers.normal(1.0)
  bias_init: Callable | None = None

  @nn.compact
  def __call__(self, x: jax.Array, operands_only: bool = False
               ) -> jax.Array | tuple[jax.Array | None, jax.Array, jax.Array | None]:
    if self.axis not in ("H", "W"):
      raise ValueError(f"axis must be 'H' or 'W', got {self.axis!r}")
    if self.method not in METHODS:
      raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
    if x.ndim != 4:
      raise ValueError(f"ParCConv expects an NHWC map, got shape {x.shape}")
    if not self.dense and self.features not in (None, x.shape[-1]):
      raise ValueError("a depthwise ParCConv keeps the channel count: features must be None or "
                       f"{x.shape[-1]}, got {self.features}")
    channels = x.shape[-1]
    features = (self.features or channels) if self.dense else channels
    k = self.meta_kernel_size
    along_h = self.axis == "H"
    ax = 1 if along_h else 2
    spatial = (k, 1) if along_h else (1, k)
    kshape = spatial + ((channels, features) if self.dense else (1, channels))
    kernel = self.param("kernel", self.kernel_init, kshape, jnp.float32)
    pe = None
    if self.use_pe:
      pe = self.param("pe", self.pe_init, (1,) + spatial + (channels,), jnp.float32)
    bias = None
    if self.use_bias:
      fan_in = k * (channels if self.dense else 1)
      bias = self.param("bias", self.bias_init or fan_in_uniform(fan_in), (features,),
                        jnp.float32)

    n = x.shape[ax]
    if n != k and not self.resample:
      raise ValueError(f"ParC-{self.axis} was built for length {k} but the map has {n} "
                       "(resample=False)")
    kernel = resample_1d(kernel, n, axis=ax - 1)
    kernel = kernel.reshape((n, channels, features) if self.dense else (n, channels))
    if pe is not None:
      pe = resample_1d(pe, n, axis=ax)
    if operands_only:
      return pe, kernel, bias

    if pe is not None:
      x = x + pe.astype(x.dtype)
    y = circular_conv(x, kernel, ax, method=self.method, dense=self.dense)
    if bias is not None:
      y = y + bias.astype(y.dtype)
    return y


def parc_hw_fused(x: jax.Array, first: ParCConv, second: ParCConv) -> jax.Array:
  """``second(first(x))`` for a depthwise ParC pair along different axes, in one ``rfft2``.

  The second conv's PE and the first conv's bias are constant along the first conv's axis, and
  the operator is linear, so they can be moved past the transform:
  ``second(first(x)) = C2(C1(x + pe1)) + C2(b1 + pe2) + b2`` where ``C2(b1 + pe2)`` is a 1-D
  circular conv of a single row (column). Both modules must be bound submodules of the caller.
  """
  if first.dense or second.dense:
    raise ValueError("parc_hw_fused handles depthwise ParC only")
  if {first.axis, second.axis} != {"H", "W"}:
    raise ValueError(f"need one ParC-H and one ParC-W, got {first.axis} and {second.axis}")
  pe1, k1, b1 = first(x, operands_only=True)
  pe2, k2, b2 = second(x, operands_only=True)
  kh, kw = (k1, k2) if first.axis == "H" else (k2, k1)
  xin = x if pe1 is None else x + pe1.astype(x.dtype)
  y = circular_conv_hw(xin, kh, kw)
  # Terms constant along the first axis: (1, 1, W, C) for H-then-W, (1, H, 1, C) for W-then-H.
  const = None
  if b1 is not None:
    const = b1[None, None, None, :]
  if pe2 is not None:
    const = pe2 if const is None else const + pe2
  if const is not None:
    h, w = x.shape[1:3]
    ax2 = 2 if second.axis == "W" else 1
    full = list(const.shape)
    full[ax2] = (h, w)[ax2 - 1]
    const = jnp.broadcast_to(const, full)
    y = y + circular_conv(const.astype(y.dtype), k2, ax2, method="direct")
  if b2 is not None:
    y = y + b2.astype(y.dtype)
  return y
