"""A synthetic data source with the input pipeline's interface, for trainer tests and benchmarks.

`data.name = 'synthetic'` selects it. Its knobs are optional fields a test config adds to its data
section (`synthetic_num_classes`, `synthetic_num_train`, `synthetic_num_eval`, and
`synthetic_nan_step`, the step whose batch is NaN); production configs do not carry them. Each
global batch is a pure function of (seed, step), so it
is identical for any number of processes and after any restart, and each process keeps its own
contiguous slice, exactly as `mobilevis_jax.data.pipeline` promises. Images are class-dependent
noisy patterns, so a model can actually learn them.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import ml_collections
import numpy as np


def _images(rng: np.random.Generator, labels: np.ndarray, size: int,
            num_classes: int) -> np.ndarray:
  # One fixed random template per class plus noise: learnable, but not trivially.
  templates = np.random.default_rng(1234).normal(size=(num_classes, size, size, 3))
  templates = templates.astype(np.float32)
  noise = rng.normal(size=(len(labels), size, size, 3)).astype(np.float32)
  return templates[labels] + noise


def _knob(cfg, name: str):
  return cfg.get(name, _DEFAULTS[name])


_DEFAULTS = {'synthetic_num_classes': 10, 'synthetic_num_train': 512, 'synthetic_num_eval': 128,
             'synthetic_nan_step': -1}


def _process(process_index, process_count):
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  return pi, pc


def train_iterator(cfg: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                   start_step: int = 0, process_index: int | None = None,
                   process_count: int | None = None, num_devices: int | None = None
                  ) -> Iterator[dict]:
  del num_devices  # uniform batches: the device layout does not change what is drawn
  pi, pc = _process(process_index, process_count)
  if global_batch_size % pc:
    raise ValueError(f'global batch {global_batch_size} is not divisible by {pc} processes')
  local = global_batch_size // pc
  step = start_step
  while True:
    rng = np.random.default_rng([seed, step])
    labels = rng.integers(0, _knob(cfg, 'synthetic_num_classes'),
                          size=global_batch_size).astype(np.int32)
    images = _images(rng, labels, cfg.image_size, _knob(cfg, 'synthetic_num_classes'))
    if step == _knob(cfg, 'synthetic_nan_step'):
      images[:] = np.nan
    sl = slice(pi * local, (pi + 1) * local)
    yield {'image': images[sl], 'label': labels[sl]}
    step += 1


def eval_iterator(cfg: ml_collections.ConfigDict, *, global_batch_size: int,
                  process_index: int | None = None, process_count: int | None = None
                 ) -> Iterator[dict]:
  pi, pc = _process(process_index, process_count)
  if global_batch_size % pc:
    raise ValueError(f'eval batch {global_batch_size} is not divisible by {pc} processes')
  local = global_batch_size // pc
  n = _knob(cfg, 'synthetic_num_eval')
  rng = np.random.default_rng([10_000_019])
  labels = rng.integers(0, _knob(cfg, 'synthetic_num_classes'), size=n).astype(np.int32)
  images = _images(rng, labels, cfg.image_size, _knob(cfg, 'synthetic_num_classes'))
  for start in range(0, n, global_batch_size):
    img = np.zeros((global_batch_size,) + images.shape[1:], np.float32)
    lab = np.zeros((global_batch_size,), np.int32)
    mask = np.zeros((global_batch_size,), np.float32)
    real = min(global_batch_size, n - start)
    img[:real], lab[:real] = images[start:start + real], labels[start:start + real]
    mask[:real] = 1.0
    sl = slice(pi * local, (pi + 1) * local)
    yield {'image': img[sl], 'label': lab[sl], 'mask': mask[sl]}


def dataset_info(cfg: ml_collections.ConfigDict) -> dict:
  return {'num_classes': int(_knob(cfg, 'synthetic_num_classes')),
          'splits': {cfg.train_split: int(_knob(cfg, 'synthetic_num_train')),
                     cfg.eval_split: int(_knob(cfg, 'synthetic_num_eval'))}}
