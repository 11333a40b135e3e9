"""Activations with the exact PyTorch definitions.

``jax.nn.gelu`` defaults to the tanh approximation; PyTorch's ``nn.GELU()`` is the erf form, and
the difference (~1e-3) breaks 1e-4 logit parity, so models must use :func:`gelu` from here.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

gelu = functools.partial(jax.nn.gelu, approximate=False)
relu = jax.nn.relu
silu = jax.nn.silu


def relu6(x: jax.Array) -> jax.Array:
  return jnp.clip(x, 0.0, 6.0)


def hard_sigmoid(x: jax.Array) -> jax.Array:
  """``torch.nn.Hardsigmoid`` / GhostNet's ``hard_sigmoid``: relu6(x + 3) / 6."""
  return relu6(x + 3.0) / 6.0


def hard_swish(x: jax.Array) -> jax.Array:
  """``torch.nn.Hardswish``: x * relu6(x + 3) / 6."""
  return x * hard_sigmoid(x)
