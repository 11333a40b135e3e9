"""BatchNorm with PyTorch semantics.

Flax's ``nn.BatchNorm`` updates the running variance with the *biased* batch variance, while
PyTorch uses the unbiased one (``n / (n - 1)`` correction). The difference is invisible at
inference but makes a resumed or ported training run drift from its PyTorch twin, so every model
here uses this module instead.

Synchronised BN is a property of the training step, not of the model: the trainer wraps the
forward pass in ``sync_batch_stats(axis_name)`` and every BatchNorm traced inside averages its
batch moments over that mapped axis (``lax.pmean``). Outside the context the statistics are
per-device, which is what PyTorch DDP recipes without SyncBN do.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

_SYNC_AXIS: contextvars.ContextVar[str | None] = contextvars.ContextVar("bn_sync_axis",
                                                                       default=None)


@contextlib.contextmanager
def sync_batch_stats(axis_name: str | None) -> Iterator[None]:
  """Within this context, BatchNorm batch moments are averaged over the mapped ``axis_name``."""
  token = _SYNC_AXIS.set(axis_name)
  try:
    yield
  finally:
    _SYNC_AXIS.reset(token)


class BatchNorm(nn.Module):
  """BatchNorm over the last axis (NHWC maps or (B, C) vectors), PyTorch-compatible.

  Attributes mirror ``torch.nn.BatchNorm{1,2}d(momentum=0.1, eps=1e-5)``; ``momentum`` is the
  Flax convention (weight of the old running value), so PyTorch's 0.1 is 0.9 here.
  Parameters: ``scale``, ``bias``; batch_stats: ``mean``, ``var``.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features = x.shape[-1]
    reduce_axes = tuple(range(x.ndim - 1))
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    # Statistics in (at least) float32 even when the trainer runs the network in bfloat16.
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if train:
      # Two passes, as PyTorch: the one-pass E[x^2] - E[x]^2 cancels catastrophically in float32
      # when |mean| >> std (pooled features, post-ReLU maps), in the forward and, worse, in the
      # backward pass (measured: 1e-3 relative gradient error where PyTorch float32 has 1e-6).
      axis_name = _SYNC_AXIS.get()
      mean = jnp.mean(xf, axis=reduce_axes)
      if axis_name is not None:
        mean = jax.lax.pmean(mean, axis_name)
      var = jnp.mean(jnp.square(xf - mean), axis=reduce_axes)
      count = 1
      for a in reduce_axes:
        count *= x.shape[a]
      if axis_name is not None:
        var = jax.lax.pmean(var, axis_name)
        count = count * jax.lax.psum(1, axis_name)
      if not self.is_initializing():
        unbiased = var * (count / jnp.maximum(count - 1, 1))
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      y = y * self.param("scale", self.scale_init, (features,), jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (features,), jnp.float32)
    return y.astype(x.dtype)
