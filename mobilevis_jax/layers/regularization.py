"""Stochastic depth and layer scale."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class DropPath(nn.Module):
  """Per-sample stochastic depth (timm's ``drop_path``): keep with prob 1-rate, scale by 1/(1-rate).

  Draws from the ``'dropout'`` rng; identity when not training or when ``rate == 0``.
  """
  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f"drop path rate must be in [0, 1), got {self.rate}")
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class LayerScale(nn.Module):
  """Per-channel learnable scale on the last axis (param ``scale`` of shape (C,))."""
  init_value: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.constant(self.init_value), (x.shape[-1],),
                       jnp.float32)
    return x * scale.astype(x.dtype)
