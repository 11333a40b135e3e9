"""Backend-aware convolution kernels: one semantics, the implementation chosen per backend.

Every family here is built on depthwise convolutions, and XLA's CPU backend runs
``lax.conv_general_dilated`` with ``feature_group_count = C`` some 10-50x slower than the same
sum written as ``kh * kw`` shifted multiply-adds (one fused elementwise loop), while on GPUs the
library convolution is the fast path. So the operators below compute one fixed function and pick
*how* from :data:`KERNEL_TABLE`, keyed by op and JAX backend, measured by
``experiments/bench/bench_kernels.py`` and ``bench_dynamic_conv.py`` (numbers in
``experiments/bench/RESULTS.md``; on CPU the winner was the same at every measured shape, so the
table has no shape key yet):

=================  ======================================  ===========================
op                 implementations                         cpu / gpu / tpu default
=================  ======================================  ===========================
``depthwise``      ``'xla'`` (lax conv, C groups),         ``'shift'`` / ``'xla'`` /
                   ``'shift'`` (shifted multiply-adds)     ``'xla'``
``grouped``        ``'xla'``, ``'einsum'`` (im2col taps    ``'xla'`` everywhere (einsum
                   + one batched GEMM over groups)         measured slower on CPU)
``dynamic_1x1``    ``'vmap'``, ``'grouped'``, ``'einsum'`` ``'einsum'`` / ``'vmap'`` /
                   (per-sample batched GEMM), ``'shift'``  ``'vmap'``
``dynamic_kxk``    the same four; ``'shift'`` = per-sample ``'shift'`` / ``'vmap'`` /
                   taps for depthwise, else ``'einsum'``   ``'vmap'``
``pointwise``      ``'xla'``, ``'dot'`` (a 1x1 dense conv  ``'dot'`` / ``'xla'`` /
                   as one GEMM over the channels)          ``'xla'``
=================  ======================================  ===========================

ParC keeps its own measured table (``layers/parc.py``'s ``FFT_CROSSOVER``: circulant GEMM or
FFT by axis length); it, SVGA and the KNN graph report their paths here too (:func:`note`).

GPU/TPU entries are the library defaults (XLA's conv), not measurements made here: the session
that wrote this had no accelerator. Dense (``groups=1``) static convolutions go to XLA, which
runs them as GEMMs on every backend, except 1x1 ones (``pointwise``): their forward is a GEMM
either way, but XLA:CPU computes a 1x1 conv's kernel gradient as a convolution over transposed
copies of the activations and output gradients (41% of ParC-ResNet50's train step went to those
transposes), where the same gradient written as a ``dot_general`` contracting the batch and
spatial axes is one GEMM reading the activations in place: forward + backward 1.3-3.0x faster
at ResNet's shapes (``bench_kernels.py``).

Choosing a path, most specific first:

1. a per-call argument (``impl=`` of the functions here, ``Conv(impl=...)``);
2. the innermost :func:`use` context (``with kernels.use(depthwise='xla'): ...``);
3. :func:`set_default` (process-wide);
4. :data:`KERNEL_TABLE` for ``jax.default_backend()`` (``'xla'`` for an unlisted backend).

The choice is made at trace time: a function already compiled under ``jax.jit`` keeps the path
it was traced with. It is visible: every choice is logged at DEBUG level on the
``mobilevis_jax.kernels`` logger, and :func:`kernel_report` lists the path each layer of a model
takes. :class:`Conv` is ``flax.linen.Conv`` with only the convolution function swapped, so its
parameters (``kernel`` HWIO, ``bias``) and the MAC counting of :mod:`~mobilevis_jax.layers.macs`
are those of ``nn.Conv``.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

logger = logging.getLogger("mobilevis_jax.kernels")

IMPLS: dict[str, tuple[str, ...]] = {
    "depthwise": ("xla", "shift"),
    "grouped": ("xla", "einsum"),
    "dynamic_1x1": ("vmap", "grouped", "einsum", "shift"),
    "dynamic_kxk": ("vmap", "grouped", "einsum", "shift"),
    "pointwise": ("xla", "dot"),
}

# Default implementation per op and backend. Measured on CPU with
# ``python experiments/bench/bench_kernels.py`` (see the table in the module docstring and
# RESULTS.md); GPU/TPU entries are XLA's library path (unmeasured here).
KERNEL_TABLE: dict[str, dict[str, str]] = {
    "depthwise": {"cpu": "shift", "gpu": "xla", "tpu": "xla"},
    # im2col + batched GEMM lost to XLA at ParC-Net's shapes (2 channels per group): 0.62x.
    "grouped": {"cpu": "xla", "gpu": "xla", "tpu": "xla"},
    "dynamic_1x1": {"cpu": "einsum", "gpu": "vmap", "tpu": "vmap"},
    "dynamic_kxk": {"cpu": "shift", "gpu": "vmap", "tpu": "vmap"},
    "pointwise": {"cpu": "dot", "gpu": "xla", "tpu": "xla"},
}
_FALLBACK = {"depthwise": "xla", "grouped": "xla", "dynamic_1x1": "vmap", "dynamic_kxk": "vmap",
             "pointwise": "xla"}

_GLOBAL: dict[str, str] = {}
# The default dict is never mutated: `use()` sets a new dict per context.
_CONTEXT: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("kernel_impls",
                                                                          default={})  # noqa: B039
_RECORD: contextvars.ContextVar[list | None] = contextvars.ContextVar("kernel_record",
                                                                      default=None)
_MODULE_PATH: contextvars.ContextVar[str] = contextvars.ContextVar("kernel_module", default="")

_NHWC = ("NHWC", "HWIO", "NHWC")


def _check(op: str, impl: str | None) -> None:
  if op not in IMPLS:
    raise ValueError(f"unknown kernel op {op!r} (have {sorted(IMPLS)})")
  if impl is not None and impl not in IMPLS[op]:
    raise ValueError(f"{op} implementation must be one of {IMPLS[op]}, got {impl!r}")


def _check_all(impls: dict[str, str | None]) -> None:
  for op, impl in impls.items():
    _check(op, impl)


@contextlib.contextmanager
def use(**impls: str) -> Iterator[None]:
  """Force implementations inside the context, e.g. ``use(depthwise='xla', grouped='einsum')``.

  Takes effect when functions are traced, so wrap the first call of a jitted function (or the
  ``jax.jit`` of a fresh function), not a call that hits the compilation cache.
  """
  _check_all(impls)
  token = _CONTEXT.set({**_CONTEXT.get(), **impls})
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def set_default(op: str, impl: str | None) -> None:
  """Process-wide choice for ``op``; ``None`` returns to :data:`KERNEL_TABLE`."""
  _check(op, impl)
  if impl is None:
    _GLOBAL.pop(op, None)
  else:
    _GLOBAL[op] = impl


def resolve(op: str, impl: str | None = None) -> str:
  """The implementation ``op`` runs with now (per-call ``impl`` > :func:`use` > global > table)."""
  _check(op, impl)
  if impl is not None:
    return impl
  ctx = _CONTEXT.get()
  if op in ctx:
    return ctx[op]
  if op in _GLOBAL:
    return _GLOBAL[op]
  return KERNEL_TABLE[op].get(jax.default_backend(), _FALLBACK[op])


def note(op: str, impl: str, **detail: Any) -> None:
  """Log a kernel choice and, inside :func:`recording`, append it to the record.

  Also called by operators with their own tables (ParC's ``FFT_CROSSOVER``, SVGA, KNN) so that
  :func:`kernel_report` shows every path.
  """
  path = _MODULE_PATH.get()
  logger.debug("%s %s -> %s %s", path or "<fn>", op, impl, detail)
  record = _RECORD.get()
  if record is not None:
    record.append(KernelChoice(path, op, impl, detail))


@dataclasses.dataclass(frozen=True)
class KernelChoice:
  """One traced kernel call: the calling module's path, the op, the path taken, shapes."""
  module: str
  op: str
  impl: str
  detail: dict


def _path_interceptor(next_fun, args, kwargs, context):
  token = _MODULE_PATH.set("/".join(context.module.path))
  try:
    return next_fun(*args, **kwargs)
  finally:
    _MODULE_PATH.reset(token)


@contextlib.contextmanager
def recording() -> Iterator[list[KernelChoice]]:
  """Collect a :class:`KernelChoice` for every kernel traced inside the context."""
  record: list[KernelChoice] = []
  token = _RECORD.set(record)
  try:
    with nn.intercept_methods(_path_interceptor):
      yield record
  finally:
    _RECORD.reset(token)


def kernel_report(model: nn.Module, input_shape: Sequence[int], **apply_kwargs: Any
                  ) -> list[KernelChoice]:
  """The kernel path of every dispatched layer of ``model`` for an input of ``input_shape``.

  Traces ``model.init`` abstractly (no compilation, no FLOPs), e.g.
  ``kernel_report(create_model('repvit_m1_1'), (1, 224, 224, 3), train=False)``.
  """
  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  with recording() as record:
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, **apply_kwargs), x)
  return record


