"""Convolutions laid out like PyTorch's.

Padding is always explicit and symmetric (``k // 2`` per side by default). Flax's ``'SAME'`` pads
the bottom/right more than the top/left for stride-2 convolutions on even inputs, which is not
what ``nn.Conv2d(padding=k//2)`` does, and the shift shows up as a 1e-1 logit mismatch.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobilevis_jax.layers.kernels import Conv as DispatchConv
from mobilevis_jax.layers.norm import BatchNorm

# ----------------------------------------------------------------------------------------------
# Initialisers: one home for the distributions the official PyTorch code draws from
# (../shared/reference/training.md). Kernels are HWIO (conv) or (in, out) (dense): flax's
# variance_scaling computes fan_in = prod(receptive field) * in/groups and fan_out =
# prod(receptive field) * out, the same numbers as PyTorch's _calculate_fan_in_and_fan_out.

# PyTorch's default Conv2d/Linear weight init, kaiming_uniform(a=sqrt(5)), is U(+-1/sqrt(fan_in)),
# i.e. a uniform variance-scaling init with scale 1/3.
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def kaiming_normal_init(mode: str = "fan_in") -> Callable:
  """``torch.nn.init.kaiming_normal_(w, mode=mode, nonlinearity='relu')``: N(0, 2/fan),
  untruncated."""
  if mode not in ("fan_in", "fan_out"):
    raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
  return nn.initializers.variance_scaling(2.0, mode, "normal")


def fan_out_normal_init(groups: int = 1) -> Callable:
  """timm regnet's conv init: N(0, 2 / fan_out) with ``fan_out = kh * kw * out_channels // groups``.

  Not :func:`kaiming_normal_init` ``('fan_out')`` (torch's, = flax's variance_scaling), which
  ignores ``groups``: that matters for grouped 3x3 convs (std sqrt(groups) times too small).
  """

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    kh, kw, _, out = shape
    std = math.sqrt(2.0 / (kh * kw * out // groups))
    return std * jax.random.normal(key, shape, dtype)

  return init


def trunc_normal_init(std: float = 0.02, a: float = -2.0, b: float = 2.0) -> Callable:
  """timm's / torch's ``trunc_normal_(std=std, a=a, b=b)``: N(0, std^2) cut at ``[a, b]``.

  The bounds are absolute values, not multiples of ``std`` (flax's ``truncated_normal`` cuts at
  +-2 std, which makes the std 12% low): with std 0.02 and bounds +-2 nothing is cut in practice.
  """
  lower, upper = a / std, b / std

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    z = jax.random.truncated_normal(key, lower, upper, shape, jnp.float32)
    return (z * std).astype(dtype)

  return init


def fan_in_uniform(fan_in: int) -> Callable:
  """PyTorch's default Conv2d/Linear init with a known fan-in: U(+-1/sqrt(fan_in)), for a weight
  or a bias (the one place the bound is written; :data:`torch_default_bias_init` resolves to it)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class FanInUniformBias:
  """PyTorch's default Conv2d/Linear bias: U(+-1/sqrt(fan_in)), fan_in taken from the kernel.

  A flax ``bias_init`` only sees the bias shape, so this marker is resolved by :class:`Conv` and
  :class:`Dense` (which know their kernel) through :class:`FanInBiasMixin`.
  """

  def __call__(self, key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32, *,
               fan_in: int | None = None) -> jax.Array:
    if fan_in is None:
      raise TypeError("torch_default_bias_init needs the kernel's fan_in: use it with layers.Conv "
                      "/ layers.Conv2d / layers.Dense, not a plain flax module")
    return fan_in_uniform(fan_in)(key, shape, dtype)

  def __repr__(self) -> str:
    return "torch_default_bias_init"


torch_default_bias_init = FanInUniformBias()


class FanInBiasMixin:
  """Resolves :data:`torch_default_bias_init` with the fan-in of the kernel created just before."""

  def param(self, name: str, init_fn: Callable, *init_args: Any, **init_kwargs: Any) -> Any:
    if name == "bias" and isinstance(init_fn, FanInUniformBias):
      kernel = self.get_variable("params", "kernel")
      if kernel is None:
        raise ValueError(f"{type(self).__name__}: bias with torch_default_bias_init needs a kernel")
      fan_in = math.prod(jnp.shape(nn.unbox(kernel))[:-1])
      init_fn = _with_fan_in(init_fn, fan_in)
    return super().param(name, init_fn, *init_args, **init_kwargs)


def _with_fan_in(init_fn: FanInUniformBias, fan_in: int) -> Callable:
  def init(key, shape, dtype=jnp.float32):
    return init_fn(key, shape, dtype, fan_in=fan_in)
  return init


class Conv(FanInBiasMixin, DispatchConv):
  """The project's convolution: ``kernels.Conv`` (backend-aware depthwise / grouped paths, an
  ``nn.Conv`` with the same parameters) whose bias may use PyTorch's fan-in default
  (:data:`torch_default_bias_init`)."""


