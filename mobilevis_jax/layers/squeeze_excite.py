"""Squeeze-and-excitation: a channel gate computed from the globally pooled input."""
from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobilevis_jax.layers.conv import Conv2d, torch_default_bias_init


class SqueezeExcite(nn.Module):
  """mean-pool -> ``reduce`` 1x1 conv -> act -> ``expand`` 1x1 conv -> gate -> scale the input.

  Both convs start from PyTorch's default init, biases included (U(+-1/sqrt(fan_in))): timm's
  ``SEModule`` / efficientnet ``SqueezeExcite`` that RepViT and GhostNet/ParameterNet use are never
  re-initialised by the official code (../shared/reference/training.md).
  """
  rd_channels: int
  act: Callable = jax.nn.relu
  gate: Callable = jax.nn.sigmoid
  bias_init: Callable = torch_default_bias_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = self.act(Conv2d(self.rd_channels, 1, bias_init=self.bias_init, name="reduce")(s))
    s = Conv2d(x.shape[-1], 1, bias_init=self.bias_init, name="expand")(s)
    return x * self.gate(s)