def summarize(record: Sequence[KernelChoice]) -> dict[str, int]:
  """``{'depthwise:shift': 12, ...}``: how many traced calls took each path."""
  counts: dict[str, int] = {}
  for c in record:
    key = f"{c.op}:{c.impl}"
    counts[key] = counts.get(key, 0) + 1
  return counts


# ----------------------------------------------------------------------------------------------
# Shifted taps
# ----------------------------------------------------------------------------------------------
def _pairs(v, n: int = 2) -> tuple[int, ...]:
  if v is None:
    return (1,) * n
  if isinstance(v, int):
    return (v,) * n
  return tuple(v)


# Only experiments/bench/bench_tap_barrier.py turns this off, to time the program without it.
_TAP_BARRIER = True
# Only experiments/bench/bench_shared_pad.py turns this off, to time the program without it.
_SHARED_PAD = True


def _out_size(n: int, k: int, s: int, d: int, lo: int, hi: int) -> int:
  return (n + lo + hi - d * (k - 1) - 1) // s + 1


def _taps(x: jax.Array, kh: int, kw: int, strides, padding, dilation) -> tuple[list, int, int]:
  """The ``kh * kw`` strided windows of the padded NHWC map, row-major over (i, j)."""
  (pt, pb), (pl, pr) = padding
  sh, sw = strides
  dh, dw = dilation
  _, h, w, _ = x.shape
  ho = _out_size(h, kh, sh, dh, pt, pb)
  wo = _out_size(w, kw, sw, dw, pl, pr)
  if ho < 1 or wo < 1:
    raise ValueError(f"empty output: {h}x{w} map, {kh}x{kw} kernel, padding {padding}")
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0))) if any((pt, pb, pl, pr)) else x
  # Materialise the padded map once. Without the barrier XLA fuses each tap's slice into the
  # elementwise producer of ``x`` (a residual add, a bias, an activation) and recomputes it per tap;
  # through a stack of residual blocks that cascades into one loop fusion spanning many blocks,
  # recomputed ``kh * kw`` times per block: fused RepViT-M2.3 at batch 1 took 2.2 s instead of
  # 0.24 s and 93 s instead of 7 s to compile (experiments/bench/RESULTS.md, "The tap barrier").
  if _TAP_BARRIER:
    xp = jax.lax.optimization_barrier(xp)
  taps = []
  for i in range(kh):
    for j in range(kw):
      start = (0, i * dh, j * dw, 0)
      limit = (xp.shape[0], i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, xp.shape[3])
      taps.append(jax.lax.slice(xp, start, limit, (1, sh, sw, 1)))
  return taps, ho, wo


