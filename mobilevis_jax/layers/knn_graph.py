"""The dynamic KNN graph of Vision GNN (ViG), the baseline that SVGA replaces.

ViG rebuilds a graph in every Grapher: features are L2-normalised over channels, all pairwise
distances between the H*W nodes and the (optionally average-pooled) keys are computed, and each
node keeps its ``num_neighbors`` nearest keys (``dilation`` d: take the ``num_neighbors * d``
nearest and keep every d-th). Aggregation is max-relative, ``max_j (x_j - x_i)`` over the
gathered *unnormalised* key features.

This module exists to be measured against SVGA, so :class:`KnnGraphConv` deliberately keeps the
parameter layout of :class:`~mobilevis_jax.layers.svga.MRConv4d` (block concat ``[x, x_j]``, a
dense 1x1 conv 2C -> 2C, BN, GELU; submodules ``conv``/``bn``) and can be swapped into a
``Grapher`` in its place. What differs from ViG proper, on purpose: no interleaved channels and no
``groups=4`` conv (that would change the parameter layout), and no learned-free relative position
bias added to the distances (it needs a resolution-specific table and does not change the cost
class of the op: distances O(N*M*C), top-k, gather O(N*k*C)).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobilevis_jax.layers import kernels
from mobilevis_jax.layers.activations import gelu
from mobilevis_jax.layers.conv import Conv2d
from mobilevis_jax.layers.macs import add_macs
from mobilevis_jax.layers.norm import BatchNorm
from mobilevis_jax.layers.svga import conv_init


def _l2_normalise(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  # Same clamp as torch.nn.functional.normalize.
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def _avg_pool(x: jax.Array, ratio: int) -> jax.Array:
  if ratio == 1:
    return x
  return nn.avg_pool(x, window_shape=(ratio, ratio), strides=(ratio, ratio), padding="VALID")


def knn_indices(x: jax.Array, num_neighbors: int = 9, dilation: int = 1,
                reduce_ratio: int = 1) -> jax.Array:
  """Neighbour indices ``(B, H*W, num_neighbors)`` into the flattened (pooled) key grid.

  ``x`` is NHWC. Keys are ``avg_pool(x, reduce_ratio)`` flattened row-major; the nearest key of a
  node is usually the node itself (ViG keeps that self-loop too).
  """
  if x.ndim != 4:
    raise ValueError(f"KNN graph expects an NHWC map, got shape {x.shape}")
  for name, v in (("num_neighbors", num_neighbors), ("dilation", dilation),
                  ("reduce_ratio", reduce_ratio)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  b, h, w, c = x.shape
  keys = _avg_pool(x, reduce_ratio)
  queries = _l2_normalise(x.reshape(b, h * w, c))
  keys = _l2_normalise(keys.reshape(b, -1, c))
  m = keys.shape[1]
  wanted = num_neighbors * dilation
  if wanted > m:
    raise ValueError(f"num_neighbors * dilation = {wanted} exceeds the {m} candidate keys of a "
                     f"{h}x{w} map pooled by {reduce_ratio}")
  add_macs(b * h * w * m * c, "knn_distance")
  # The graph is not differentiated through (ViG builds it under no_grad).
  queries, keys = jax.lax.stop_gradient(queries), jax.lax.stop_gradient(keys)
  sq_dist = (jnp.sum(queries**2, -1)[:, :, None] - 2.0 * jnp.einsum("bnc,bmc->bnm", queries, keys)
             + jnp.sum(keys**2, -1)[:, None, :])
  _, idx = jax.lax.top_k(-sq_dist, wanted)
  return idx[:, :, ::dilation]


def knn_aggregate(x: jax.Array, num_neighbors: int = 9, dilation: int = 1,
                  reduce_ratio: int = 1) -> jax.Array:
  """Max-relative aggregation over the KNN graph: ``max_j (x_j - x_i)``, NHWC in and out."""
  idx = knn_indices(x, num_neighbors, dilation, reduce_ratio)
  b, h, w, c = x.shape
  kernels.note("knn", "topk-gather", x=tuple(x.shape), k=num_neighbors)
  keys = _avg_pool(x, reduce_ratio).reshape(b, -1, c)
  neighbours = jax.vmap(lambda k, i: k[i])(keys, idx)        # (B, N, k, C)
  centre = x.reshape(b, h * w, 1, c)
  return jnp.max(neighbours - centre, axis=2).reshape(b, h, w, c)


class KnnGraphConv(nn.Module):
  """Drop-in replacement for ``MRConv4d`` that builds a dynamic KNN graph (submodules conv/bn)."""
  num_neighbors: int = 9
  dilation: int = 1
  reduce_ratio: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    agg = knn_aggregate(x, self.num_neighbors, self.dilation, self.reduce_ratio)
    x = jnp.concatenate([x, agg], axis=-1)
    x = Conv2d(x.shape[-1], 1, kernel_init=conv_init, name="conv")(x)
    return gelu(BatchNorm(name="bn")(x, train))
