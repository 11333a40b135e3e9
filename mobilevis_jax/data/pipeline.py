"""Train and eval input pipelines: TFDS records -> augmented numpy batches for this host.

``train_iterator`` yields ``{'image': float32 [b, H, W, 3], 'label': int32 [b]}`` forever, where
``b = global_batch_size / process_count`` (scaled per step with ``multi_scale``).
``eval_iterator`` makes one pass and yields ``{'image', 'label', 'mask'}``; every host yields the
same number of batches, the last ones padded with zeros and ``mask`` 0, so over all hosts each
example counts exactly once.

Determinism and resumption: the record stream is a pure function of ``(seed, process_index,
process_count)`` (see :mod:`mobilevis_jax.data.sources`) and every random augmentation choice is a
stateless op keyed by ``(seed, host, position in the stream)``. ``train_iterator(...,
start_step=s)`` therefore yields exactly the batches an uninterrupted run yields from step ``s``
on (same data files and host count); the cost is skipping, without decoding, up to one epoch of
records.

Repeated augmentation (``repeated_aug=k``): each batch holds ``b / k`` distinct images, each k
times with independent augmentations, laid out as k consecutive blocks (copy j of image i at
``j * b / k + i``), so when the batch is split over devices the copies land on different devices,
as DeiT's RASampler sends them to different GPUs. An epoch of the stream (every image k times) is
therefore k dataset-sizes long; DeiT counts an epoch as one dataset-size of samples.

Multi-scale (ParC-Net): each step draws a resolution r from ``multi_scale`` (uniformly, from the
seed and the step) and uses ``floor(b * (image_size / r)**2 / k) * k`` examples (at least k), so
pixels per batch stay roughly constant.
"""
from __future__ import annotations

import logging
import math
import threading

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mobilevis_jax.data import config as config_lib
from mobilevis_jax.data import sources, transforms
from mobilevis_jax.data.image_check import CorruptImageError
from mobilevis_jax.data.randaugment import _op_dispatcher, parse_randaugment, randaugment

log = logging.getLogger(__name__)

_CORRUPT_MARKER = "mobilevis: corrupt JPEG"
# Our dataset functions use explicit tf.cond/switch_case; skipping AutoGraph's source conversion
# cuts graph-building time several-fold (RandAugment has 15 ops per layer).
_plain = tf.autograph.experimental.do_not_convert
_MULTISCALE_TABLE_STEPS = 1_000_000


def dataset_info(cfg) -> dict:
  """``{'num_classes': K, 'splits': {name: count}}`` (prepares the embedded dataset if needed)."""
  config_lib.validate_data_config(cfg)
  return sources.dataset_info(cfg)


# ----------------------------------------------------------------------------- helpers


def _parse_fn(builder):
  features = builder.info.features
  has_name = "file_name" in features

  def parse(serialized):
    ex = features.deserialize_example(serialized, decoders={"image": tfds.decode.SkipDecoding()})
    name = ex["file_name"] if has_name else tf.constant("<unnamed>")
    return ex["image"], tf.cast(ex["label"], tf.int32), name
  return parse


def _is_jpeg_ok(data):
  starts = tf.equal(tf.strings.substr(data, 0, 2), b"\xff\xd8")
  return tf.logical_and(starts, transforms.jpeg_is_complete(data))


class _SkipCounter:
  """Counts (and logs) records dropped as corrupt when ``skip_corrupt`` is on."""

  def __init__(self):
    self.count = 0
    self._lock = threading.Lock()

  def __call__(self, name):
    with self._lock:
      self.count += 1
      log.warning("skipping corrupt JPEG %s (%d skipped so far)", name.numpy().decode(), self.count)
    return False


def _guard_corrupt(ds, skip_corrupt: bool, counter: _SkipCounter):
  """Drops (counting) or fails on corrupt JPEGs; elements are (..., image_bytes, label, name)."""
  if skip_corrupt:
    def keep(*elem):
      data, name = elem[-3], elem[-1]
      return tf.cond(_is_jpeg_ok(data), lambda: tf.constant(True),
                     lambda: tf.py_function(counter, [name], tf.bool))
    return ds.filter(_plain(keep))

  def check(*elem):
    data, name = elem[-3], elem[-1]
    assertion = tf.debugging.Assert(_is_jpeg_ok(data), [_CORRUPT_MARKER, name])
    with tf.control_dependencies([assertion]):
      return tuple(tf.identity(e) for e in elem)
  return ds.map(_plain(check))