def shared_pad(x: jax.Array, padding: Sequence[tuple[int, int]], *, impl: str | None = None
               ) -> tuple[jax.Array, jax.Array]:
  """``(padded, centre)``: ``x`` padded once for a depthwise conv whose input other branches read.

  For a block like RepViT's token mixer, ``dw3x3(x) + dw1x1(x) + x``: give ``padded`` to the
  depthwise convolution with zero padding and ``centre`` (equal to ``x``) to the other branches.
  On the ``'shift'`` path ``padded`` is the tap barrier's materialised map and ``centre`` a slice
  of it, so that ``x`` has a single consumer. Otherwise the barrier of :func:`_taps` does not
  hold: XLA fuses ``x``'s producer (the previous block's residual sum, which itself reads that
  block's ``x``) into each elementwise branch and recomputes the whole residual stack in every
  block (unfused RepViT-M1.1: 4536 tap slices in the compiled forward instead of 954;
  experiments/bench/RESULTS.md, "The unfused token mixer"). Other paths return
  ``(jnp.pad(x), x)``, which XLA folds into its convolution's padding. (Where BatchNorm runs in
  train mode its batch statistics already stop the recomputation; RepViT uses this in eval mode.)
  """
  if x.ndim != 4:
    raise ValueError(f"expected an NHWC map, got shape {x.shape}")
  padding = tuple(tuple(int(q) for q in p) for p in padding)
  if len(padding) != 2 or any(len(p) != 2 or min(p) < 0 for p in padding):
    raise ValueError(f"padding must be ((top, bottom), (left, right)) >= 0, got {padding!r}")
  (pt, pb), (pl, pr) = padding
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  if resolve("depthwise", impl) != "shift" or not _SHARED_PAD:
    return xp, x
  if _TAP_BARRIER:
    xp = jax.lax.optimization_barrier(xp)
  _, h, w, c = x.shape
  return xp, jax.lax.slice(xp, (0, pt, pl, 0), (x.shape[0], pt + h, pl + w, c))