class Dense(FanInBiasMixin, nn.Dense):
  """``flax.linen.Dense`` whose bias may use PyTorch's fan-in default
  (:data:`torch_default_bias_init`)."""


def Linear(features: int, use_bias: bool = True, kernel_init: Callable = torch_default_kernel_init,
           bias_init: Callable = torch_default_bias_init, name: str | None = None) -> Dense:
  """A dense layer initialised like ``torch.nn.Linear`` by default (weight and bias
  U(+-1/sqrt(fan_in)))."""
  return Dense(features, use_bias=use_bias, kernel_init=kernel_init, bias_init=bias_init, name=name)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None,
                   round_limit: float = 0.9) -> int:
  """Channel rounding of MobileNetV2 / GhostNet / timm: the nearest multiple of ``divisor``
  (at least ``min_value``, default ``divisor``), bumped up one step if that would lose more than
  ``1 - round_limit`` of ``v``."""
  min_value = min_value or divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < round_limit * v:
    new_v += divisor
  return new_v


Padding = int | Sequence[tuple[int, int]]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  v = tuple(v)
  if len(v) != 2:
    raise ValueError(f"expected an int or a pair, got {v!r}")
  return v  # type: ignore[return-value]


def explicit_padding(kernel_size: int | Sequence[int], padding: Padding | None,
                     dilation: int | Sequence[int] = 1) -> tuple[tuple[int, int], ...]:
  """Per-side padding pairs; ``None`` means PyTorch's usual ``dilation * (k - 1) // 2``."""
  kh, kw = _pair(kernel_size)
  dh, dw = _pair(dilation)
  if padding is None:
    return ((dh * (kh - 1) // 2,) * 2, (dw * (kw - 1) // 2,) * 2)
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  if isinstance(padding, str):
    raise ValueError("string padding is not allowed here: give explicit per-side pads")
  pads = tuple(tuple(p) for p in padding)
  if len(pads) != 2 or any(len(p) != 2 for p in pads):
    raise ValueError(f"padding must be an int or ((top, bottom), (left, right)), got {padding!r}")
  return pads  # type: ignore[return-value]


def Conv2d(features: int, kernel_size: int | Sequence[int] = 1, strides: int | Sequence[int] = 1,
           padding: Padding | None = None, dilation: int | Sequence[int] = 1, groups: int = 1,
           use_bias: bool = True, kernel_init: Callable = torch_default_kernel_init,
           bias_init: Callable = nn.initializers.zeros, name: str | None = None) -> nn.Conv:
  """A ``flax.linen.Conv`` configured like ``torch.nn.Conv2d`` (HWIO kernel, explicit pads).

  ``bias_init=torch_default_bias_init`` gives PyTorch's default bias; the default here stays zeros
  because most official models re-initialise conv biases to 0 (pass the torch default where the
  official code leaves the bias alone).
  """
  return Conv(features=features, kernel_size=_pair(kernel_size), strides=_pair(strides),
              padding=explicit_padding(kernel_size, padding, dilation),
              kernel_dilation=_pair(dilation), feature_group_count=groups, use_bias=use_bias,
              kernel_init=kernel_init, bias_init=bias_init, name=name)


class ConvBN(nn.Module):
  """Convolution -> BatchNorm -> optional activation: PyTorch's ``Sequential(conv, bn[, act])``.

  The one Conv-BN of the project (submodules ``conv`` and ``bn``). ``use_bias`` keeps a conv bias
  (MobileViG), ``bn_scale_init`` sets the BN gamma (zeros for the last Conv-BN of a residual
  branch), ``act`` is applied after BN, ``conv`` replaces the static convolution by another module
  factory called as ``conv(features, kernel_size, strides, groups=groups, name='conv')``
  (ParameterNet's dynamic convolution).
  """
  features: int
  kernel_size: int | tuple[int, int] = 1
  strides: int | tuple[int, int] = 1
  padding: Padding | None = None
  groups: int = 1
  dilation: int = 1
  act: Callable[[jax.Array], jax.Array] | None = None
  use_bias: bool = False
  bn_scale_init: Callable = nn.initializers.ones
  kernel_init: Callable = torch_default_kernel_init
  bias_init: Callable = nn.initializers.zeros
  conv: Callable[..., nn.Module] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.conv is not None:
      x = self.conv(self.features, self.kernel_size, self.strides, groups=self.groups,
                    name="conv")(x)
    else:
      x = Conv2d(self.features, self.kernel_size, self.strides, self.padding, self.dilation,
                 self.groups, use_bias=self.use_bias, kernel_init=self.kernel_init,
                 bias_init=self.bias_init, name="conv")(x)
    x = BatchNorm(scale_init=self.bn_scale_init, name="bn")(x, train)
    return self.act(x) if self.act is not None else x
