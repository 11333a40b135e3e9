"""Classification losses and metrics of the recipes: soft-target cross-entropy (label smoothing and
mixup targets), DeiT hard distillation, and masked top-k counts for the padded eval set."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np


def smoothed_one_hot(labels: jax.Array | np.ndarray, num_classes: int, smoothing: float,
                     xp: types.ModuleType = jnp) -> jax.Array | np.ndarray:
  """timm's label smoothing: off-class value smoothing/K, true class 1 - smoothing + smoothing/K.

  ``xp`` is ``jax.numpy`` (inside the step) or ``numpy`` (host-side mixup); float32 either way.
  """
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  one_hot = labels[:, None] == xp.arange(num_classes)[None, :]
  return xp.where(one_hot, on, off).astype(xp.float32)


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over the batch of -sum_k targets_k log softmax(logits)_k (timm SoftTargetCrossEntropy)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(targets * logp, axis=-1))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean hard-label cross-entropy."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


def hard_distillation_loss(logits: jax.Array, dist_logits: jax.Array, targets: jax.Array,
                           teacher_logits: jax.Array, alpha: float) -> jax.Array:
  """DeiT 'hard': (1-alpha) * SoftCE(head, targets) + alpha * CE(dist_head, argmax teacher)."""
  base = soft_target_cross_entropy(logits, targets)
  teacher_labels = jnp.argmax(teacher_logits, axis=-1)
  return (1.0 - alpha) * base + alpha * cross_entropy(dist_logits, teacher_labels)


def masked_topk_correct(logits: jax.Array, labels: jax.Array, mask: jax.Array, k: int) -> jax.Array:
  """Number of real (mask=1) examples whose label is among the k highest logits."""
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits.astype(jnp.float32), k)
  hit = jnp.any(top == labels[:, None], axis=-1)
  return jnp.sum(hit.astype(jnp.float32) * mask)