class BatchIterator:
  """Wraps a tf.data iterator: numpy dicts out, corrupt-record errors as CorruptImageError."""

  def __init__(self, ds: tf.data.Dataset, counter: _SkipCounter | None = None):
    self._it = iter(ds.as_numpy_iterator())
    self._counter = counter

  @property
  def skipped_corrupt(self) -> int:
    """Corrupt records skipped so far by the reader. The reader runs ahead of the consumer by the
    prefetch buffer, so this can include records of batches not yet returned."""
    return self._counter.count if self._counter else 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    try:
      return next(self._it)
    except tf.errors.InvalidArgumentError as e:
      msg = str(e.message if hasattr(e, "message") else e)
      if _CORRUPT_MARKER in msg:
        detail = msg[msg.index(_CORRUPT_MARKER):].split("\n")[0]
        raise CorruptImageError(
            f"{detail} (truncated or not a JPEG; set data.skip_corrupt=True to skip and count "
            "such files)") from None
      raise


def _options(ds: tf.data.Dataset, threads: int | None = None) -> tf.data.Dataset:
  opts = tf.data.Options()
  opts.deterministic = True
  opts.experimental_optimization.map_parallelization = True
  if threads:
    opts.threading.private_threadpool_size = threads
  return ds.with_options(opts)


# ----------------------------------------------------------------------------- train


def _train_image_fn(cfg, *, local_copies: int):
  """(seed, jpeg, res) -> float32 [k, res, res, 3] normalised train images."""
  ra_spec = parse_randaugment(cfg.randaugment) if cfg.randaugment else None
  ra_dispatch = _op_dispatcher(ra_spec.ops) if ra_spec else None
  scale, ratio = tuple(cfg.scale), tuple(cfg.ratio)

  def one(seed, data, size, decoded=None):
    s_crop, s_flip, s_color, s_erase = transforms.split_seed(seed, 4)
    if decoded is None:
      img = transforms.decode_random_resized_crop(
          data, s_crop, tf.stack([size, size]), scale=scale, ratio=ratio,
          interpolation=cfg.interpolation)
    else:
      hw = tf.shape(decoded)[:2]
      top, left, h, w = transforms.random_resized_crop_window(s_crop, hw[0], hw[1], scale, ratio)
      s_interp = transforms.split_seed(s_crop, 2)[1]
      img = transforms.resize(decoded[top:top + h, left:left + w], tf.stack([size, size]),
                              cfg.interpolation, s_interp)
      img = tf.clip_by_value(img, 0.0, 255.0)
    if cfg.hflip > 0:
      img = transforms.random_flip(img, s_flip, cfg.hflip)
    if ra_spec is not None:
      img = randaugment(img, s_color, ra_spec, ra_dispatch)
    elif cfg.color_jitter > 0:
      img = transforms.color_jitter(img, s_color, float(cfg.color_jitter))
    img = transforms.normalize(img, cfg.normalization)
    if cfg.random_erasing > 0:
      img = transforms.random_erasing(img, s_erase, float(cfg.random_erasing))
    return img

  def fn(seed, data, size):
    if local_copies == 1:
      return one(seed, data, size)[None]
    decoded = tf.io.decode_jpeg(data, channels=3)  # decode once, crop k times
    seeds = transforms.split_seed(seed, local_copies)
    return tf.stack([one(s, data, size, decoded) for s in seeds])
  return fn


def multiscale_schedule(cfg, *, local_batch: int, seed: int, num_steps: int):
  """(resolution per step, examples per step) for steps ``0 .. num_steps - 1`` (numpy int64)."""
  k = int(cfg.repeated_aug)
  res = np.asarray(cfg.multi_scale, np.int64)
  pick = np.random.default_rng([int(seed), 0x5CA1E]).integers(0, len(res), size=num_steps)
  per_res = np.maximum(
      k, (np.floor(local_batch * (cfg.image_size / res.astype(np.float64)) ** 2 / k) * k)
  ).astype(np.int64)
  return res[pick], per_res[pick]


def _host_share(cfg, global_batch_size: int, process_index, process_count):
  """Validate the config; return (process_index, process_count, this host's batch size)."""
  config_lib.validate_data_config(cfg)
  process_index, process_count = sources._process(process_index, process_count)
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                     f"process_count={process_count}")
  return process_index, process_count, global_batch_size // process_count


