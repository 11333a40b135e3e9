"""From a dataset name to this host's stream of serialized records.

* :func:`get_builder` / :func:`prepare` / :func:`dataset_info`: TFDS builders by our config names
  (``imagenet2012`` is TFDS's own builder; ``imagenet22k`` and ``mobilevis_digits`` are ours).
  ``mobilevis_digits`` is prepared automatically on first use; the ImageNets must be prepared with
  ``mobilevis data prepare`` (their sources are manual downloads).
* :func:`host_shards`: the part of a split this host reads. ``tfds.even_splits`` cuts the split
  into ``process_count`` contiguous, disjoint parts whose sizes differ by at most one, so the hosts
  together read every example exactly once.
* :func:`train_records` (infinite, reshuffled each epoch, resumable) and :func:`eval_records` (one
  pass, file order): ``tf.data`` datasets of ``(position, serialized_example)``.

Train order and exact resumption: epoch ``e`` of this host reads its shard files in an order drawn
from ``(seed, e)`` (interleaved deterministically) through a shuffle buffer seeded by ``(seed, e)``;
TFRecord and ArrayRecord builds are read the same way. The stream is therefore a pure function of
``(seed, process_index, process_count)``: to resume at example ``p`` the pipeline rebuilds epoch
``p // n`` and skips ``p % n`` records of it (reading, not decoding, at most one epoch of records).
The stream after a restart is identical to the uninterrupted one, not just "within a shuffle
buffer".
"""
from __future__ import annotations

import logging
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mobilevis_jax.data import config as config_lib

log = logging.getLogger(__name__)
_plain = tf.autograph.experimental.do_not_convert  # our dataset functions need no AutoGraph

# Datasets whose source ships with a declared dependency and can be prepared without asking.
_AUTO_PREPARE = ("mobilevis_digits",)


def _data_dir(cfg_or_dir) -> str:
  d = cfg_or_dir if isinstance(cfg_or_dir, str) else cfg_or_dir.data_dir
  return os.path.expanduser(d) if d else config_lib.default_data_dir()


def builder_name(name: str, builder_config: str = "") -> str:
  if name not in config_lib.DATASETS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {config_lib.DATASETS}")
  return f"{name}/{builder_config}" if builder_config else name


def get_builder(name: str, *, data_dir: str = "", builder_config: str = "",
                file_format: str | None = None, skip_corrupt: bool = False):
  """The TFDS builder of one of our dataset names (not prepared by this call)."""
  from mobilevis_jax.data import digits_builder, imagenet22k_builder  # noqa: F401 (registers them)
  kwargs = {"data_dir": _data_dir(data_dir)}
  if file_format:
    kwargs["file_format"] = file_format
  if name == "imagenet22k":
    kwargs["skip_corrupt"] = skip_corrupt
  return tfds.builder(builder_name(name, builder_config), **kwargs)


def prepare(name: str, *, data_dir: str = "", manual_dir: str = "", builder_config: str = "",
            file_format: str = "tfrecord", skip_corrupt: bool = False):
  """Runs the TFDS builder (``download_and_prepare``) with ``manual_dir``; returns the builder."""
  builder = get_builder(name, data_dir=data_dir, builder_config=builder_config,
                        file_format=file_format, skip_corrupt=skip_corrupt)
  dl_config = tfds.download.DownloadConfig(manual_dir=os.path.expanduser(manual_dir) or None)
  builder.download_and_prepare(download_config=dl_config)
  return builder


def builder_for(cfg):
  """The prepared builder for a data config; prepares the embedded dataset if needed."""
  builder = get_builder(cfg.name, data_dir=cfg.data_dir, builder_config=cfg.builder_config)
  if not builder.is_prepared():
    if cfg.name not in _AUTO_PREPARE:
      raise FileNotFoundError(
          f"dataset {builder_name(cfg.name, cfg.builder_config)} is not prepared in "
          f"{_data_dir(cfg)}; run `mobilevis data prepare {cfg.name} --manual-dir DIR "
          f"--data-dir {_data_dir(cfg)}` first")
    log.info("preparing %s in %s (first use)", cfg.name, _data_dir(cfg))
    builder = prepare(cfg.name, data_dir=cfg.data_dir, builder_config=cfg.builder_config,
                      file_format=cfg.file_format)
  return builder


def dataset_info(cfg) -> dict:
  """``{'num_classes': K, 'splits': {name: count}}`` of a (prepared) dataset."""
  builder = builder_for(cfg)
  return {"num_classes": int(builder.info.features["label"].num_classes),
          "splits": {k: int(v.num_examples) for k, v in builder.info.splits.items()}}


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
  return int(process_index), int(process_count)


def host_shards(builder, split: str, process_index: int, process_count: int):
  """(file instructions, number of examples) of this host's part of ``split``."""
  if process_count > builder.info.splits[split].num_examples:
    raise ValueError(f"split {split!r} has fewer examples than the {process_count} hosts")
  host_split = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
  instructions = [fi for fi in builder.info.splits[host_split].file_instructions if fi.take > 0]
  return instructions, sum(fi.take for fi in instructions)


def _file_format(builder) -> str:
  fmt = builder.info.file_format
  return getattr(fmt, "value", str(fmt))