def _acc_dtype(dtype) -> Any:
  # Accumulate half-precision activations in float32, as XLA's convolutions do.
  return jnp.promote_types(dtype, jnp.float32)


def _depthwise_shift(x, kernel, strides, padding, dilation):
  """``kernel`` is HWIO ``(kh, kw, 1, C*m)`` or per-sample ``(B, kh, kw, 1, C*m)``."""
  per_sample = kernel.ndim == 5
  kh, kw = kernel.shape[-4:-2]
  cin, cout = x.shape[-1], kernel.shape[-1]
  if cout != cin:
    # Channel multiplier m: output o reads input o // m, which is lax's grouping for C groups.
    x = jnp.repeat(x, cout // cin, axis=-1)
  taps, _, _ = _taps(x, kh, kw, strides, padding, dilation)
  acc = _acc_dtype(x.dtype)
  k = kernel.astype(acc)
  y = None
  for t, xt in enumerate(taps):
    i, j = divmod(t, kw)
    wt = k[:, i, j, 0][:, None, None, :] if per_sample else k[i, j, 0]
    term = xt.astype(acc) * wt
    y = term if y is None else y + term
  return y.astype(x.dtype)


def _grouped_einsum(x, kernel, strides, padding, dilation, groups, precision=None):
  """im2col over the taps and one batched GEMM over the groups.

  ``kernel`` is HWIO ``(kh, kw, Cin/G, Cout)`` or per-sample ``(B, kh, kw, Cin/G, Cout)``; output
  channel ``g * Cout/G + o`` belongs to group ``g`` (lax's and PyTorch's grouping).
  """
  per_sample = kernel.ndim == 5
  kh, kw, cin_g, cout = kernel.shape[-4:]
  b = x.shape[0]
  taps, ho, wo = _taps(x, kh, kw, strides, padding, dilation)
  g, cout_g = groups, cout // groups
  # patches: (B, Ho, Wo, G, T * Cin/G), tap-major within a group to match the kernel below.
  if g == 1:
    # No group axis at all: with a unit one, XLA:CPU lays the operands out around it with two
    # full copies of the activations (half of a dynamic 1x1 layer's time, RESULTS.md); without
    # it the per-sample case is one batched GEMM ``[B, Ho*Wo, T*Cin] @ [B, T*Cin, Cout]``.
    patches = taps[0] if len(taps) == 1 else jnp.stack(taps, axis=3)
    patches = patches.reshape(b, ho * wo, kh * kw * cin_g)
    k = kernel.reshape(kernel.shape[:-4] + (kh * kw * cin_g, cout)).astype(x.dtype)
    spec = "bpi,bio->bpo" if per_sample else "bpi,io->bpo"
    return jnp.einsum(spec, patches, k, precision=precision).reshape(b, ho, wo, cout)
  patches = jnp.stack([t.reshape(b, ho, wo, g, cin_g) for t in taps], axis=4)
  patches = patches.reshape(b, ho, wo, g, kh * kw * cin_g)
  if per_sample:
    k = kernel.reshape(b, kh * kw * cin_g, g, cout_g)
    y = jnp.einsum("bhwgi,bigo->bhwgo", patches, k.astype(x.dtype), precision=precision)
  else:
    k = kernel.reshape(kh * kw * cin_g, g, cout_g)
    y = jnp.einsum("bhwgi,igo->bhwgo", patches, k.astype(x.dtype), precision=precision)
  return y.reshape(b, ho, wo, cout)


# ----------------------------------------------------------------------------------------------
# Static convolutions
# ----------------------------------------------------------------------------------------------
def _xla_conv(x, kernel, strides, padding, dilation, groups, precision=None):
  return jax.lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=strides, padding=padding, rhs_dilation=dilation,
      dimension_numbers=_NHWC, feature_group_count=groups, precision=precision)


