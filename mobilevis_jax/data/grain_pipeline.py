"""The grain input backend (``data.backend='grain'``): TFDS ArrayRecord builds read by index.

The same entry points as :mod:`mobilevis_jax.data.pipeline` (``train_iterator``,
``eval_iterator``, ``dataset_info``, ``train_schedule``) yielding the same batches: ``{'image':
float32 [b, H, W, 3], 'label': int32 [b]}`` (eval: plus ``'mask'``), ``b`` this host's share of
the global batch, laid out device by device. The records come from ``builder.as_data_source``
(random access into the ArrayRecord files, no ``tf.py_function``); grain's ``MapDataset``
drives the per-example work on a thread pool (``ReadOptions``: ``data.num_parallel_calls``
threads, -1 = one per core) in a fixed order.

**One global layout, sliced per host.** Unlike the tf.data backend (each host shuffles its own
``even_splits`` shard), the order is defined once for the whole job and each host takes its
slice of every global batch:

* the epoch order is a global permutation of the split, grain's ``MapDataset.shuffle`` with a
  seed drawn from ``(seed, epoch)``;
* ``stream``: global batch ``s`` is entries ``s*B .. (s+1)*B - 1`` of the epochs back to back
  (entry ``t`` is record ``perm_{t // N}[t % N]``); host ``p`` of ``P`` takes the contiguous
  slice ``[p*B/P, (p+1)*B/P)``, so over all hosts each epoch reads every example exactly once;
* ``repeated_aug``: DeiT's RASampler over the ``D`` mesh devices exactly (for any host count):
  entry ``i`` of the epoch's repeated list is record ``perm[i // k]``; device ``r`` gets entries
  ``r, r + D, r + 2D, ...`` (its ``floor(floor(N/256)*256/D)`` kept samples), step ``s`` of the
  epoch its slots ``s*b .. (s+1)*b - 1``; the host holds its devices ``p*L .. (p+1)*L - 1``;
* ``variable_batch``: cvnets' sampler exactly: the permutation padded to ``D*ceil(N/D)`` with
  its first entries, device ``r`` gets entries ``r, r + D, ...``; the resolution and per-device
  batch of each step come from :func:`pipeline.train_schedule`'s table and draws (the same plan
  functions: the schedule is identical to the tf.data backend's), the last batch of an epoch
  wraps to the device's first samples.

**Augmentation.** The tf.data backend's TensorFlow transforms (``pipeline._train_image_fn``:
RandomResizedCrop fused with the JPEG decode, flip, RandAugment / colour jitter, normalisation,
random erasing; the eval resize + centre crop), run per example as one traced ``tf.function``
with numpy in and out (TensorFlow releases the GIL, so grain's threads run them in parallel), so
both backends draw from the same distribution. Each example's stateless key is
``(seed * 1_000_003, position)`` with ``position`` its global entry index (``repeated_aug`` /
``variable_batch``: ``epoch * 2**32`` + its index in the epoch's dealt list), independent of the
host layout; for ``stream`` on one host it is the tf.data backend's key of the same stream
position. What differs from the tf.data backend: the record order (a global permutation instead
of per-host shards); the host layout of ``repeated_aug`` (global instead of per host; with one
host both are DeiT's) and ``variable_batch`` (devices strided as cvnets deals them instead of
contiguous runs); repeated copies are decoded once per copy (crop-fused decode, the single-copy
path) instead of once per image; ``shuffle_buffer`` and ``cache`` are not used (the permutation
is exact). Eval batches are the tf.data backend's (same host split, same order, same transform;
equal to float rounding, 1e-6: TensorFlow optimises the two graphs differently), except with
``skip_corrupt``, where a corrupt record is a masked zero image in place rather than dropped
with padding at the end.

**Corrupt records** (a JPEG without its start or end marker): ``CorruptImageError`` naming the
file, or with ``skip_corrupt`` a counted substitution by the next record of the epoch's order (a
pure function of the position, so steps stay full and resumption stays exact).

**State and resumption.** The iterator's state (:meth:`GrainTrainIterator.get_state`) is the
global step plus what identifies the stream (dataset fingerprint, split, sampler, seed, global
batch, device count); it is the same on every host after the same number of steps, as in
grain's ``ElasticIterator`` (grain's ordinary iterator state, the next index of each worker's
shard, cannot be mapped onto another shard count; a global position can). Restoring
(``set_state``) costs the same at step 10 and at step 10 million: nothing is read or skipped,
the index arithmetic starts at the step (for ``variable_batch`` the epoch plans up to it are
recomputed: numpy, tens of microseconds per epoch). The trainer saves the state inside each
orbax checkpoint through :class:`IteratorStateHandler` (grain's orbax ``CheckpointHandler``:
one ``process_<i>-of-<n>.json`` per process), and a state of another dataset, split, sampler,
seed or batch layout is refused with the field named.

**Restoring onto a different process count** (e.g. 2 hosts -> 1): grain's handler looks for the
file of this process and count; :class:`IteratorStateHandler` falls back to any process's file
(all hold the same global state). Because the layout is global and each host's share is a
contiguous slice of the global batch, the global batch of every later step, concatenated over
hosts, is the same for any process count: nothing is replayed and nothing is skipped. The device
count must stay the same for ``repeated_aug`` and ``variable_batch`` (their plans are per
device; a changed count is an error); ``stream`` continues exactly for any device count.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import threading
from typing import Any

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath
from grain.checkpoint import CheckpointHandler

from mobilevis_jax.data import pipeline, sources, transforms
from mobilevis_jax.data.image_check import CorruptImageError
from mobilevis_jax.data.pipeline import (  # noqa: F401  (this backend's schedule is the same)
  check_device_batch,
  dataset_info,
  train_schedule,
)

log = logging.getLogger(__name__)

STATE_KIND = "mobilevis_grain_train/1"
# A MapDataset needs a length; the train stream is endless (as grain's repeat(None)).
_ENDLESS = 1 << 62


# ----------------------------------------------------------------------------- records


def _open_source(cfg: ml_collections.ConfigDict, split: str):
  """(builder, random-access data source of ``split`` with undecoded images)."""
  builder = sources.builder_for(cfg)
  fmt = sources._file_format(builder)
  if fmt != "array_record":
    raise ValueError(
        f"data.backend='grain' reads ArrayRecord builds (random access); "
        f"{sources.builder_name(cfg.name, cfg.builder_config)} in {sources._data_dir(cfg)} is "
        f"{fmt!r}: prepare it with `mobilevis data prepare {cfg.name} --file-format array_record`"
        " or use data.backend='tfdata'")
  src = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
  return builder, src


def fingerprint(builder, split: str) -> str:
  """What identifies a split's records: builder, version, config, class count and the shard files
  (names and counts, not the directory, so a moved data_dir still matches)."""
  info = builder.info
  files = [(os.path.basename(fi.filename), fi.skip, fi.take)
           for fi in info.splits[split].file_instructions]
  desc = json.dumps([info.full_name, split, int(info.features["label"].num_classes), files])
  return f"{info.full_name}:{split}:{hashlib.sha1(desc.encode()).hexdigest()[:16]}"


def _jpeg_ok(data: bytes) -> bool:
  # The tf.data backend's check (pipeline._is_jpeg_ok) in numpy: start marker, end marker in the
  # last KiB.
  return data[:2] == b"\xff\xd8" and b"\xff\xd9" in data[-transforms._EOI_SEARCH_BYTES:]


class _Records:
  """Random access to a split's (image bytes, label, file name), with the corrupt-record policy."""

  def __init__(self, src, skip_corrupt: bool) -> None:
    self._src = src
    self.num_examples = len(src)
    self._skip = skip_corrupt
    self._lock = threading.Lock()
    self._skipped: set[int] = set()

  @property
  def skipped_corrupt(self) -> int:
    return len(self._skipped)

  def get(self, index: int) -> tuple[bytes, int, str] | None:
    """The record, or None if it is corrupt and skipped (counted); raises otherwise."""
    ex = self._src[int(index)]
    data, name = ex["image"], ex.get("file_name", b"<unnamed>")
    name = name.decode() if isinstance(name, bytes) else str(name)
    if _jpeg_ok(data):
      return data, int(ex["label"]), name
    if not self._skip:
      raise CorruptImageError(
          f"mobilevis: corrupt JPEG {name} (truncated or not a JPEG; set data.skip_corrupt=True "
          "to skip and count such files)")
    with self._lock:
      if index not in self._skipped:
        self._skipped.add(index)
        log.warning("skipping corrupt JPEG %s (%d skipped so far)", name, len(self._skipped))
    return None


