"""Batch-level Mixup / CutMix with label smoothing, with timm's ``Mixup(mode='batch')`` semantics.

Per batch: if both alphas are positive, CutMix is chosen with probability ``switch_prob``, else
Mixup; ``lam ~ Beta(alpha, alpha)`` of the chosen method. Every image is mixed with the image at
the mirrored batch position (``x[::-1]``), as timm does.

* Mixup: ``x = lam * x + (1 - lam) * x[::-1]``.
* CutMix: a box of side ``int(H * sqrt(1 - lam))`` by ``int(W * sqrt(1 - lam))`` centred at a
  uniform random pixel, clipped to the image, is pasted from ``x[::-1]``; ``lam`` is then corrected
  to the area actually kept, ``1 - box_area / (H * W)``.
* Targets: ``lam * smooth(y) + (1 - lam) * smooth(y[::-1])`` with ``smooth(y) = one_hot(y) *
  (1 - s) + s / K`` (:func:`mobilevis_jax.train.losses.smoothed_one_hot`). Each row sums to 1.

:func:`mixup_cutmix` is pure ``jax.numpy`` (traceable; the jitted train step calls it, which is
why it lives in ``train/`` and imports no TensorFlow); :func:`mixup_cutmix_np` is the same on the
host with a ``numpy.random.Generator``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mobilevis_jax.train.losses import smoothed_one_hot


def _check(images, num_classes, mixup_alpha, cutmix_alpha, switch_prob, label_smoothing):
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
  if images.shape[0] % 2:
    raise ValueError(f"batch size {images.shape[0]} must be even for batch-level mixing (timm)")
  if num_classes <= 0:
    raise ValueError(f"num_classes={num_classes} must be positive")
  if mixup_alpha < 0 or cutmix_alpha < 0:
    raise ValueError(f"mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha} must be >= 0")
  if not 0.0 <= switch_prob <= 1.0 or not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"switch_prob={switch_prob}, label_smoothing={label_smoothing} out of range")


def _box(h, w, lam, cy, cx, xp):
  """timm ``rand_bbox`` (margin 0): returns y0, y1, x0, x1."""
  cut = xp.sqrt(1.0 - lam)
  cut_h = (h * cut).astype(xp.int32) if xp is jnp else int(h * cut)
  cut_w = (w * cut).astype(xp.int32) if xp is jnp else int(w * cut)
  y0 = xp.clip(cy - cut_h // 2, 0, h)
  y1 = xp.clip(cy + cut_h // 2, 0, h)
  x0 = xp.clip(cx - cut_w // 2, 0, w)
  x1 = xp.clip(cx + cut_w // 2, 0, w)
  return y0, y1, x0, x1


def mixup_cutmix(rng: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
                 label_smoothing: float = 0.1) -> tuple[jax.Array, jax.Array]:
  """Returns ``(mixed_images, soft_targets [B, num_classes] float32)``; pure jax.numpy."""
  _check(images, num_classes, mixup_alpha, cutmix_alpha, switch_prob, label_smoothing)
  targets = smoothed_one_hot(labels, num_classes, label_smoothing)
  if mixup_alpha == 0 and cutmix_alpha == 0:
    return images, targets
  k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(rng, 5)
  h, w = images.shape[1], images.shape[2]
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
  flipped = images[::-1]

  cy = jax.random.randint(k_y, (), 0, h)
  cx = jax.random.randint(k_x, (), 0, w)
  y0, y1, x0, x1 = _box(h, w, jnp.asarray(lam_cut, jnp.float32), cy, cx, jnp)
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  cut_images = jnp.where(inside[None, :, :, None], flipped, images)
  lam_cut_corrected = 1.0 - ((y1 - y0) * (x1 - x0)) / (h * w)

  lam_mix = jnp.asarray(lam_mix, images.dtype)
  mix_images = images * lam_mix + flipped * (1.0 - lam_mix)
  lam = jnp.where(use_cutmix, lam_cut_corrected, lam_mix).astype(jnp.float32)
  mixed = jnp.where(use_cutmix, cut_images, mix_images)
  soft = targets * lam + targets[::-1] * (1.0 - lam)
  return mixed, soft


def mixup_cutmix_np(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, *,
                    num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                    switch_prob: float = 0.5, label_smoothing: float = 0.1
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Host (numpy) version of :func:`mixup_cutmix`, same semantics; does not modify its inputs."""
  _check(images, num_classes, mixup_alpha, cutmix_alpha, switch_prob, label_smoothing)
  targets = smoothed_one_hot(labels, num_classes, label_smoothing, xp=np)
  if mixup_alpha == 0 and cutmix_alpha == 0:
    return images.copy(), targets
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = rng.random() < switch_prob
  else:
    use_cutmix = cutmix_alpha > 0
  h, w = images.shape[1], images.shape[2]
  flipped = images[::-1]
  if use_cutmix:
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
    y0, y1, x0, x1 = _box(h, w, lam, int(rng.integers(0, h)), int(rng.integers(0, w)), np)
    mixed = images.copy()
    mixed[:, y0:y1, x0:x1] = flipped[:, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
  else:
    lam = float(rng.beta(mixup_alpha, mixup_alpha))
    mixed = (images * lam + flipped * (1.0 - lam)).astype(images.dtype)
  soft = (targets * lam + targets[::-1] * (1.0 - lam)).astype(np.float32)
  return mixed, soft