def _read_tfrecord(files, skips, takes, order, cycle_length: int) -> tf.data.Dataset:
  ds = tf.data.Dataset.from_tensor_slices((tf.gather(files, order), tf.gather(skips, order),
                                           tf.gather(takes, order)))
  return ds.interleave(
      _plain(lambda f, s, t: tf.data.TFRecordDataset(f, buffer_size=1 << 20).skip(s).take(t)),
      cycle_length=cycle_length, block_length=1, deterministic=True,
      num_parallel_calls=tf.data.AUTOTUNE)


class _ArrayRecordShards:
  """Random access to the host's records of an ArrayRecord build (read in a py_function)."""

  def __init__(self, instructions):
    from array_record.python import array_record_module
    self._readers = [array_record_module.ArrayRecordReader(
        fi.filename, "readahead_buffer_size:0") for fi in instructions]
    self._skips = np.array([fi.skip for fi in instructions], np.int64)
    self._ends = np.cumsum([fi.take for fi in instructions])

  def __call__(self, idx) -> bytes:
    i = int(idx)
    f = int(np.searchsorted(self._ends, i, side="right"))
    local = i - (self._ends[f - 1] if f else 0) + self._skips[f]
    return self._readers[f].read([int(local)])[0]


def _instruction_tensors(instructions):
  files = tf.constant([fi.filename for fi in instructions])
  skips = tf.constant([fi.skip for fi in instructions], tf.int64)
  takes = tf.constant([fi.take for fi in instructions], tf.int64)
  return files, skips, takes


def _epoch_seed(seed: int, epoch) -> tf.Tensor:
  return tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])


def train_records(builder, split: str, *, seed: int, process_index: int, process_count: int,
                  start: int = 0, shuffle_buffer: int = 10_000, cache: bool = False):
  """Infinite ``(position, serialized)`` stream of this host, starting at stream position ``start``.

  Returns ``(dataset, examples_per_epoch)``.
  """
  instructions, n = host_shards(builder, split, process_index, process_count)
  # Hosts must shuffle differently: fold the host into the seed.
  host_seed = int(seed) * 1_000_003 + process_index
  start_epoch, offset = divmod(int(start), n)
  fmt = _file_format(builder)
  files, skips, takes = _instruction_tensors(instructions)
  num_files = len(instructions)

  if fmt == "array_record":
    reader = _ArrayRecordShards(instructions)

    def epoch_records(epoch):
      # A full per-epoch permutation: random access makes a global shuffle free.
      idx = tf.data.Dataset.range(n).map(_plain(
          lambda i: tf.random.experimental.index_shuffle(
              i, _epoch_seed(host_seed, epoch), tf.constant(n - 1, tf.int64))))
      return idx.map(_plain(lambda i: tf.py_function(reader, [i], tf.string)),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  elif fmt == "tfrecord":
    def epoch_records(epoch):
      order = tf.random.experimental.stateless_shuffle(tf.range(num_files),
                                                       seed=_epoch_seed(host_seed, epoch))
      ds = _read_tfrecord(files, skips, takes, order, cycle_length=min(16, num_files))
      if shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=tf.random.stateless_uniform(
            [], _epoch_seed(host_seed, epoch), minval=None, maxval=None, dtype=tf.int64))
      return ds
  else:
    raise ValueError(f"{builder.name}: unsupported file format {fmt!r}")

  def epoch_with_positions(epoch):
    first = tf.where(tf.equal(epoch, start_epoch), tf.constant(offset, tf.int64), 0)
    recs = epoch_records(epoch).skip(first)
    pos = tf.data.Dataset.range(epoch * n + first, (epoch + 1) * n)
    return tf.data.Dataset.zip(pos, recs)

  if cache:
    # Small datasets: keep the raw records of the shard in memory, shuffle indices instead.
    raw = list(_read_tfrecord(files, skips, takes, tf.range(num_files), 1).as_numpy_iterator()) \
        if fmt == "tfrecord" else [reader(i) for i in range(n)]
    table = tf.constant(raw)

    def epoch_with_positions(epoch):  # noqa: F811  (the cached variant)
      first = tf.where(tf.equal(epoch, start_epoch), tf.constant(offset, tf.int64), 0)
      pos = tf.data.Dataset.range(epoch * n + first, (epoch + 1) * n)
      return pos.map(_plain(lambda p: (p, tf.gather(table, tf.random.experimental.index_shuffle(
          p - epoch * n, _epoch_seed(host_seed, epoch), tf.constant(n - 1, tf.int64))))))

  epochs = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max)
  return epochs.flat_map(_plain(epoch_with_positions)), n


def eval_records(builder, split: str, *, process_index: int, process_count: int):
  """One pass over this host's part of ``split`` in file order; returns ``(dataset, count)``."""
  instructions, n = host_shards(builder, split, process_index, process_count)
  fmt = _file_format(builder)
  if fmt == "array_record":
    reader = _ArrayRecordShards(instructions)
    ds = tf.data.Dataset.range(n).map(_plain(lambda i: tf.py_function(reader, [i], tf.string)),
                                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    files, skips, takes = _instruction_tensors(instructions)
    ds = _read_tfrecord(files, skips, takes, tf.range(len(instructions)), cycle_length=1)
  return ds, n
