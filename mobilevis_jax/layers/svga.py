"""Sparse Vision Graph Attention (SVGA), MobileViG's graph operator, and the blocks built on it.

SVGA replaces Vision GNN's per-block KNN graph by a fixed graph: every pixel is connected to the
pixels K, 2K, 3K, ... rows above it and columns to its left, with wrap-around. Aggregation is the
max-relative rule of MRConv, so on an NHWC map it is nothing but rolls, subtractions and maxima:

    x_j = max(0, max_{s = K, 2K, .. < H} x - roll(x, s, H),
                 max_{s = K, 2K, .. < W} x - roll(x, s, W))

which is what the official ``MRConv4d`` computes (it starts from zeros, so the centre acts as a
self-loop; the roll goes in one direction only and the difference is centre minus neighbour). The
result is concatenated *after* ``x`` (block concat, not ViG's interleave) and mixed by a dense
1x1 conv (2C -> 2C) + BN + GELU.

Shapes are static, so the number of shifts is known at trace time for any H, W (square or not,
odd or even, e.g. 42x25 detection maps) and the op jit-compiles to a fixed graph.
"""
from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobilevis_jax.layers import kernels
from mobilevis_jax.layers.activations import gelu
from mobilevis_jax.layers.conv import Conv2d, ConvBN, kaiming_normal_init
from mobilevis_jax.layers.norm import BatchNorm
from mobilevis_jax.layers.regularization import DropPath

# MobileViG initialises every conv with kaiming_normal_ (fan_in, gain sqrt(2), not truncated).
conv_init = kaiming_normal_init("fan_in")


def _check_k(k: int) -> None:
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"SVGA hop K must be a positive int, got {k!r}")


def svga_shifts(size: int, k: int) -> range:
  """Roll offsets along an axis of length ``size``: K, 2K, ... strictly below ``size``."""
  _check_k(k)
  return range(k, size, k)


def svga_neighbours(height: int, width: int, k: int, row: int, col: int) -> list[tuple[int, int]]:
  """The (row, col) neighbours SVGA connects to pixel (row, col); used for plots and tests."""
  rows = [((row - s) % height, col) for s in svga_shifts(height, k)]
  cols = [(row, (col - s) % width) for s in svga_shifts(width, k)]
  return rows + cols


def svga_aggregate(x: jax.Array, k: int = 2) -> jax.Array:
  """Max-relative SVGA aggregation of an NHWC map (same shape out, values >= 0)."""
  if x.ndim != 4:
    raise ValueError(f"SVGA expects an NHWC map, got shape {x.shape}")
  _check_k(k)
  _, h, w, _ = x.shape
  kernels.note("svga", "roll-min", x=tuple(x.shape), k=k)
  rolled = [jnp.roll(x, s, axis=1) for s in svga_shifts(h, k)]
  rolled += [jnp.roll(x, s, axis=2) for s in svga_shifts(w, k)]
  if not rolled:  # a 1-pixel (or K >= size) map has no neighbours: only the zero self-loop
    return jnp.zeros_like(x)
  # max_j (x - n_j) == x - min_j n_j exactly (float subtraction is monotone in n_j), and the min
  # form needs one subtraction instead of one per shift.
  nearest = rolled[0]
  for r in rolled[1:]:
    nearest = jnp.minimum(nearest, r)
  return jnp.maximum(x - nearest, 0.0)


class MRConv4d(nn.Module):
  """SVGA graph convolution: aggregate, block-concat ``[x, x_j]``, 1x1 conv 2C->2C, BN, GELU.

  Submodules ``conv`` and ``bn`` (torch: ``graph_conv.nn.0`` / ``graph_conv.nn.1``).
  """
  k: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = jnp.concatenate([x, svga_aggregate(x, self.k)], axis=-1)
    x = Conv2d(x.shape[-1], 1, kernel_init=conv_init, name="conv")(x)
    return gelu(BatchNorm(name="bn")(x, train))


class Grapher(nn.Module):
  """``x + DropPath(fc2(graph_conv(fc1(x))))`` with fc1: C->C conv-BN, fc2: 2C->C conv-BN.

  ``graph_conv`` builds the graph convolution (default SVGA); any module mapping C -> 2C channels
  with the ``(x, train)`` signature can be swapped in, e.g.
  :class:`~mobilevis_jax.layers.knn_graph.KnnGraphConv`.
  """
  drop_path: float = 0.0
  graph_conv: Callable[..., nn.Module] = MRConv4d

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    y = ConvBN(c, use_bias=True, kernel_init=conv_init, name="fc1")(x, train)
    y = self.graph_conv(name="graph_conv")(y, train)
    if y.shape[-1] != 2 * c:
      raise ValueError(f"graph_conv must map {c} -> {2 * c} channels, got {y.shape[-1]}")
    y = ConvBN(c, use_bias=True, kernel_init=conv_init, name="fc2")(y, train)
    return x + DropPath(self.drop_path, name="drop_path")(y, train)


class FFN(nn.Module):
  """``x + DropPath(fc2(GELU(fc1(x))))``, fc1: C->ratio*C conv-BN, fc2: back to C conv-BN."""
  ratio: int = 4
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    y = gelu(ConvBN(self.ratio * c, use_bias=True, kernel_init=conv_init, name="fc1")(x, train))
    y = ConvBN(c, use_bias=True, kernel_init=conv_init, name="fc2")(y, train)
    return x + DropPath(self.drop_path, name="drop_path")(y, train)
