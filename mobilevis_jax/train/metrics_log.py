"""Run logs: TensorBoard event files and a JSON-lines file in the work directory, plus a progress
bar.

Only process 0 writes; the others get no-op writers. `tf.summary` is used for the event files
because tensorflow-cpu is already a dependency (of the input pipeline); it is imported lazily so a
run with TensorBoard off never loads it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/` (process 0 only)."""

  def __init__(self, workdir: str, *, tensorboard: bool = True) -> None:
    self.enabled = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', buffering=1)
    if tensorboard:
      import tensorflow as tf
      tf.config.set_visible_devices([], 'GPU')  # TF must not take accelerator memory from JAX
      from tensorflow.core.framework import summary_pb2
      self._tf = tf
      # tf.summary.scalar lives in the separate `tensorboard` package; the generic tf.summary.write
      # with the 'scalars' plugin tag writes the identical event record without it.
      self._scalar_meta = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars'))
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), 'time': time.time(), **clean}) + '\n')
    if self._tb is not None:
      with self._tb.as_default():
        for k, v in clean.items():
          self._tf.summary.write(k, self._tf.constant(v, self._tf.float32), step=int(step),
                                 metadata=self._scalar_meta)
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class ProgressBar:
  """tqdm bar (process 0) showing step rate, ETA, images/s and the last logged loss."""

  def __init__(self, *, total: int, initial: int, batch_size: int, enabled: bool = True) -> None:
    self.batch_size = batch_size
    self._bar = None
    self._last_time = time.time()
    self._last_step = initial
    if enabled and jax.process_index() == 0:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
                       mininterval=1.0)

  def update(self, step: int, loss: float | None = None) -> float:
    """Advances to `step`; returns images/s since the previous call."""
    now = time.time()
    rate = (step - self._last_step) * self.batch_size / max(now - self._last_time, 1e-9)
    if self._bar is not None:
      self._bar.update(step - self._last_step)
      post = {'img/s': f'{rate:.0f}'}
      if loss is not None:
        post['loss'] = f'{loss:.4f}'
      self._bar.set_postfix(post, refresh=False)
    self._last_time, self._last_step = now, step
    return rate

  def write(self, text: str) -> None:
    if self._bar is not None:
      self._bar.write(text)
    elif jax.process_index() == 0:
      print(text, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
