"""Calibration images for post-training quantisation (``mobilevis export --quantize int8``).

The representative dataset of a full-integer export is a few train images as the model sees them
at evaluation: :func:`calibration_images` runs the first ``n`` images of a split through the
pipeline's eval transform.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from mobilevis_jax.data import pipeline
from mobilevis_jax.data.config import default_data_config


def calibration_images(n: int, *, image_size: int, normalization: str,
                       dataset: str = "mobilevis_digits", split: str = "train",
                       data_config: Any = None) -> np.ndarray:
  """``n`` images of ``split`` of ``dataset`` through the eval transform: ``(n, S, S, 3)`` float32.

  The transform is ``data_config``'s (default: :func:`default_data_config` with ``dataset``) at
  ``image_size``, normalised with ``normalization`` (the model's input convention: ``imagenet``
  or ``parc_bgr``). The first ``n`` images of the split are taken (TFDS split slicing,
  ``'train[:n]'``), so calibration is deterministic.
  """
  if n < 1:
    raise ValueError(f"the number of calibration images must be >= 1, got {n}")
  if data_config is None:
    cfg = default_data_config()
    cfg.name = dataset
  else:
    cfg = data_config.copy_and_resolve_references()
  cfg.image_size = int(image_size)
  cfg.normalization = normalization
  cfg.eval_split = f"{split}[:{int(n)}]"
  images = []
  for batch in pipeline.eval_iterator(cfg, global_batch_size=min(int(n), 64), process_index=0,
                                      process_count=1):
    images.append(np.asarray(batch["image"])[np.asarray(batch["mask"]) > 0])
  out = np.concatenate(images)[:n]
  if len(out) < n:
    raise ValueError(f"{cfg.name}:{split} has only {len(out)} images, {n} asked for")
  return out.astype(np.float32)
