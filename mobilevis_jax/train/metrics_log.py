"""Run logs: TensorBoard event files and a JSON-lines file in the work directory, plus a progress
bar.

Only process 0 writes; the others get no-op writers. Both files go through `mobilevis_jax.fs`, so a
``gs://`` (or any epath) work directory gets them too. The event file is written here rather than
by `tf.summary`, whose writer reaches only TensorFlow's own filesystems: each record is an
`Event` protocol buffer (scalars as `simple_value`, which TensorBoard reads as its scalars plugin)
framed as a TFRecord (length, masked CRC32C of the length, data, masked CRC32C of the data), the
format TensorBoard's reader checks. The protos come from TensorFlow, which is already a dependency
(of the input pipeline) and is imported only when TensorBoard logging is on.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import Any

import jax

from mobilevis_jax import fs


def _crc32c_table() -> list[int]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # the Castagnoli polynomial, reflected
    table.append(c)
  return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of ``data``; pure Python, fast enough for log records of ~100 bytes."""
  c = 0xFFFFFFFF
  for b in data:
    c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: the CRC rotated right by 15 bits plus a constant, so that a CRC
  computed over data that itself holds CRCs does not degenerate."""
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(data: bytes) -> bytes:
  length = struct.pack('<Q', len(data))
  return (length + struct.pack('<I', masked_crc32c(length)) + data
          + struct.pack('<I', masked_crc32c(data)))


class EventFileWriter:
  """Scalars to a TensorBoard event file in ``logdir`` (local or any epath filesystem).

  One file per writer, named as TensorFlow names them (``events.out.tfevents.<time>.<host>.
  <pid>.v2``) so a resumed run adds a file beside the earlier ones and TensorBoard merges them.
  """

  def __init__(self, logdir: str, *, flush_secs: float = 30.0) -> None:
    from tensorflow.core.util import event_pb2
    self._event_pb2 = event_pb2
    fs.makedirs(logdir)
    name = (f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
            f'.{id(self) & 0xFFFF}.v2')
    self.path = fs.join(logdir, name)
    self._file = fs.AppendFile(self.path, binary=True, flush_secs=flush_secs)
    # The first record names the format version, as every TensorFlow event file does.
    self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event) -> None:
    self._file.write(tfrecord_frame(event.SerializeToString()))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    event = self._event_pb2.Event(wall_time=time.time(), step=int(step))
    for k, v in values.items():
      event.summary.value.add(tag=k, simple_value=float(v))
    self._write(event)

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/` (process 0 only)."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, flush_secs: float = 30.0) -> None:
    self.enabled = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if not self.enabled:
      return
    fs.makedirs(workdir)
    self._jsonl = fs.AppendFile(fs.join(workdir, 'metrics.jsonl'), flush_secs=flush_secs)
    if tensorboard:
      self._tb = EventFileWriter(fs.join(workdir, 'tensorboard'), flush_secs=flush_secs)

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), 'time': time.time(), **clean}) + '\n')
    if self._tb is not None:
      self._tb.scalars(step, clean)

  def flush(self) -> None:
    """Uploads what a remote work directory's logs hold so far (local files are always current)."""
    for f in (self._jsonl, self._tb):
      if f is not None:
        f.flush()

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
