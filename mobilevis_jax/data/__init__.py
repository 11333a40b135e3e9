"""Datasets and input pipelines (TFDS + tf.data on the host, numpy batches out).

Importing this package hides GPUs from TensorFlow (the accelerator belongs to JAX) and registers
our TFDS builders: ``mobilevis_digits`` (embedded default dataset) and ``imagenet22k``.
``imagenet2012`` is TFDS's own builder.

    from mobilevis_jax import data
    cfg = data.default_data_config()
    it = data.train_iterator(cfg, global_batch_size=64, seed=0)
    batch = next(it)   # {'image': float32 [64, 32, 32, 3], 'label': int32 [64]}
"""
import importlib.util
import sys
import types

# Loading triton's native library (pulled in by torchvision / timm) *after* TensorFlow's crashes the
# process (a native symbol clash, segfault in triton/knobs.py). Loading it first is harmless, so do
# that whenever triton is installed and TensorFlow is not loaded yet.
if "tensorflow" not in sys.modules and importlib.util.find_spec("triton") is not None:
  try:
    import triton._C.libtriton  # noqa: F401
  except ImportError:
    pass

import tensorflow as tf

# TensorFlow must never allocate accelerator memory: JAX owns it.
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices; they were hidden then or never seen
  pass

from mobilevis_jax.data import config, pipeline, synthetic
from mobilevis_jax.data import digits_builder as _digits_builder  # noqa: F401 (registers)
from mobilevis_jax.data import imagenet22k_builder as _imagenet22k_builder  # noqa: F401
from mobilevis_jax.data.config import default_data_config, validate_data_config
from mobilevis_jax.data.image_check import CorruptImageError
from mobilevis_jax.data.pipeline import (
  TrainSchedule,
  dataset_info,
  eval_iterator,
  train_iterator,
  train_schedule,
)
from mobilevis_jax.data.sources import prepare

__all__ = ["CorruptImageError", "TrainSchedule", "dataset_info", "default_data_config",
           "eval_iterator", "get_source", "prepare", "train_iterator", "train_schedule",
           "validate_data_config"]


def get_source(name: str, backend: str = "tfdata") -> types.ModuleType:
  """The input source serving dataset ``name``: a module with ``train_iterator``,
  ``eval_iterator`` and ``dataset_info`` (the trainer's one entry point into this package).

  ``'synthetic'`` is :mod:`mobilevis_jax.data.synthetic` (trainer tests and benchmarks, no files);
  every other name goes to the TFDS pipeline of ``backend`` (``data.backend``: ``'tfdata'``,
  :mod:`~mobilevis_jax.data.pipeline`, or ``'grain'``,
  :mod:`~mobilevis_jax.data.grain_pipeline`), which validates it against its dataset table.
  """
  if name == "synthetic":
    return synthetic
  if backend == "grain":
    from mobilevis_jax.data import grain_pipeline  # imports grain only when asked for
    return grain_pipeline
  if backend != "tfdata":
    raise ValueError(f"data.backend={backend!r}; expected one of {config.BACKENDS}")
  return pipeline