def _normalise_args(x, kernel, strides, padding, dilation):
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f"expected an NHWC map and an HWIO kernel, got {x.shape} and {kernel.shape}")
  strides, dilation = _pairs(strides), _pairs(dilation)
  if isinstance(padding, str):
    raise ValueError("give explicit ((top, bottom), (left, right)) padding, not a string")
  padding = tuple(tuple(int(q) for q in p) for p in padding)
  if len(padding) != 2 or any(len(p) != 2 for p in padding):
    raise ValueError(f"padding must be ((top, bottom), (left, right)), got {padding!r}")
  if any(q < 0 for p in padding for q in p):
    raise ValueError(f"negative padding is not supported here, got {padding!r}")
  return strides, padding, dilation


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, strides: int | Sequence[int] = 1,
                     padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
                     dilation: int | Sequence[int] = 1, *, impl: str | None = None,
                     precision: Any = None) -> jax.Array:
  """Depthwise convolution of an NHWC map with an HWIO ``(kh, kw, 1, C*m)`` kernel.

  Equal to ``lax.conv_general_dilated(..., feature_group_count=C)`` (to float rounding) on every
  path; ``impl`` is ``'xla'`` or ``'shift'`` (default from :func:`resolve`).
  """
  strides, padding, dilation = _normalise_args(x, kernel, strides, padding, dilation)
  cin = x.shape[-1]
  if kernel.shape[2] != 1 or kernel.shape[3] % cin:
    raise ValueError(f"depthwise kernel must be (kh, kw, 1, C*m) for C={cin}, got {kernel.shape}")
  impl = resolve("depthwise", impl)
  note("depthwise", impl, x=tuple(x.shape), kernel=tuple(kernel.shape), strides=strides)
  if impl == "shift":
    return _depthwise_shift(x, kernel, strides, padding, dilation)
  return _xla_conv(x, kernel, strides, padding, dilation, cin, precision)


def grouped_conv2d(x: jax.Array, kernel: jax.Array, groups: int, strides: int | Sequence[int] = 1,
                   padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
                   dilation: int | Sequence[int] = 1, *, impl: str | None = None,
                   precision: Any = None) -> jax.Array:
  """Grouped convolution (``1 < groups < C``) of an NHWC map, HWIO ``(kh, kw, C/G, Cout)`` kernel.

  ``impl`` is ``'xla'`` or ``'einsum'`` (im2col + batched GEMM over groups).
  """
  strides, padding, dilation = _normalise_args(x, kernel, strides, padding, dilation)
  cin, cout = x.shape[-1], kernel.shape[-1]
  if cin % groups or cout % groups or kernel.shape[2] * groups != cin:
    raise ValueError(f"groups={groups} does not fit input {cin}, kernel {kernel.shape}")
  impl = resolve("grouped", impl)
  note("grouped", impl, x=tuple(x.shape), kernel=tuple(kernel.shape), groups=groups,
        strides=strides)
  if impl == "einsum":
    return _grouped_einsum(x, kernel, strides, padding, dilation, groups, precision)
  return _xla_conv(x, kernel, strides, padding, dilation, groups, precision)


