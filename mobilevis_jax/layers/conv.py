"""Convolutions laid out like PyTorch's.

Padding is always explicit and symmetric (``k // 2`` per side by default). Flax's ``'SAME'`` pads
the bottom/right more than the top/left for stride-2 convolutions on even inputs, which is not
what ``nn.Conv2d(padding=k//2)`` does, and the shift shows up as a 1e-1 logit mismatch.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax

from mobilevis_jax.layers.norm import BatchNorm

# PyTorch's default Conv2d/Linear weight init, kaiming_uniform(a=sqrt(5)), is U(+-1/sqrt(fan_in)),
# i.e. a uniform variance-scaling init with scale 1/3.
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def trunc_normal_init(std: float = 0.02) -> Callable:
  """timm's ``trunc_normal_(std=std)`` (truncation at +-2 absolute, negligible for small std)."""
  return nn.initializers.truncated_normal(stddev=std)


Padding = int | Sequence[tuple[int, int]]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  v = tuple(v)
  if len(v) != 2:
    raise ValueError(f"expected an int or a pair, got {v!r}")
  return v  # type: ignore[return-value]


def explicit_padding(kernel_size, padding: Padding | None, dilation=1) -> tuple[tuple[int, int], ...]:
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


def Conv2d(features: int, kernel_size=1, strides=1, padding: Padding | None = None, dilation=1,
           groups: int = 1, use_bias: bool = True, kernel_init: Callable = torch_default_kernel_init,
           bias_init: Callable = nn.initializers.zeros, name: str | None = None) -> nn.Conv:
  """A ``flax.linen.Conv`` configured like ``torch.nn.Conv2d`` (HWIO kernel, explicit pads)."""
  from mobilevis_jax.layers.kernels import Conv  # backend-aware depthwise/grouped paths
  return Conv(features=features, kernel_size=_pair(kernel_size), strides=_pair(strides),
              padding=explicit_padding(kernel_size, padding, dilation),
              kernel_dilation=_pair(dilation), feature_group_count=groups, use_bias=use_bias,
              kernel_init=kernel_init, bias_init=bias_init, name=name)


class ConvBN(nn.Module):
  """Bias-free convolution followed by BatchNorm (submodules ``conv`` and ``bn``)."""
  features: int
  kernel_size: int | tuple[int, int] = 1
  strides: int | tuple[int, int] = 1
  padding: Padding | None = None
  groups: int = 1
  dilation: int = 1
  bn_scale_init: Callable = nn.initializers.ones
  kernel_init: Callable = torch_default_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = Conv2d(self.features, self.kernel_size, self.strides, self.padding, self.dilation,
               self.groups, use_bias=False, kernel_init=self.kernel_init, name="conv")(x)
    return BatchNorm(scale_init=self.bn_scale_init, name="bn")(x, train)