# ----------------------------------------------------------------------------- layout


class _Layout:
  """Which examples this host feeds at each step (the global layout of the module docstring).

  A host *entry* ``n`` is the n-th example this host yields over the run; :meth:`locate` maps it
  to ``(step, slot)``, :meth:`example` a step's slot to ``(epoch, position in the epoch order,
  augmentation position)``.
  """

  def __init__(self, cfg, *, num_examples: int, global_batch_size: int, num_devices: int,
               process_index: int, process_count: int, seed: int) -> None:
    self.kind = pipeline.sampler_name(cfg)
    self.n = int(num_examples)
    self.gbs, self.d = int(global_batch_size), int(num_devices)
    self.p, self.pc = int(process_index), int(process_count)
    self.per_device = check_device_batch(self.gbs, self.d, self.pc)
    self.local_devices = self.d // self.pc
    self.seed = int(seed)
    self.image_size = int(cfg.image_size)
    self.k = int(cfg.repeated_aug)
    self._lock = threading.Lock()
    if self.kind == "repeated_aug":
      _, self.epoch_steps = pipeline.repeated_aug_epoch(self.n, self.gbs, self.d)
    if self.kind == "variable_batch":
      self._table = pipeline.variable_batch_table(cfg, global_batch_size=self.gbs,
                                                  num_devices=self.d)
      self.share = -(-self.n // self.d)
      # Per epoch: first step and first host entry (grown on demand).
      self._step_starts, self._entry_starts = [0], [0]

  # --- variable batch: the epoch plans of pipeline (same draws as the schedule) ---

  @functools.lru_cache(maxsize=64)  # noqa: B019  (one layout per iterator; bounded)
  def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    res, bsz = pipeline._variable_batch_epoch(self._table, num_examples=self.n,
                                              num_devices=self.d, seed=self.seed, epoch=epoch)
    return res, bsz, np.concatenate([[0], np.cumsum(bsz)])

  def _grow_until(self, done) -> None:
    with self._lock:
      while not done():
        res, bsz, _ = self._plan(len(self._step_starts) - 1)
        self._step_starts.append(self._step_starts[-1] + len(res))
        self._entry_starts.append(self._entry_starts[-1] + int(bsz.sum()) * self.local_devices)

  def _vb_step(self, step: int) -> tuple[int, int]:
    self._grow_until(lambda: self._step_starts[-1] > step)
    e = int(np.searchsorted(self._step_starts, step, side="right")) - 1
    return e, step - self._step_starts[e]

  # --- common ---

  def step_size(self, step: int) -> int:
    """Examples this host yields at ``step``."""
    if self.kind == "variable_batch":
      e, si = self._vb_step(step)
      return int(self._plan(e)[1][si]) * self.local_devices
    return self.gbs // self.pc

  def resolution(self, step: int) -> int:
    if self.kind == "variable_batch":
      e, si = self._vb_step(step)
      return int(self._plan(e)[0][si])
    return self.image_size

  def entry_start(self, step: int) -> int:
    """The host entry number of ``step``'s first example."""
    if self.kind != "variable_batch":
      return step * (self.gbs // self.pc)
    e, si = self._vb_step(step)
    return self._entry_starts[e] + int(self._plan(e)[2][si]) * self.local_devices

  def locate(self, entry: int) -> tuple[int, int]:
    """(step, slot) of host entry ``entry``."""
    if self.kind != "variable_batch":
      return divmod(entry, self.gbs // self.pc)
    self._grow_until(lambda: self._entry_starts[-1] > entry)
    e = int(np.searchsorted(self._entry_starts, entry, side="right")) - 1
    within = (entry - self._entry_starts[e]) // self.local_devices
    cum = self._plan(e)[2]
    si = int(np.searchsorted(cum, within, side="right")) - 1
    first = self._entry_starts[e] + int(cum[si]) * self.local_devices
    return self._step_starts[e] + si, entry - first

  def example(self, step: int, slot: int) -> tuple[int, int, int]:
    """(epoch, position in the epoch's permutation, augmentation position) of a step's slot."""
    if self.kind == "stream":
      t = step * self.gbs + self.p * (self.gbs // self.pc) + slot
      epoch, pos = divmod(t, self.n)
      return epoch, pos, t
    if self.kind == "repeated_aug":
      epoch, si = divmod(step, self.epoch_steps)
      j, u = divmod(slot, self.per_device)
      i = self.p * self.local_devices + j + self.d * (si * self.per_device + u)
      return epoch, (i // self.k) % self.n, (epoch << 32) + i
    epoch, si = self._vb_step(step)
    _, bsz, cum = self._plan(epoch)
    j, u = divmod(slot, int(bsz[si]))
    r = self.p * self.local_devices + j
    w = int(cum[si]) + u
    wrapped = w if w < self.share else w - self.share   # cvnets: the last batch wraps around
    return epoch, (r + self.d * wrapped) % self.n, (epoch << 32) + r + self.d * w


class _Entries(grain.MapDataset):
  """This host's examples from host entry ``start`` on, as ``(step, slot)`` (endless)."""

  def __init__(self, layout: _Layout, start: int) -> None:
    super().__init__()
    self._layout, self._start = layout, int(start)

  def __len__(self) -> int:
    return _ENDLESS

  def __getitem__(self, index: int | slice) -> Any:
    if isinstance(index, slice):
      return self.slice(index)
    return self._layout.locate(self._start + int(index))

  def __str__(self) -> str:
    return f"_Entries(start={self._start})"


# ----------------------------------------------------------------------------- train


def _threads(cfg) -> int:
  n = int(cfg.num_parallel_calls)
  return (os.cpu_count() or 1) if n <= 0 else n


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([int(seed), int(epoch), 0x6A1]).generate_state(1)[0])


def _config_key(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


# Traced once per data config and process (RandAugment takes seconds to trace), shared by every
# iterator of that config: a tf.function is safe to call from many threads.
@functools.lru_cache(maxsize=8)
def _train_transform(key: str) -> tf.types.experimental.GenericFunction:
  image_fn = pipeline._train_image_fn(ml_collections.ConfigDict(json.loads(key)), local_copies=1)

  @tf.function(input_signature=[tf.TensorSpec([2], tf.int64), tf.TensorSpec([], tf.string),
                                tf.TensorSpec([], tf.int32)], autograph=False)
  def augment(seed, data, size):
    return image_fn(seed, data, size)[0]
  augment.get_concrete_function()  # trace now, not concurrently in the first calls' threads
  return augment


@functools.lru_cache(maxsize=8)
def _eval_transform(key: str) -> tf.types.experimental.GenericFunction:
  image_fn = pipeline._eval_image_fn(ml_collections.ConfigDict(json.loads(key)))

  @tf.function(input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
  def transform(data):
    return image_fn(data)
  transform.get_concrete_function()
  return transform


class GrainTrainIterator(grain.DatasetIterator):
  """This host's train batches (endless), with a global, restorable state (module docstring)."""

  def __init__(self, cfg: ml_collections.ConfigDict, records: _Records, layout: _Layout, *,
               dataset: str, split: str, start_step: int) -> None:
    super().__init__()
    self._records, self._layout = records, layout
    self._dataset, self._split = dataset, split
    self._step = int(start_step)
    self._inner = None
    self._augment = _train_transform(_config_key(cfg))
    # The layout is global, so every host uses host 0's key of the tf.data backend.
    self._key = sources.host_seed(layout.seed, 0)
    max_batch = max(layout.step_size(self._step), layout.gbs // layout.pc)
    self._read_options = grain.ReadOptions(
        num_threads=_threads(cfg), prefetch_buffer_size=max(int(cfg.prefetch), 1) * max_batch)

  @property
  def step(self) -> int:
    """The step of the next batch."""
    return self._step

  @property
  def skipped_corrupt(self) -> int:
    """Corrupt records substituted so far (the reader runs ahead by the prefetch buffer)."""
    return self._records.skipped_corrupt

  @functools.lru_cache(maxsize=4)  # noqa: B019  (an epoch or two in flight at a time)
  def _perm(self, epoch: int) -> grain.MapDataset:
    return grain.MapDataset.range(self._layout.n).shuffle(seed=_epoch_seed(self._layout.seed,
                                                                           epoch))

  def _example(self, step_slot: tuple[int, int]) -> dict:
    step, slot = step_slot
    epoch, pos, aug = self._layout.example(step, slot)
    perm = self._perm(epoch)
    for shift in range(self._layout.n):  # skip_corrupt: the next good record of the epoch order
      rec = self._records.get(perm[(pos + shift) % self._layout.n])
      if rec is not None:
        break
    else:
      raise CorruptImageError(f"every record of {self._dataset} is corrupt")
    data, label, _ = rec
    image = self._augment(tf.constant([self._key, aug], tf.int64), tf.constant(data),
                          tf.constant(self._layout.resolution(step), tf.int32))
    return {"image": image.numpy(), "label": np.int32(label), "step": step}

  def _iterator(self):
    if self._inner is None:
      ds = _Entries(self._layout, self._layout.entry_start(self._step)).map(self._example)
      self._inner = iter(ds.to_iter_dataset(self._read_options))
    return self._inner

  def __next__(self) -> dict:
    it = self._iterator()
    items = [next(it) for _ in range(self._layout.step_size(self._step))]
    assert all(x["step"] == self._step for x in items), "host entries out of step"
    self._step += 1
    return {"image": np.stack([x["image"] for x in items]),
            "label": np.array([x["label"] for x in items], np.int32)}

  def close(self) -> None:
    if self._inner is not None and hasattr(self._inner, "close"):
      self._inner.close()
    self._inner = None

  def get_state(self) -> dict[str, Any]:
    lay = self._layout
    return {"kind": STATE_KIND, "dataset": self._dataset, "split": self._split,
            "num_examples": lay.n, "sampler": lay.kind, "seed": lay.seed,
            "global_batch_size": lay.gbs, "num_devices": lay.d, "image_size": lay.image_size,
            "repeated_aug": lay.k, "step": self._step, "process_count": lay.pc}

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to ``state['step']`` (constant cost) after checking the state is of this stream."""
    if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
      raise ValueError(f"not a grain train iterator state of this version ({STATE_KIND}): "
                       f"{str(state)[:200]}")
    mine = self.get_state()
    fields = ["dataset", "split", "num_examples", "sampler", "seed", "global_batch_size"]
    if mine["sampler"] != "stream":  # their plans are per device (module docstring)
      fields += ["num_devices", "repeated_aug"]
    if mine["sampler"] == "variable_batch":
      fields += ["image_size"]
    for f in fields:
      if state.get(f) != mine[f]:
        raise ValueError(
            f"the saved input iterator state has {f}={state.get(f)!r}, this run {mine[f]!r}: the "
            "checkpoint was written for another data stream (dataset, split, sampler, seed or "
            "batch layout); restore it with the same data config")
    step = int(state["step"])
    if step < 0:
      raise ValueError(f"iterator state step={step} must be >= 0")
    if state.get("process_count") != mine["process_count"]:
      log.info("input state of %s processes restored onto %s: continuing at global step %d",
               state.get("process_count"), mine["process_count"], step)
    self.close()
    self._step = step

  # The trainer's checkpoint hook (train/checkpoint.py): orbax args for this iterator's item.
  def checkpoint_save_args(self) -> IteratorSave:
    return IteratorSave(self.get_state())  # a snapshot: later steps do not change it

  def checkpoint_restore_args(self) -> IteratorRestore:
    return IteratorRestore(self)


def train_iterator(cfg: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                   start_step: int = 0, process_index: int | None = None,
                   process_count: int | None = None,
                   num_devices: int | None = None) -> GrainTrainIterator:
  """Endless iterator over this host's train batches (arguments as
  :func:`pipeline.train_iterator`; the layout is the module docstring's)."""
  process_index, process_count, _ = pipeline._host_share(cfg, global_batch_size, process_index,
                                                         process_count)
  num_devices = pipeline._num_devices(num_devices)
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0")
  builder, src = _open_source(cfg, cfg.train_split)
  layout = _Layout(cfg, num_examples=len(src), global_batch_size=global_batch_size,
                   num_devices=num_devices, process_index=process_index,
                   process_count=process_count, seed=seed)
  return GrainTrainIterator(cfg, _Records(src, bool(cfg.skip_corrupt)), layout,
                            dataset=fingerprint(builder, cfg.train_split), split=cfg.train_split,
                            start_step=start_step)


# ----------------------------------------------------------------------------- eval


class _EvalExamples(grain.MapDataset):
  """This host's eval examples, padded to ``length`` with masked zeros."""

  def __init__(self, cfg, records: _Records, length: int) -> None:
    super().__init__()
    self._records, self._length = records, int(length)
    self._size = int(cfg.image_size)
    self._transform = _eval_transform(_config_key(cfg))

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int | slice) -> Any:
    if isinstance(index, slice):
      return self.slice(index)
    rec = (self._records.get(int(index)) if int(index) < self._records.num_examples else None)
    if rec is None:
      return {"image": np.zeros([self._size, self._size, 3], np.float32),
              "label": np.int32(0), "mask": np.float32(0.0)}
    return {"image": self._transform(tf.constant(rec[0])).numpy(), "label": np.int32(rec[1]),
            "mask": np.float32(1.0)}


class GrainEvalIterator:
  """One pass over this host's eval batches (``skipped_corrupt`` as the tf.data iterator's)."""

  def __init__(self, dataset: grain.IterDataset, records: _Records) -> None:
    self._it = iter(dataset)
    self._records = records

  @property
  def skipped_corrupt(self) -> int:
    return self._records.skipped_corrupt

  def __iter__(self) -> GrainEvalIterator:
    return self

  def __next__(self) -> dict:
    return next(self._it)


def eval_iterator(cfg: ml_collections.ConfigDict, *, global_batch_size: int,
                  process_index: int | None = None,
                  process_count: int | None = None) -> GrainEvalIterator:
  """One pass over ``cfg.eval_split``: ``{'image', 'label', 'mask'}`` batches, every host the same
  number, the last ones padded (``mask`` 0); the hosts' parts are ``tfds.even_splits``, as in the
  tf.data backend."""
  process_index, process_count, local_batch = pipeline._host_share(
      cfg, global_batch_size, process_index, process_count)
  builder, whole = _open_source(cfg, cfg.eval_split)
  total = len(whole)
  if process_count > total:
    raise ValueError(f"split {cfg.eval_split!r} has fewer examples than the {process_count} hosts")
  host_split = tfds.even_splits(cfg.eval_split, n=process_count, drop_remainder=False)
  _, src = _open_source(cfg, host_split[process_index])
  records = _Records(src, bool(cfg.skip_corrupt))
  num_batches = math.ceil(math.ceil(total / process_count) / local_batch)  # as tf.data's
  ds = _EvalExamples(cfg, records, num_batches * local_batch)
  opts = grain.ReadOptions(num_threads=_threads(cfg),
                           prefetch_buffer_size=max(int(cfg.prefetch), 1) * local_batch)
  return GrainEvalIterator(ds.to_iter_dataset(opts).batch(local_batch), records)


# ----------------------------------------------------------------------------- checkpointing


class IteratorStateHandler(CheckpointHandler):
  """grain's orbax handler for the train iterator's state, restorable onto any process count.

  Saves as grain's handler does (``process_<i>-of-<n>.json`` per process, JSON of
  ``get_state()``; here of a snapshot taken when the save was requested, so an async save
  cannot see later steps). Restores this process's file when it exists, otherwise the lowest
  process's file of another count: the states of all processes are the same global state
  (module docstring), so any one of them places every host of the new layout.
  """

  def save(self, directory: epath.Path, item: Any = None, args: Any = None) -> None:
    import jax
    state = (args.state if args is not None else item)
    path = epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    path.write_text(json.dumps(state, indent=1))

  def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> Any:
    import jax
    item = item or args.item
    directory = epath.Path(directory)
    own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if own.exists():
      path = own
    else:
      files = sorted(directory.glob("process_*-of-*.json"),
                     key=lambda p: int(p.name.split("_")[1].split("-")[0]))
      if not files:
        raise FileNotFoundError(f"no input iterator state (process_*-of-*.json) in {directory}")
      path = files[0]
    item.set_state(json.loads(path.read_text()))
    return item


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
  """Orbax args: save this iterator state (a dict)."""

  state: dict


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
  """Orbax args: restore into this iterator (``set_state``)."""

  item: Any