def pointwise_conv2d(x: jax.Array, kernel: jax.Array, strides: int | Sequence[int] = 1, *,
                     impl: str | None = None, precision: Any = None) -> jax.Array:
  """1x1 dense convolution (no padding) of an NHWC map with an HWIO ``(1, 1, Cin, Cout)`` kernel.

  ``impl`` is ``'xla'`` or ``'dot'`` (the strided map times the ``Cin x Cout`` matrix; its
  autodiff gives the kernel gradient as one GEMM contracting batch and space).
  """
  strides = _pairs(strides)
  if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[:3] != (1, 1, x.shape[-1]):
    raise ValueError(f"pointwise conv needs an NHWC map and a (1, 1, Cin, Cout) kernel with "
                     f"Cin={x.shape[-1]}, got {x.shape} and {kernel.shape}")
  if min(strides) < 1:
    raise ValueError(f"strides must be >= 1, got {strides}")
  impl = resolve("pointwise", impl)
  note("pointwise", impl, x=tuple(x.shape), kernel=tuple(kernel.shape), strides=strides)
  if impl == "xla":
    return _xla_conv(x, kernel, strides, ((0, 0), (0, 0)), (1, 1), 1, precision)
  if strides != (1, 1):  # a 1x1 window at stride s reads every s-th pixel from the first
    x = jax.lax.slice(x, (0, 0, 0, 0), x.shape, (1, *strides, 1))
  dtype = jnp.promote_types(x.dtype, kernel.dtype)
  return jax.lax.dot_general(x.astype(dtype), kernel[0, 0].astype(dtype),
                             (((3,), (0,)), ((), ())), precision=precision)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                         feature_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None, *, impl: str | None = None
                        ) -> jax.Array:
  """Drop-in for ``lax.conv_general_dilated`` that routes depthwise, grouped and unpadded 1x1
  2-D NHWC convolutions through :func:`depthwise_conv2d` / :func:`grouped_conv2d` /
  :func:`pointwise_conv2d`.

  Everything else (dense kxk convolutions, other layouts or ranks, input dilation, string or
  negative padding) goes to ``lax.conv_general_dilated`` unchanged.
  """
  routable = (
      lhs.ndim == 4 and rhs.ndim == 4
      and preferred_element_type is None and not isinstance(padding, str)
      and all(d == 1 for d in _pairs(lhs_dilation))
      and all(q >= 0 for p in padding for q in p)
      and _is_nhwc(dimension_numbers, lhs.ndim))
  if (routable and feature_group_count == 1 and rhs.shape[:2] == (1, 1)
      and all(q == 0 for p in padding for q in p)):
    return pointwise_conv2d(lhs, rhs, window_strides, impl=impl, precision=precision)
  if routable and feature_group_count > 1:
    if feature_group_count == lhs.shape[-1] and rhs.shape[2] == 1:
      return depthwise_conv2d(lhs, rhs, window_strides, padding, rhs_dilation, impl=impl,
                              precision=precision)
    return grouped_conv2d(lhs, rhs, feature_group_count, window_strides, padding, rhs_dilation,
                          impl=impl, precision=precision)
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      precision=precision, preferred_element_type=preferred_element_type)


@functools.cache
def _nhwc_numbers(ndim: int):
  return jax.lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, _NHWC)


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
  if dimension_numbers is None:
    return False  # lax's default is NCHW/OIHW
  if isinstance(dimension_numbers, tuple) and all(isinstance(s, str) for s in dimension_numbers):
    return tuple(dimension_numbers) == _NHWC
  return tuple(dimension_numbers) == tuple(_nhwc_numbers(ndim))


class _Dispatch:
  """``conv_general_dilated`` with a fixed per-layer ``impl`` (hashable, compares by impl)."""

  def __init__(self, impl: str | None) -> None:
    self.impl = impl

  def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
    return conv_general_dilated(*args, impl=self.impl, **kwargs)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, _Dispatch) and other.impl == self.impl

  def __hash__(self) -> int:
    return hash(("kernels._Dispatch", self.impl))

  def __repr__(self) -> str:
    return f"kernels.conv_general_dilated(impl={self.impl!r})"


class Conv(nn.Conv):
  """``flax.linen.Conv`` whose depthwise / grouped convolutions run on the backend's fast path.

  Same fields, parameters (``kernel`` HWIO, ``bias``) and MAC count as ``nn.Conv`` (it *is* an
  ``nn.Conv``); ``impl`` pins this layer's implementation (``None``: :func:`resolve`). Dense
  convolutions are untouched.
  """
  impl: str | None = None

  def __post_init__(self) -> None:
    if self.impl is not None and self.impl not in IMPLS["depthwise"] + IMPLS["grouped"]:
      raise ValueError(f"Conv impl must be one of {IMPLS['depthwise'] + IMPLS['grouped']}, "
                       f"got {self.impl!r}")
    if self.conv_general_dilated is None and self.conv_general_dilated_cls is None:
      self.conv_general_dilated = _Dispatch(self.impl)
    super().__post_init__()


# ----------------------------------------------------------------------------------------------
# Per-sample (dynamic) convolutions
# ----------------------------------------------------------------------------------------------
def _dynamic_vmap(x, kernels, strides, padding, dilation, groups):
  def one(xb, kb):
    return _xla_conv(xb[None], kb, strides, padding, dilation, groups)[0]

  return jax.vmap(one)(x, kernels)


