"""From a dataset name to this host's stream of serialized records.

* :func:`get_builder` / :func:`prepare` / :func:`dataset_info`: TFDS builders by our config names
  (``imagenet2012`` is TFDS's own builder; ``imagenet22k`` and ``mobilevis_digits`` are ours).
  ``mobilevis_digits`` is prepared automatically on first use; the ImageNets must be prepared with
  ``mobilevis data prepare`` (their sources are manual downloads).
* :func:`host_shards`: the part of a split this host reads. ``tfds.even_splits`` cuts the split
  into ``process_count`` contiguous, disjoint parts whose sizes differ by at most one, so the hosts
  together read every example exactly once.
* :class:`TrainShard` (one pass per epoch, reshuffled each epoch), :func:`train_records` (the
  infinite, resumable stream of its epochs) and :func:`eval_records` (one pass, file order):
  ``tf.data`` datasets of serialized examples (``train_records``: ``(position, serialized)``).

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
from collections.abc import Sequence
from typing import TYPE_CHECKING

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mobilevis_jax.data import config as config_lib

if TYPE_CHECKING:  # the beam extra is optional
  from apache_beam.options.pipeline_options import PipelineOptions

log = logging.getLogger(__name__)
Builder = tfds.core.DatasetBuilder  # (for the annotations)
_plain = tf.autograph.experimental.do_not_convert  # our dataset functions need no AutoGraph

# Datasets whose source ships with a declared dependency and can be prepared without asking.
_AUTO_PREPARE = ("mobilevis_digits",)


def host_seed(seed: int, process_index: int) -> int:
  """The seed of one host's stream: hosts must shuffle and augment differently, so the host is
  folded into the run's seed (the grain backend, whose layout is global, uses host 0's)."""
  return int(seed) * 1_000_003 + process_index


def _data_dir(cfg_or_dir) -> str:
  d = cfg_or_dir if isinstance(cfg_or_dir, str) else cfg_or_dir.data_dir
  return os.path.expanduser(d) if d else config_lib.default_data_dir()


def builder_name(name: str, builder_config: str = "") -> str:
  if name not in config_lib.DATASETS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {config_lib.DATASETS}")
  return f"{name}/{builder_config}" if builder_config else name


def get_builder(name: str, *, data_dir: str = "", builder_config: str = "",
                file_format: str | None = None, skip_corrupt: bool = False) -> Builder:
  """The TFDS builder of one of our dataset names (not prepared by this call)."""
  from mobilevis_jax.data import digits_builder, imagenet22k_builder  # noqa: F401 (registers them)
  kwargs = {"data_dir": _data_dir(data_dir)}
  if file_format:
    kwargs["file_format"] = file_format
  if name == "imagenet22k":
    kwargs["skip_corrupt"] = skip_corrupt
  return tfds.builder(builder_name(name, builder_config), **kwargs)


def beam_pipeline_options(runner: str, num_workers: int = 0,
                          options: Sequence[str] = ()) -> PipelineOptions:
  """Beam ``PipelineOptions`` from command-line style ``options`` (``'--project=p'``, ...).

  ``num_workers`` > 0 with the ``DirectRunner``: that many local worker processes
  (``direct_running_mode=multi_processing``); with another runner use its own option
  (``--max_num_workers`` on Dataflow, ``--parallelism`` on Flink, ...).
  """
  from apache_beam.options.pipeline_options import PipelineOptions
  flags = list(options)
  if num_workers:
    if runner != "DirectRunner":
      raise ValueError(f"num_workers sets DirectRunner's local processes; for {runner} pass the "
                       "runner's own worker option in the Beam options")
    flags += ["--direct_running_mode=multi_processing", f"--direct_num_workers={num_workers}"]
  return PipelineOptions(flags)


def prepare(name: str, *, data_dir: str = "", manual_dir: str = "", builder_config: str = "",
            file_format: str = "tfrecord", skip_corrupt: bool = False, beam_runner: str = "",
            num_workers: int = 0, beam_options: Sequence[str] = ()) -> Builder:
  """Runs the TFDS builder (``download_and_prepare``) with ``manual_dir``; returns the builder.

  ``beam_runner`` (``imagenet22k`` only, the ``beam`` extra): prepare on Apache Beam with that
  runner (``DirectRunner``, ``DataflowRunner``, ``FlinkRunner``, ``SparkRunner``), ``num_workers``
  local processes (DirectRunner) and further ``beam_options`` (see :func:`beam_pipeline_options`).
  """
  beam = {}
  if beam_runner or num_workers or beam_options:
    if name != "imagenet22k":
      raise ValueError(f"{name} is prepared in one process; only imagenet22k prepares on Beam")
    if not beam_runner:
      raise ValueError("num_workers / beam_options need a beam_runner (e.g. DirectRunner)")
    beam = {"beam_runner": beam_runner,
            "beam_options": beam_pipeline_options(beam_runner, num_workers, beam_options)}
  builder = get_builder(name, data_dir=data_dir, builder_config=builder_config,
                        file_format=file_format, skip_corrupt=skip_corrupt)
  dl_config = tfds.download.DownloadConfig(manual_dir=os.path.expanduser(manual_dir) or None,
                                           **beam)
  builder.download_and_prepare(download_config=dl_config)
  return builder


def builder_for(cfg: ml_collections.ConfigDict) -> Builder:
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


def dataset_info(cfg: ml_collections.ConfigDict) -> dict:
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


def host_shards(builder: Builder, split: str, process_index: int,
                process_count: int) -> tuple[list, int]:
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

  def __init__(self, instructions: list) -> None:
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


class TrainShard:
  """This host's part of a train split, read one pass per epoch in an order drawn from
  ``(seed, process_index, epoch)``.

  ``epoch(e)`` is a ``tf.data`` dataset of the shard's ``num_examples`` serialized records, each
  exactly once: ArrayRecord builds and ``cache`` use an exact per-epoch permutation
  (``index_shuffle``); TFRecord builds read the shard files in a per-epoch order, interleaved,
  through a shuffle buffer seeded by the epoch. Iterating ``epoch(e)`` twice yields the same
  order, which the samplers rely on when they wrap around an epoch (padding) or resume inside one.
  """

  def __init__(self, builder: Builder, split: str, *, seed: int, process_index: int,
               process_count: int, shuffle_buffer: int = 10_000,
               cache: bool = False) -> None:
    instructions, n = host_shards(builder, split, process_index, process_count)
    self.num_examples = n
    # Hosts must shuffle differently: fold the host into the seed.
    self._host_seed = host_seed(seed, process_index)
    self._fmt = _file_format(builder)
    if self._fmt not in ("array_record", "tfrecord"):
      raise ValueError(f"{builder.name}: unsupported file format {self._fmt!r}")
    self._files, self._skips, self._takes = _instruction_tensors(instructions)
    self._num_files = len(instructions)
    self._shuffle_buffer = int(shuffle_buffer)
    self._reader = _ArrayRecordShards(instructions) if self._fmt == "array_record" else None
    self._table = None
    if cache:
      # Small datasets: keep the raw records of the shard in memory, shuffle indices instead.
      raw = (list(_read_tfrecord(self._files, self._skips, self._takes, tf.range(self._num_files),
                                 1).as_numpy_iterator())
             if self._fmt == "tfrecord" else [self._reader(i) for i in range(n)])
      self._table = tf.constant(raw)

  def _permuted(self, epoch) -> tf.data.Dataset:
    seed, last = _epoch_seed(self._host_seed, epoch), tf.constant(self.num_examples - 1, tf.int64)
    return tf.data.Dataset.range(self.num_examples).map(_plain(
        lambda i: tf.random.experimental.index_shuffle(i, seed, last)))

  def epoch(self, epoch: int | tf.Tensor) -> tf.data.Dataset:
    """One pass over the shard (serialized records) in epoch ``epoch``'s order."""
    if self._table is not None:
      table = self._table
      return self._permuted(epoch).map(_plain(lambda i: tf.gather(table, i)))
    if self._fmt == "array_record":
      # A full per-epoch permutation: random access makes a global shuffle free.
      reader = self._reader
      return self._permuted(epoch).map(_plain(lambda i: tf.py_function(reader, [i], tf.string)),
                                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    order = tf.random.experimental.stateless_shuffle(tf.range(self._num_files),
                                                     seed=_epoch_seed(self._host_seed, epoch))
    ds = _read_tfrecord(self._files, self._skips, self._takes, order,
                        cycle_length=min(16, self._num_files))
    if self._shuffle_buffer > 1:
      # reshuffle_each_iteration=False: a second pass over this epoch repeats its order.
      ds = ds.shuffle(self._shuffle_buffer, seed=tf.random.stateless_uniform(
          [], _epoch_seed(self._host_seed, epoch), minval=None, maxval=None, dtype=tf.int64),
          reshuffle_each_iteration=False)
    return ds


def train_records(builder: Builder, split: str, *, seed: int, process_index: int,
                  process_count: int, start: int = 0, shuffle_buffer: int = 10_000,
                  cache: bool = False) -> tuple[tf.data.Dataset, int]:
  """Infinite ``(position, serialized)`` stream of this host, starting at stream position ``start``.

  Epoch ``e`` is :meth:`TrainShard.epoch` ``(e)``, at positions ``e * n .. (e + 1) * n - 1``.
  Returns ``(dataset, examples_per_epoch)``.
  """
  shard = TrainShard(builder, split, seed=seed, process_index=process_index,
                     process_count=process_count, shuffle_buffer=shuffle_buffer, cache=cache)
  n = shard.num_examples
  start_epoch, offset = divmod(int(start), n)

  def epoch_with_positions(epoch):
    first = tf.where(tf.equal(epoch, start_epoch), tf.constant(offset, tf.int64), 0)
    recs = shard.epoch(epoch).skip(first)
    pos = tf.data.Dataset.range(epoch * n + first, (epoch + 1) * n)
    return tf.data.Dataset.zip(pos, recs)

  epochs = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max)
  return epochs.flat_map(_plain(epoch_with_positions)), n


def eval_records(builder: Builder, split: str, *, process_index: int,
                 process_count: int) -> tuple[tf.data.Dataset, int]:
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
