"""A tiny registered CNN for trainer tests: ConvBN-stride-2 stages, optional dropout and a
DeiT-style distillation head, small enough that a step compiles and runs in well under a second on a
CPU."""

import flax.linen as nn
import jax.numpy as jnp

from mobilevis_jax import layers
from mobilevis_jax.models.registry import list_models, register_model

TINY = 'trainer_test_tiny_cnn'


class TinyCNN(nn.Module):
  num_classes: int = 10
  width: int = 8
  dropout: float = 0.0
  distillation: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = layers.ConvBN(self.width, 3, strides=2, name='stem')(x, train)
    x = nn.relu(x)
    x = layers.ConvBN(2 * self.width, 3, strides=2, name='stage')(x, train)
    x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    x = layers.BatchNorm(name='head_bn')(x, train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, name='head')(x)
    if not self.distillation:
      return logits
    dist = nn.Dense(self.num_classes, name='head_dist')(x)
    return (logits, dist) if train else (logits + dist) / 2


if TINY not in list_models(TINY):
  @register_model(default_resolution=16)
  def trainer_test_tiny_cnn(num_classes=10, **kw):
    return TinyCNN(num_classes=num_classes, **kw)