def _dynamic_grouped(x, kernels, strides, padding, dilation, groups):
  # CondConv's trick: fold the batch into the channels (sample-major, b * Cin + c) and run one
  # convolution with B * groups groups; group b * groups + g meets sample b's group g.
  b, h, w, cin = x.shape
  _, kh, kw, cin_g, cout = kernels.shape
  folded_x = x.transpose(1, 2, 0, 3).reshape(1, h, w, b * cin)
  folded_k = kernels.transpose(1, 2, 3, 0, 4).reshape(kh, kw, cin_g, b * cout)
  y = _xla_conv(folded_x, folded_k, strides, padding, dilation, b * groups)
  _, ho, wo, _ = y.shape
  return y.reshape(ho, wo, b, cout).transpose(2, 0, 1, 3)


def _dynamic_einsum(x, kernels, strides, padding, dilation, groups):
  # im2col over the taps (none for 1x1) and one per-sample batched GEMM over the groups.
  return _grouped_einsum(x, kernels, strides, padding, dilation, groups)


def _dynamic_shift(x, kernels, strides, padding, dilation, groups):
  # Depthwise: per-sample shifted multiply-adds (elementwise, no GEMM); otherwise the same as
  # 'einsum', since a channel-mixing kernel needs the GEMM anyway.
  if groups == x.shape[-1] and kernels.shape[3] == 1:
    return _depthwise_shift(x, kernels, strides, padding, dilation)
  return _grouped_einsum(x, kernels, strides, padding, dilation, groups)


_DYNAMIC = {"vmap": _dynamic_vmap, "grouped": _dynamic_grouped, "einsum": _dynamic_einsum,
            "shift": _dynamic_shift}


def dynamic_conv2d(x: jax.Array, kernels: jax.Array, strides: int | Sequence[int] = 1,
                   padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
                   dilation: int | Sequence[int] = 1, groups: int = 1, *, impl: str | None = None
                  ) -> jax.Array:
  """``y[b] = conv(x[b], kernels[b])``: per-sample HWIO kernels ``(B, kh, kw, Cin/G, Cout)``.

  1x1 kernels are the op ``'dynamic_1x1'``, larger ones ``'dynamic_kxk'``, each with the paths
  ``'vmap'`` (vmap of XLA's conv), ``'grouped'`` (batch folded into the groups of one conv),
  ``'einsum'`` (im2col + per-sample batched GEMM) and ``'shift'`` (per-sample shifted taps for
  depthwise kernels, else ``'einsum'``); same values on every path.
  """
  if x.ndim != 4 or kernels.ndim != 5 or kernels.shape[0] != x.shape[0]:
    raise ValueError(f"expected NHWC x and (B, kh, kw, Cin/G, Cout) kernels with the same B, got "
                     f"{x.shape} and {kernels.shape}")
  strides, padding, dilation = _normalise_args(x, kernels[0], strides, padding, dilation)
  cin, cout = x.shape[-1], kernels.shape[-1]
  if cin % groups or cout % groups or kernels.shape[3] * groups != cin:
    raise ValueError(f"groups={groups} does not fit input {cin}, kernels {kernels.shape}")
  op = "dynamic_1x1" if kernels.shape[1:3] == (1, 1) else "dynamic_kxk"
  impl = resolve(op, impl)
  note(op, impl, x=tuple(x.shape), kernels=tuple(kernels.shape), groups=groups, strides=strides)
  return _DYNAMIC[impl](x, kernels.astype(x.dtype), strides, padding, dilation, groups)


def conv_reference(x: jax.Array, kernel: jax.Array, strides: int | Sequence[int] = 1,
                   padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
                   dilation: int | Sequence[int] = 1, groups: int = 1) -> jax.Array:
  """XLA's convolution at HIGHEST precision: the reference the tests compare every path with."""
  return jax.lax.conv_general_dilated(
      x, kernel, _pairs(strides), padding, rhs_dilation=_pairs(dilation),
      dimension_numbers=_NHWC, feature_group_count=groups,
      precision=jax.lax.Precision.HIGHEST)


__all__ = [
    "Conv", "IMPLS", "KERNEL_TABLE", "KernelChoice", "conv_general_dilated", "conv_reference",
    "depthwise_conv2d", "dynamic_conv2d", "grouped_conv2d", "kernel_report", "note",
    "pointwise_conv2d", "recording",
    "resolve", "set_default", "shared_pad", "summarize", "use",
]
