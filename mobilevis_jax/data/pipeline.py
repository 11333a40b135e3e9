"""Train and eval input pipelines: TFDS records -> augmented numpy batches for this host.

``train_iterator`` yields ``{'image': float32 [b, H, W, 3], 'label': int32 [b]}`` forever, where
``b = global_batch_size / process_count`` (``variable_batch``: varying per step, see below). The
host batch is laid out device by device: with ``L = num_devices / process_count`` local devices,
device ``j`` of this host (mesh position ``process_index * L + j``) gets the contiguous slice
``[j * b / L, (j + 1) * b / L)``, which is what ``jax.make_array_from_process_local_data`` does
with a 1-D data mesh whose devices are ordered by process (``jax.devices()`` order).
``eval_iterator`` makes one pass and yields ``{'image', 'label', 'mask'}``; every host yields the
same number of batches, the last ones padded with zeros and ``mask`` 0, so over all hosts each
example counts exactly once.

Samplers (:func:`sampler_name`; :func:`train_schedule` gives the step layout the trainer needs):

* ``stream`` (default): the host's shard, reshuffled each epoch, epochs back to back, cut into
  host batches. The trainer counts ``N // global_batch_size`` steps as an epoch.
* ``repeated_aug`` (``repeated_aug = k > 1``): DeiT's ``RASampler`` (RepViT, MobileViG; see
  ``../shared/reference/training.md``). Per epoch: a seeded permutation, each index repeated k
  times consecutively, dealt round-robin over the replicas, each replica keeping
  ``floor(floor(N / 256) * 256 / D)`` samples (D = devices), batches of
  ``global_batch_size / D`` per replica with the last incomplete one dropped, so an epoch is
  ``kept // (global_batch_size / D)`` steps and sees about N / k distinct images, each k times
  with its own augmentation. Mapping: the replicas are the mesh devices; each host plays
  RASampler for its own L devices on its own shard (the permutation is the host's epoch order,
  see :class:`sources.TrainShard`): step s of an epoch feeds entries ``s*b .. (s+1)*b - 1`` of the
  host's repeated list, entry ``j + L*u`` to device j, slot u, so the k copies of an image go to
  k different devices whenever ``L >= k`` (with one host this is DeiT's layout exactly; DeiT
  also puts copies on one replica only when there are fewer than k). The global batch need not
  be a multiple of k. Padding to a multiple of the replicas is never reached (``L * kept <=
  N / P <= k * shard``). DeiT seeds the permutation with the epoch alone; here with
  ``(seed, epoch)``.
* ``variable_batch`` (``multi_scale`` set): cvnets' variable-batch sampler (ParC-Net). The table
  of :func:`variable_batch_table` (per-device batch per resolution, cvnets' formula); each
  iteration draws one entry uniformly from ``(seed, epoch)`` (so every host draws the same), each
  device consumes that many samples of its ``ceil(N / D)`` share until the share is used up (the
  last batch padded with the epoch's first samples): an epoch is one pass over the data and its
  number of steps varies with the draws. Per host: the shard's epoch order, wrapped around for
  the padding, cut into host batches of ``L * per_device`` images.

Determinism and resumption: the record order is a pure function of ``(seed, process_index,
process_count)`` (see :mod:`mobilevis_jax.data.sources`) and every random augmentation choice is a
stateless op keyed by ``(seed, host, sample position)`` (each repeated copy its own key).
``train_iterator(..., start_step=s)`` therefore yields exactly the batches an uninterrupted run
yields from step ``s`` on (same data files, host count and device count); the cost is skipping,
without decoding, up to one epoch of records. With ``skip_corrupt``, ``repeated_aug`` and
``variable_batch`` drop corrupt records before counting samples (steps stay full, resumption stays
exact); ``stream`` counts raw positions, so a stream resumed after skipped records is shifted by
their number.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mobilevis_jax.data import config as config_lib
from mobilevis_jax.data import sources, transforms
from mobilevis_jax.data.image_check import CorruptImageError
from mobilevis_jax.data.randaugment import _op_dispatcher, parse_randaugment, randaugment

# The channel-rounding rule cvnets also uses for its per-device batch (one home: layers.conv);
# importing it pulls in flax only, never a model.
from mobilevis_jax.layers.conv import make_divisible

log = logging.getLogger(__name__)

_CORRUPT_MARKER = "mobilevis: corrupt JPEG"
# Our dataset functions use explicit tf.cond/switch_case; skipping AutoGraph's source conversion
# cuts graph-building time several-fold (RandAugment has 15 ops per layer).
_plain = tf.autograph.experimental.do_not_convert


def dataset_info(cfg: ml_collections.ConfigDict) -> dict:
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

  def __init__(self) -> None:
    self.count = 0
    self._lock = threading.Lock()

  def __call__(self, name: tf.Tensor) -> bool:
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

  def __init__(self, ds: tf.data.Dataset, counter: _SkipCounter | None = None) -> None:
    self._it = iter(ds.as_numpy_iterator())
    self._counter = counter

  @property
  def skipped_corrupt(self) -> int:
    """Corrupt records skipped so far by the reader. The reader runs ahead of the consumer by the
    prefetch buffer, so this can include records of batches not yet returned."""
    return self._counter.count if self._counter else 0

  def __iter__(self) -> BatchIterator:
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


# ----------------------------------------------------------------------------- train images


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
          interpolation=cfg.interpolation, antialias=bool(cfg.antialias))
    else:
      hw = tf.shape(decoded)[:2]
      top, left, h, w = transforms.random_resized_crop_window(s_crop, hw[0], hw[1], scale, ratio)
      s_interp = transforms.split_seed(s_crop, 2)[1]
      img = transforms.resize(decoded[top:top + h, left:left + w], tf.stack([size, size]),
                              cfg.interpolation, s_interp, bool(cfg.antialias))
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



# ----------------------------------------------------------------------------- samplers

SAMPLERS = ("stream", "repeated_aug", "variable_batch")
# DeiT's RASampler keeps floor(N / 256) * 256 samples per epoch over all replicas.
_RA_ROUND = 256
# Variable-batch group keys carry the host batch in their low bits (see _variable_batch_dataset).
_KEY_BITS = 20


def sampler_name(cfg: ml_collections.ConfigDict) -> str:
  """Which sampler a data config selects: ``variable_batch`` (``multi_scale`` set),
  ``repeated_aug`` (``repeated_aug > 1``) or ``stream`` (plain reshuffled epochs)."""
  if cfg.multi_scale:
    return "variable_batch"
  return "repeated_aug" if int(cfg.repeated_aug) > 1 else "stream"


def cvnets_scales(crop_size: int = 256, min_size: int = 160, max_size: int = 320,
                  num_scales: int = 5, check_scale: int = 32) -> tuple[int, ...]:
  """The square resolutions cvnets' variable-batch sampler trains at (``_image_batch_pairs``).

  ``num_scales`` sizes ``linspace(min_size, max_size)`` plus ``crop_size`` when it is not among
  them, each rounded by :func:`make_divisible` to ``check_scale``, duplicates removed. ParC-Net's
  values (256, 160, 320, 5, 32) give (160, 192, 256, 288, 320).
  """
  dims = list(np.linspace(min_size, max_size, num_scales))
  if crop_size not in dims:
    dims.append(crop_size)
  return tuple(sorted({make_divisible(d, check_scale) for d in dims}))


def check_device_batch(global_batch_size: int, num_devices: int, process_count: int = 1) -> int:
  """Validates the global batch against the data-parallel mesh; returns the per-device batch."""
  if num_devices < 1:
    raise ValueError(f"num_devices={num_devices}; expected at least one device")
  if num_devices % process_count:
    raise ValueError(f"num_devices={num_devices} is not divisible by process_count="
                     f"{process_count}: every host must feed the same number of devices")
  if global_batch_size < num_devices:
    raise ValueError(f"global_batch_size={global_batch_size} is smaller than the {num_devices} "
                     f"devices: every device needs at least one example; use a global batch of at "
                     f"least {num_devices} (a multiple of {num_devices})")
  if global_batch_size % num_devices:
    lo = global_batch_size // num_devices * num_devices
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the {num_devices} "
                     f"devices; use a multiple of {num_devices} (e.g. {lo} or {lo + num_devices})")
  return global_batch_size // num_devices


def variable_batch_table(cfg: ml_collections.ConfigDict, *, global_batch_size: int, num_devices: int
                        ) -> list[tuple[int, int]]:
  """cvnets' ``(resolution, per-device batch)`` pairs for ``cfg.multi_scale``.

  The base per-device batch ``b = global_batch_size / num_devices`` is the batch at
  ``cfg.image_size`` (``s``); at resolution ``r`` each device takes
  ``make_divisible(max(b, int(round(b * s * s / (r * r), 2))), num_devices)`` images (cvnets
  ``_image_batch_pairs``: the divisor is the number of GPUs), so the global batch
  ``num_devices * per_device`` always splits evenly over the mesh. ParC-Net (s=256, b=128):

  ==========  =====================  =====================  =====================
  resolution  1 device               2 devices (global)     8 devices (global)
  ==========  =====================  =====================  =====================
  160         327                    328 (656)              328 (2624)
  192         227                    228 (456)              224 (1792)
  256         128                    128 (256)              128 (1024)
  288         128                    128 (256)              128 (1024)
  320         128                    128 (256)              128 (1024)
  ==========  =====================  =====================  =====================
  """
  base = check_device_batch(global_batch_size, num_devices)
  pixels = int(cfg.image_size) ** 2 * base
  table = []
  for r in sorted({int(r) for r in cfg.multi_scale}):
    per_device = max(base, int(round(pixels / (r * r), 2)))
    table.append((r, make_divisible(per_device, num_devices)))
  return table


def repeated_aug_epoch(num_examples: int, global_batch_size: int,
                       num_devices: int) -> tuple[int, int]:
  """DeiT RASampler's epoch: ``(samples each device keeps, steps)``.

  Each device (replica) keeps ``floor(floor(N / 256) * 256 / num_devices)`` samples; the train
  loader drops the last incomplete batch, so an epoch is ``kept // per_device_batch`` steps.
  """
  per_device = check_device_batch(global_batch_size, num_devices)
  kept = (num_examples // _RA_ROUND * _RA_ROUND) // num_devices
  steps = kept // per_device
  if steps < 1:
    raise ValueError(
        f"repeated_aug: {num_examples} train examples leave each of the {num_devices} devices "
        f"{kept} samples per epoch (DeiT's RASampler keeps floor(N / 256) * 256 / devices), fewer "
        f"than the per-device batch {per_device}; use a smaller global_batch_size or "
        "data.repeated_aug=1")
  return kept, steps


def _variable_batch_epoch(table, *, num_examples: int, num_devices: int, seed: int,
                          epoch: int) -> tuple[np.ndarray, np.ndarray]:
  """(resolution, per-device batch) of each step of one epoch of cvnets' variable-batch sampler.

  Each device's share of an epoch is ``ceil(N / num_devices)`` samples; every iteration draws one
  table entry uniformly (the same on every host: the draw depends only on ``(seed, epoch)``) and
  consumes its batch, until the share is used up (the last batch is padded with the epoch's first
  samples), so an epoch is one pass over the data.
  """
  res = np.array([r for r, _ in table], np.int64)
  bsz = np.array([b for _, b in table], np.int64)
  share = -(-num_examples // num_devices)
  rng = np.random.default_rng([int(seed), 0x5CA1E, int(epoch)])
  pick = rng.integers(0, len(table), size=-(-share // int(bsz.min())))
  steps = int(np.searchsorted(np.cumsum(bsz[pick]), share, side="left")) + 1
  return res[pick[:steps]], bsz[pick[:steps]]


@dataclasses.dataclass(frozen=True)
class TrainSchedule:
  """The step layout of training: what every step feeds and where epochs start.

  Attributes:
    sampler: ``stream``, ``repeated_aug`` or ``variable_batch`` (see :func:`sampler_name`).
    epoch_steps: int64 ``[num_epochs]``, the number of steps of each epoch.
    resolution: int64 ``[total_steps]``, the square input resolution of each step.
    global_batch: int64 ``[total_steps]``, images per step over all devices (always a multiple of
      the device count).
  """
  sampler: str
  epoch_steps: np.ndarray
  resolution: np.ndarray
  global_batch: np.ndarray

  @property
  def total_steps(self) -> int:
    return int(self.epoch_steps.sum())

  @property
  def epoch_starts(self) -> np.ndarray:
    """int64 ``[num_epochs + 1]``: the first step of each epoch, then ``total_steps``."""
    return np.concatenate([[0], np.cumsum(self.epoch_steps)]).astype(np.int64)

  def epoch_of(self, step: int | np.ndarray) -> np.ndarray:
    """The (0-based) epoch that step ``step`` (0-based; scalar or array) belongs to."""
    return np.searchsorted(self.epoch_starts, step, side="right") - 1


def train_schedule(cfg: ml_collections.ConfigDict, *, num_examples: int, global_batch_size: int,
                   num_devices: int, seed: int, num_epochs: int) -> TrainSchedule:
  """The steps :func:`train_iterator` yields for ``num_epochs`` epochs (same arguments).

  ``num_examples`` is the size of ``cfg.train_split`` (``dataset_info``). Only the sampler fields
  of ``cfg`` are read (so the trainer's synthetic source can use it too). Epoch lengths:

  * ``stream``: ``max(N // global_batch_size, 1)`` steps (the stream runs on across epochs).
  * ``repeated_aug``: DeiT's ``floor(floor(N / 256) * 256 / D) // (global_batch_size / D)``
    (:func:`repeated_aug_epoch`); ImageNet-1k, 8 devices, batch 2048: 625 steps.
  * ``variable_batch``: one pass over the data, drawn per epoch from ``(seed, epoch)``
    (ParC-Net on 8 devices: about 856 steps of 2624/1792/1024 images).
  """
  config_lib.validate_sampler_config(cfg)
  check_device_batch(global_batch_size, num_devices)
  kind = sampler_name(cfg)
  if kind == "variable_batch":
    table = variable_batch_table(cfg, global_batch_size=global_batch_size, num_devices=num_devices)
    plans = [_variable_batch_epoch(table, num_examples=num_examples, num_devices=num_devices,
                                   seed=seed, epoch=e) for e in range(int(num_epochs))]
    steps = np.array([len(r) for r, _ in plans], np.int64)
    res = np.concatenate([r for r, _ in plans]) if plans else np.zeros([0], np.int64)
    batch = np.concatenate([b for _, b in plans]) * num_devices if plans else res
    return TrainSchedule(kind, steps, res, batch.astype(np.int64))
  if kind == "repeated_aug":
    per_epoch = repeated_aug_epoch(num_examples, global_batch_size, num_devices)[1]
  else:
    per_epoch = max(num_examples // global_batch_size, 1)
  steps = np.full([int(num_epochs)], per_epoch, np.int64)
  total = int(steps.sum())
  return TrainSchedule(kind, steps, np.full([total], int(cfg.image_size), np.int64),
                       np.full([total], int(global_batch_size), np.int64))


# ----------------------------------------------------------------------------- train


def _host_share(cfg, global_batch_size: int, process_index, process_count):
  """Validate the config; return (process_index, process_count, this host's batch size)."""
  config_lib.validate_data_config(cfg)
  process_index, process_count = sources._process(process_index, process_count)
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                     f"process_count={process_count}")
  return process_index, process_count, global_batch_size // process_count


def _num_devices(num_devices: int | None) -> int:
  if num_devices is None:
    import jax  # the data-parallel mesh spans every device of every process by default
    return jax.device_count()
  return int(num_devices)


def train_iterator(cfg: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                   start_step: int = 0, process_index: int | None = None,
                   process_count: int | None = None,
                   num_devices: int | None = None) -> BatchIterator:
  """Infinite iterator over this host's train batches (see the module docstring).

  Args:
    cfg: the data config.
    global_batch_size: images per step over all devices (``variable_batch``: at
      ``cfg.image_size``; other resolutions scale it, see :func:`variable_batch_table`).
    seed: the run seed; the stream is a pure function of it (and the host layout).
    start_step: the first step to yield (resumption: the batches an uninterrupted run yields
      from this step on).
    process_index / process_count: this host and the number of hosts (default: JAX's).
    num_devices: devices of the data-parallel mesh over all hosts (default
      ``jax.device_count()``); the host feeds ``num_devices / process_count`` of them, each with a
      contiguous slice of the host batch. The samplers deal examples per device.
  """
  process_index, process_count, local_batch = _host_share(cfg, global_batch_size, process_index,
                                                          process_count)
  num_devices = _num_devices(num_devices)
  per_device = check_device_batch(global_batch_size, num_devices, process_count)
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0")
  local_devices = num_devices // process_count
  builder = sources.builder_for(cfg)
  parse = _parse_fn(builder)
  counter = _SkipCounter()
  host_seed = sources.host_seed(seed, process_index)
  shard_kw = dict(seed=seed, process_index=process_index, process_count=process_count,
                  shuffle_buffer=int(cfg.shuffle_buffer), cache=bool(cfg.cache))
  kind = sampler_name(cfg)
  if kind == "stream":
    ds = _stream_dataset(cfg, builder, parse, counter, host_seed, shard_kw,
                         local_batch=local_batch, start_step=start_step)
  else:
    shard = sources.TrainShard(builder, cfg.train_split, **shard_kw)
    num_examples = int(builder.info.splits[cfg.train_split].num_examples)

    def epoch_records(epoch):
      # Corrupt records are dropped (or fail) before the sampler counts them, so every step
      # stays full and positions stay aligned with the schedule.
      ds = shard.epoch(epoch).map(_plain(parse))
      return _guard_corrupt(ds, bool(cfg.skip_corrupt), counter)

    if kind == "repeated_aug":
      ds = _repeated_aug_dataset(cfg, epoch_records, host_seed, num_examples=num_examples,
                                 global_batch_size=global_batch_size, num_devices=num_devices,
                                 local_devices=local_devices, per_device=per_device,
                                 start_step=start_step)
    else:
      ds = _variable_batch_dataset(cfg, epoch_records, host_seed, num_examples=num_examples,
                                   global_batch_size=global_batch_size, num_devices=num_devices,
                                   local_devices=local_devices, seed=seed, start_step=start_step)
  return BatchIterator(_options(ds.prefetch(int(cfg.prefetch))), counter)


def _seed_pair(host_seed: int, pos):
  return tf.stack([tf.constant(host_seed, tf.int64), tf.cast(pos, tf.int64)])


def _epoch_pos(epoch, index):
  # A per-sample key unique over the whole run: epochs hold far fewer than 2**32 samples.
  return tf.cast(epoch, tf.int64) * (1 << 32) + tf.cast(index, tf.int64)


def _stream_dataset(cfg, builder, parse, counter, host_seed, shard_kw, *, local_batch, start_step):
  """Plain sampler: the host's reshuffled epochs back to back, cut into host batches."""
  records, _ = sources.train_records(builder, cfg.train_split, start=start_step * local_batch,
                                     **shard_kw)
  ds = records.map(_plain(lambda pos, rec: (pos, *parse(rec))))
  ds = _guard_corrupt(ds, bool(cfg.skip_corrupt), counter)
  image_fn = _train_image_fn(cfg, local_copies=1)
  size = tf.constant(int(cfg.image_size), tf.int32)

  def example(pos, data, label, name):
    del name
    return {"image": image_fn(_seed_pair(host_seed, pos), data, size)[0], "label": label}

  ds = ds.map(_plain(example), num_parallel_calls=int(cfg.num_parallel_calls), deterministic=True)
  return ds.batch(local_batch, drop_remainder=True)


def _repeated_aug_dataset(cfg, epoch_records, host_seed, *, num_examples, global_batch_size,
                          num_devices, local_devices, per_device, start_step):
  """DeiT's RASampler over this host's devices (see the module docstring for the mapping)."""
  k = int(cfg.repeated_aug)
  _, steps = repeated_aug_epoch(num_examples, global_batch_size, num_devices)
  if local_devices < k <= num_devices:
    log.warning("repeated_aug=%d with %d device(s) per host: each host deals its own images over "
                "its own devices, so copies of an image share a device (DeiT spreads them over "
                "all %d replicas)", k, local_devices, num_devices)
  host_batch = local_devices * per_device
  entries = steps * host_batch                      # samples this host feeds per epoch
  records = -(-entries // k)                        # distinct images they come from
  start_epoch, step_in_epoch = divmod(int(start_step), steps)
  skip_entries = step_in_epoch * host_batch
  image_fn = _train_image_fn(cfg, local_copies=k)
  size = tf.constant(int(cfg.image_size), tf.int32)

  def epoch_ds(epoch):
    first = tf.where(tf.equal(epoch, start_epoch), tf.constant(skip_entries // k, tf.int64), 0)
    # repeat(): only reached when skipped corrupt records leave the shard short of `records`.
    recs = epoch_records(epoch).repeat().take(records)
    idx = tf.data.Dataset.range(records)
    return tf.data.Dataset.zip(idx, recs).skip(first).map(
        _plain(lambda i, rec: (epoch, i, *rec)))

  def example(epoch, i, data, label, name):
    del name
    images = image_fn(_seed_pair(host_seed, _epoch_pos(epoch, i)), data, size)
    return (tf.fill([k], epoch), i * k + tf.range(k, dtype=tf.int64), images,
            tf.fill([k], label))

  def keep(epoch, t, image, label):
    del image, label
    lo = tf.where(tf.equal(epoch, start_epoch), tf.constant(skip_entries, tf.int64), 0)
    return tf.logical_and(t >= lo, t < entries)

  def deal(t, images, labels):
    del t
    # Entries s*B .. (s+1)*B - 1 of the repeated list, entry j + L*u -> device j, slot u.
    shape = tf.shape(images)
    images = tf.reshape(images, tf.concat([[per_device, local_devices], shape[1:]], 0))
    images = tf.reshape(tf.transpose(images, [1, 0, 2, 3, 4]), shape)
    labels = tf.reshape(tf.transpose(tf.reshape(labels, [per_device, local_devices])), [-1])
    return {"image": images, "label": labels}

  epochs = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max)
  ds = epochs.flat_map(_plain(epoch_ds))
  ds = ds.map(_plain(example), num_parallel_calls=int(cfg.num_parallel_calls), deterministic=True)
  ds = ds.unbatch().filter(_plain(keep))
  ds = ds.map(_plain(lambda epoch, t, image, label: (t, image, label)))
  return ds.batch(host_batch, drop_remainder=True).map(_plain(deal))


def _variable_batch_dataset(cfg, epoch_records, host_seed, *, num_examples, global_batch_size,
                            num_devices, local_devices, seed, start_step):
  """cvnets' variable-batch sampler over this host's devices (see the module docstring)."""
  table = variable_batch_table(cfg, global_batch_size=global_batch_size, num_devices=num_devices)
  if max(b for _, b in table) * local_devices >= 1 << _KEY_BITS:
    raise ValueError(f"variable_batch: host batches of {1 << _KEY_BITS} or more are not supported")
  if -(-num_examples // num_devices) // min(b for _, b in table) >= 1 << _KEY_BITS:
    raise ValueError(f"variable_batch: epochs of {1 << _KEY_BITS} or more steps are not supported")

  def plan(epoch):
    return _variable_batch_epoch(table, num_examples=num_examples, num_devices=num_devices,
                                 seed=seed, epoch=epoch)

  # Find the epoch holding start_step, and the samples of it already consumed.
  epoch, first_step = 0, 0
  while True:
    res, bsz = plan(epoch)
    if start_step < first_step + len(res):
      break
    epoch, first_step = epoch + 1, first_step + len(res)
  start_epoch = epoch
  skip_entries = int(bsz[:start_step - first_step].sum()) * local_devices

  def epoch_plan(epoch):
    res, bsz = plan(int(epoch))
    return res.astype(np.int32), bsz * local_devices

  def with_plan(epoch):
    res, host_bsz = tf.numpy_function(epoch_plan, [epoch], (tf.int32, tf.int64), stateful=False)
    return epoch, tf.ensure_shape(res, [None]), tf.ensure_shape(host_bsz, [None])

  image_fn = _train_image_fn(cfg, local_copies=1)

  def epoch_ds(epoch, res, host_bsz):
    ends = tf.cumsum(host_bsz)
    first = tf.where(tf.equal(epoch, start_epoch), tf.constant(skip_entries, tf.int64), 0)
    # Wrapping into a second pass pads the epoch's last batch with its first samples.
    recs = epoch_records(epoch).repeat().take(ends[-1])
    t = tf.data.Dataset.range(ends[-1])

    def tag(t, rec):
      step = tf.searchsorted(ends, t[None], side="right")[0]
      # Consecutive steps must differ in key; the window size rides in the low bits.
      key = ((epoch * (1 << _KEY_BITS) + tf.cast(step, tf.int64)) * (1 << _KEY_BITS)
             + host_bsz[step])
      return (key, _epoch_pos(epoch, t), res[step], *rec)
    return tf.data.Dataset.zip(t, recs).skip(first).map(_plain(tag))

  def example(key, pos, size, data, label, name):
    del name
    return key, image_fn(_seed_pair(host_seed, pos), data, size)[0], label

  epochs = tf.data.Dataset.range(start_epoch, 1 << (63 - 2 * _KEY_BITS)).map(_plain(with_plan))
  ds = epochs.flat_map(_plain(epoch_ds))
  ds = ds.map(_plain(example), num_parallel_calls=int(cfg.num_parallel_calls), deterministic=True)
  mask = (1 << _KEY_BITS) - 1
  ds = ds.group_by_window(
      key_func=_plain(lambda key, image, label: key),
      reduce_func=_plain(lambda key, window: window.batch(1 << _KEY_BITS)),
      window_size_func=_plain(lambda key: tf.bitwise.bitwise_and(key, mask)))
  return ds.map(_plain(lambda key, image, label: {"image": image, "label": label}))


# ----------------------------------------------------------------------------- eval


def _eval_image_fn(cfg: ml_collections.ConfigDict):
  """The eval transform of one JPEG (both input backends): decode, resize the shorter side to
  ``image_size / crop_pct``, centre crop ``image_size``, normalise."""
  size = int(cfg.image_size)

  def image(data):
    img = tf.io.decode_jpeg(data, channels=3)
    img = transforms.resize_shorter_center_crop(img, size, float(cfg.crop_pct),
                                                cfg.eval_interpolation, bool(cfg.antialias))
    return transforms.normalize(tf.reshape(img, [size, size, 3]), cfg.normalization)
  return image


def eval_iterator(cfg: ml_collections.ConfigDict, *, global_batch_size: int,
                  process_index: int | None = None,
                  process_count: int | None = None) -> BatchIterator:
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
  image = _eval_image_fn(cfg)

  def example(data, label, name):
    del name
    return {"image": image(data), "label": label, "mask": tf.constant(1.0)}

  ds = ds.map(_plain(example), num_parallel_calls=int(cfg.num_parallel_calls), deterministic=True)
  pad = tf.data.Dataset.from_tensors({
      "image": tf.zeros([size, size, 3]), "label": tf.constant(0, tf.int32),
      "mask": tf.constant(0.0)}).repeat()
  # Skipped corrupt records shrink the real part; padding tops every host up to num_batches.
  ds = ds.concatenate(pad).take(num_batches * local_batch).batch(local_batch)
  return BatchIterator(_options(ds.prefetch(int(cfg.prefetch))), counter)
