"""Structural re-parameterisation algebra on plain arrays.

Every function takes and returns Flax layouts: conv kernels HWIO (depthwise: (kh, kw, 1, C)),
dense kernels (in, out). ``bn_params`` holds ``scale``/``bias`` and ``bn_stats`` holds
``mean``/``var``, exactly as a :class:`~mobilevis_jax.layers.BatchNorm` stores them, so a fused
layer is one dictionary lookup away from the unfused variables.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def bn_scale_shift(bn_params: Mapping, bn_stats: Mapping, eps: float = 1e-5
                   ) -> tuple[jax.Array, jax.Array]:
  """BN in eval mode as ``y = x * s + t``; returns ``(s, t)``."""
  s = bn_params["scale"] * jnp.reciprocal(jnp.sqrt(bn_stats["var"] + eps))
  t = bn_params["bias"] - bn_stats["mean"] * s
  return s, t


def fuse_conv_bn(kernel: jax.Array, bias: jax.Array | None, bn_params: Mapping, bn_stats: Mapping,
                 eps: float = 1e-5) -> tuple[jax.Array, jax.Array]:
  """Fold a BatchNorm that follows a conv into the conv: ``W' = W * s``, ``b' = (b - mu) * s +
  beta``."""
  s, t = bn_scale_shift(bn_params, bn_stats, eps)
  fused_bias = t if bias is None else bias * s + t
  return kernel * s, fused_bias


def pad_kernel(kernel: jax.Array, size: int) -> jax.Array:
  """Zero-pad an HWIO kernel to ``size x size``, keeping it centred (e.g. 1x1 -> 3x3)."""
  kh, kw = kernel.shape[:2]
  if (size - kh) % 2 or (size - kw) % 2 or size < max(kh, kw):
    raise ValueError(f"cannot centre a {kh}x{kw} kernel in {size}x{size}")
  ph, pw = (size - kh) // 2, (size - kw) // 2
  return jnp.pad(kernel, ((ph, ph), (pw, pw), (0, 0), (0, 0)))


def identity_kernel(channels: int, size: int = 3, depthwise: bool = True,
                    dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """The conv kernel that maps x to x: a centred 1 (depthwise (k,k,1,C) or dense (k,k,C,C))."""
  if size % 2 != 1:
    raise ValueError("an identity kernel needs an odd size")
  c = size // 2
  if depthwise:
    k = jnp.zeros((size, size, 1, channels), dtype)
    return k.at[c, c, 0, :].set(1.0)
  k = jnp.zeros((size, size, channels, channels), dtype)
  return k.at[c, c].set(jnp.eye(channels, dtype=dtype))


def fuse_bn_linear(bn_params: Mapping, bn_stats: Mapping, kernel: jax.Array,
                   bias: jax.Array | None = None, eps: float = 1e-5) -> tuple[jax.Array, jax.Array]:
  """Fold a BatchNorm1d that *precedes* a Linear layer: ``W(x*s + t) + b``."""
  s, t = bn_scale_shift(bn_params, bn_stats, eps)
  fused_kernel = kernel * s[:, None]
  fused_bias = t @ kernel
  if bias is not None:
    fused_bias = fused_bias + bias
  return fused_kernel, fused_bias


def average_heads(kernel_a: jax.Array, bias_a: jax.Array, kernel_b: jax.Array,
                  bias_b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Two linear heads whose outputs are averaged at inference are one linear head."""
  return (kernel_a + kernel_b) / 2, (bias_a + bias_b) / 2