def train_iterator(cfg, *, global_batch_size: int, seed: int, start_step: int = 0,
                   process_index: int | None = None, process_count: int | None = None):
  """Infinite iterator over this host's train batches (see the module docstring)."""
  process_index, process_count, local_batch = _host_share(cfg, global_batch_size, process_index,
                                                          process_count)
  k = int(cfg.repeated_aug)
  if local_batch % k:
    raise ValueError(f"per-host batch {local_batch} is not divisible by repeated_aug={k}")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0")

  builder = sources.builder_for(cfg)
  multi = bool(cfg.multi_scale)
  if multi:
    res_table, count_table = multiscale_schedule(
        cfg, local_batch=local_batch, seed=seed, num_steps=start_step + _MULTISCALE_TABLE_STEPS)
    unique = count_table // k
    ends = np.cumsum(unique)
    start_pos = int(ends[start_step - 1]) if start_step else 0
    # Only the steps from start_step on are needed in the graph; positions relative to start_pos.
    ends_t = tf.constant(ends[start_step:] - start_pos)
    res_t = tf.constant(res_table[start_step:].astype(np.int32))
    unique_t = tf.constant(unique[start_step:])
  else:
    start_pos = start_step * (local_batch // k)

  records, _ = sources.train_records(
      builder, cfg.train_split, seed=seed, process_index=process_index,
      process_count=process_count, start=start_pos, shuffle_buffer=int(cfg.shuffle_buffer),
      cache=bool(cfg.cache))
  parse = _parse_fn(builder)
  ds = records.map(_plain(lambda pos, rec: (pos, *parse(rec))))
  counter = _SkipCounter()
  ds = _guard_corrupt(ds, bool(cfg.skip_corrupt), counter)
  image_fn = _train_image_fn(cfg, local_copies=k)
  host_seed = int(seed) * 1_000_003 + process_index

  def example(pos, data, label, name):
    del name
    seed_pair = tf.stack([tf.constant(host_seed, tf.int64), pos])
    if multi:
      step = tf.searchsorted(ends_t, pos[None] - start_pos, side="right")[0]
      size = res_t[step]
    else:
      step = tf.constant(0, tf.int64)
      size = tf.constant(int(cfg.image_size), tf.int32)
    images = image_fn(seed_pair, data, size)
    return tf.cast(step, tf.int64), images, tf.fill([k], label)

  ds = ds.map(_plain(example), num_parallel_calls=int(cfg.num_parallel_calls), deterministic=True)

  def to_batch(images, labels):
    # [u, k, H, W, 3] -> k blocks of u images: copy j of image i at j * u + i.
    images = tf.transpose(images, [1, 0, 2, 3, 4])
    shape = tf.shape(images)
    images = tf.reshape(images, tf.concat([[shape[0] * shape[1]], shape[2:]], 0))
    return {"image": images, "label": tf.reshape(tf.transpose(labels), [-1])}

  if multi:
    ds = ds.group_by_window(
        key_func=_plain(lambda step, images, labels: step),
        reduce_func=_plain(lambda key, window: window.batch(int(unique.max()))),
        window_size_func=_plain(lambda key: unique_t[key]))
    ds = ds.map(_plain(lambda step, images, labels: to_batch(images, labels)))
  else:
    ds = ds.map(_plain(lambda step, images, labels: (images, labels)))
    ds = ds.batch(local_batch // k, drop_remainder=True)
    ds = ds.map(_plain(to_batch))
  ds = _options(ds.prefetch(int(cfg.prefetch)))
  return BatchIterator(ds, counter)


# ----------------------------------------------------------------------------- eval


def eval_iterator(cfg, *, global_batch_size: int, process_index: int | None = None,
                  process_count: int | None = None):
  """One pass over ``cfg.eval_split``: ``{'image', 'label', 'mask'}`` batches (padded)."""
  process_index, process_count, local_batch = _host_share(cfg, global_batch_size, process_index,
                                                          process_count)
  builder = sources.builder_for(cfg)
  records, n_host = sources.eval_records(builder, cfg.eval_split, process_index=process_index,
                                         process_count=process_count)
  total = builder.info.splits[cfg.eval_split].num_examples
  # Every host runs the same number of batches (the largest host share decides).
  num_batches = math.ceil(math.ceil(total / process_count) / local_batch)
  parse = _parse_fn(builder)
  counter = _SkipCounter()
  ds = _guard_corrupt(records.map(_plain(parse)), bool(cfg.skip_corrupt), counter)
  size = int(cfg.image_size)

  def example(data, label, name):
    del name
    img = tf.io.decode_jpeg(data, channels=3)
    img = transforms.resize_shorter_center_crop(img, size, float(cfg.crop_pct),
                                                cfg.eval_interpolation)
    img = transforms.normalize(tf.reshape(img, [size, size, 3]), cfg.normalization)
    return {"image": img, "label": label, "mask": tf.constant(1.0)}

  ds = ds.map(_plain(example), num_parallel_calls=int(cfg.num_parallel_calls), deterministic=True)
  pad = tf.data.Dataset.from_tensors({
      "image": tf.zeros([size, size, 3]), "label": tf.constant(0, tf.int32),
      "mask": tf.constant(0.0)}).repeat()
  # Skipped corrupt records shrink the real part; padding tops every host up to num_batches.
  ds = ds.concatenate(pad).take(num_batches * local_batch).batch(local_batch)
  return BatchIterator(_options(ds.prefetch(int(cfg.prefetch))), counter)
