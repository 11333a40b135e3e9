"""The paper recipes' samplers: DeiT's RASampler (repeated_aug) and cvnets' variable-batch sampler
(multi_scale), their step tables and their bad-input errors.

Samples are identified by label: the fake ImageNet below has one image per class.
"""
import collections

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mobilevis_jax import data
from mobilevis_jax.data import config as config_lib
from mobilevis_jax.data import fake_archives, pipeline, sources
from tests.data.conftest import data_cfg

NUM_SYNSETS = 300  # + the CMYK and PNG specimen synsets: 302 images, one per class


@pytest.fixture(scope="module")
def unique_in1k(tmp_path_factory):
  """A fake ILSVRC2012 with one (tiny, 40x30) image per class, so a label names its image."""
  manual = str(tmp_path_factory.mktemp("unique_manual"))
  d = str(tmp_path_factory.mktemp("unique_tfds"))
  wnids = tfds.builder("imagenet2012", data_dir=d).info.features["label"].names
  specimens = {fake_archives.CMYK_TRAIN_FILE[0], fake_archives.PNG_TRAIN_FILE[0]}
  synsets = [w for w in wnids if w not in specimens][:NUM_SYNSETS]
  fake_archives.write_ilsvrc2012(manual, synsets=synsets, images_per_class=1, num_val=2,
                                 size=(40, 30))
  sources.prepare("imagenet2012", data_dir=d, manual_dir=manual)
  return d


def _cfg(data_dir, **overrides):
  # Whole-image crops (the images are 4:3), no flip, no normalisation: the copies of an image
  # are pixel-identical, so the layout can be checked; augmentation is switched back on below.
  base = dict(image_size=8, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), hflip=0.0,
              normalization="none", shuffle_buffer=16)
  return data_cfg("imagenet2012", data_dir, **{**base, **overrides})


def _train(cfg, *, batch, devices, seed=0, start_step=0, host=0, hosts=1):
  return data.train_iterator(cfg, global_batch_size=batch, seed=seed, start_step=start_step,
                             process_index=host, process_count=hosts, num_devices=devices)


def _take(it, n):
  return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------- RASampler


def test_repeated_aug_epoch_formula():
  # DeiT: each replica keeps floor(floor(N / 256) * 256 / replicas), the loader drops the rest.
  assert pipeline.repeated_aug_epoch(1_281_167, 2048, 8) == (160_128, 625)   # RepViT
  assert pipeline.repeated_aug_epoch(1_281_167, 1024, 8) == (160_128, 1251)  # MobileViG
  assert pipeline.repeated_aug_epoch(1_281_167, 1024, 16) == (80_064, 1251)
  assert pipeline.repeated_aug_epoch(302, 20, 4) == (64, 12)
  sched = pipeline.train_schedule(config_lib.imagenet_deit_config(), num_examples=1_281_167,
                                  global_batch_size=2048, num_devices=8, seed=0, num_epochs=3)
  assert sched.sampler == "repeated_aug" and sched.epoch_steps.tolist() == [625] * 3
  assert sched.total_steps == 1875 and set(sched.global_batch.tolist()) == {2048}
  assert sched.epoch_of(624) == 0 and sched.epoch_of(625) == 1


def _entries(batches, devices):
  """The labels in repeated-list order: entry j + L*u of a step is device j's slot u."""
  out = []
  for b in batches:
    per_device = b["label"].reshape(devices, -1)  # device j's contiguous slice of the host batch
    out += per_device.T.reshape(-1).tolist()
  return out


def test_repeated_aug_is_deits_rasampler(unique_in1k):
  n, devices, batch, k = 302, 4, 20, 3  # 20 is not a multiple of 3
  kept, steps = pipeline.repeated_aug_epoch(n, batch, devices)
  per_device = batch // devices
  cfg = _cfg(unique_in1k, repeated_aug=k)
  batches = _take(_train(cfg, batch=batch, devices=devices), 2 * steps)
  assert all(b["image"].shape == (batch, 8, 8, 3) for b in batches)
  epochs = []
  for e in range(2):
    epoch = batches[e * steps:(e + 1) * steps]
    entries = _entries(epoch, devices)
    # Each device gets `steps` full batches of its `kept` samples (the loader drops the rest).
    assert len(entries) == devices * steps * per_device and steps * per_device <= kept
    # The repeated list: an order of distinct images, each repeated k times consecutively.
    order = list(dict.fromkeys(entries))
    assert entries == np.repeat(order, k)[:len(entries)].tolist()
    assert set(collections.Counter(entries).values()) == {k} and len(order) == len(entries) // k
    # Round-robin dealing: the k copies of an image sit on k different devices, and are
    # pixel-identical here (no random augmentation).
    where = collections.defaultdict(set)
    for b in epoch:
      for dev in range(devices):
        for u in range(per_device):
          i = dev * per_device + u
          where[int(b["label"][i])].add(dev)
    assert all(len(v) == k for v in where.values())
    first = epoch[0]
    same = first["label"][:, None] == first["label"][None, :]
    img = first["image"].reshape(batch, -1)
    assert np.all((img[:, None] == img[None, :]).all(-1) == same)
    epochs.append(order)
  assert set(epochs[0]) != set(epochs[1])  # a fresh permutation each epoch

  # Deterministic for (seed, epoch); another seed draws another order.
  again = _take(_train(cfg, batch=batch, devices=devices), 2)
  for x, y in zip(again, batches):
    np.testing.assert_array_equal(x["image"], y["image"])
  other = next(_train(cfg, batch=batch, devices=devices, seed=1))
  assert not np.array_equal(other["label"], batches[0]["label"])
  # Resume mid-epoch, and at the last step of an epoch (running into the next): bit-exact.
  for start in (5, steps - 1):
    resumed = _take(_train(cfg, batch=batch, devices=devices, start_step=start), 2)
    for x, y in zip(resumed, batches[start:start + 2]):
      np.testing.assert_array_equal(x["image"], y["image"])
      np.testing.assert_array_equal(x["label"], y["label"])


def test_repeated_aug_copies_get_their_own_augmentation(unique_in1k):
  cfg = _cfg(unique_in1k, repeated_aug=3, scale=(0.08, 1.0), hflip=0.5)
  b = next(_train(cfg, batch=20, devices=4))
  entries = np.array(_entries([b], 4))
  images = b["image"].reshape(4, 5, -1).transpose(1, 0, 2).reshape(20, -1)  # entry order
  a = np.flatnonzero(entries == entries[0])
  assert len(a) >= 2 and not np.array_equal(images[a[0]], images[a[1]])


def test_repeated_aug_two_hosts(unique_in1k):
  # 2 hosts x 2 devices, k = 2: each host deals its own shard over its two devices.
  cfg = _cfg(unique_in1k, repeated_aug=2)
  _, steps = pipeline.repeated_aug_epoch(302, 8, 4)  # 64 kept per device, 32 steps
  seen = []
  for host in range(2):
    batches = _take(_train(cfg, batch=8, devices=4, host=host, hosts=2), steps)
    assert all(b["label"].shape == (4,) for b in batches)
    entries = _entries(batches, 2)
    assert set(collections.Counter(entries).values()) == {2}
    for b in batches:  # the two copies of an image on this host's two devices
      for lab in set(b["label"].tolist()):
        idx = np.flatnonzero(b["label"] == lab)
        assert len(idx) == 1 or len({i // 2 for i in idx}) == len(idx)
    seen.append(set(entries))
  assert not seen[0] & seen[1]  # disjoint shards


# ----------------------------------------------------------------------------- variable batch


def test_variable_batch_table_is_cvnets():
  """cvnets ``_image_batch_pairs`` for ParC-Net (crop 256, 128 per device), per device:

  1 device: 160->327, 192->227, 256/288/320->128; 2 devices: 328, 228, 128 (global 656, 456,
  256); 8 devices: 328, 224, 128 (global 2624, 1792, 1024).
  """
  cfg = config_lib.parc_config()
  assert pipeline.cvnets_scales(256, 160, 320, 5, 32) == tuple(cfg.multi_scale) == \
      (160, 192, 256, 288, 320)
  expected = {1: (327, 227, 128, 128, 128), 2: (328, 228, 128, 128, 128),
              8: (328, 224, 128, 128, 128)}
  for devices, per_device in expected.items():
    table = pipeline.variable_batch_table(cfg, global_batch_size=128 * devices,
                                          num_devices=devices)
    assert table == list(zip((160, 192, 256, 288, 320), per_device))
  # make_divisible is the MobileNet rule: nearest multiple, never more than 10% down.
  assert [pipeline.make_divisible(v, 8) for v in (327, 227, 128, 12, 3)] == [328, 224, 128, 16, 8]
  sched = pipeline.train_schedule(cfg, num_examples=1_281_167, global_batch_size=1024,
                                  num_devices=8, seed=0, num_epochs=4)
  assert set(sched.global_batch.tolist()) == {2624, 1792, 1024}
  assert set(sched.resolution.tolist()) == {160, 192, 256, 288, 320}
  # One pass per epoch: each device consumes ceil(N / 8) samples, the last batch padded.
  share = -(-1_281_167 // 8)
  for e in range(4):
    lo, hi = sched.epoch_starts[e], sched.epoch_starts[e + 1]
    per_device = sched.global_batch[lo:hi] // 8
    assert per_device.sum() >= share > per_device[:-1].sum()
    assert 800 < hi - lo < 920  # about 856 = share / mean(328, 224, 128, 128, 128)
  again = pipeline.train_schedule(cfg, num_examples=1_281_167, global_batch_size=1024,
                                  num_devices=8, seed=0, num_epochs=4)
  np.testing.assert_array_equal(again.resolution, sched.resolution)
  other = pipeline.train_schedule(cfg, num_examples=1_281_167, global_batch_size=1024,
                                  num_devices=8, seed=1, num_epochs=1)
  assert not np.array_equal(other.resolution[:50], sched.resolution[:50])


def test_variable_batch_iterator_follows_the_schedule(unique_in1k):
  n, devices, batch = 302, 2, 16
  cfg = _cfg(unique_in1k, image_size=16, multi_scale=(8, 16, 24))
  # per device: 8 -> make_divisible(max(8, 8 * 256 / 64), 2) = 32, 16 and 24 -> 8
  assert pipeline.variable_batch_table(cfg, global_batch_size=batch, num_devices=devices) == \
      [(8, 32), (16, 8), (24, 8)]
  sched = pipeline.train_schedule(cfg, num_examples=n, global_batch_size=batch,
                                  num_devices=devices, seed=0, num_epochs=2)
  batches = _take(_train(cfg, batch=batch, devices=devices), sched.total_steps)
  for s, b in enumerate(batches):
    r, g = sched.resolution[s], sched.global_batch[s]
    assert b["image"].shape == (g, r, r, 3) and b["label"].shape == (g,)
  for e in range(2):
    labels = np.concatenate([b["label"] for b in
                             batches[sched.epoch_starts[e]:sched.epoch_starts[e + 1]]])
    # One pass: every image once, then the padding repeats the epoch's first images.
    order = list(dict.fromkeys(labels.tolist()))
    assert len(order) == n
    assert labels.tolist() == (order + order)[:len(labels)]
  # Resume mid-epoch and exactly at an epoch boundary: bit-exact.
  for start in (3, int(sched.epoch_starts[1])):
    resumed = _take(_train(cfg, batch=batch, devices=devices, start_step=start), 2)
    for x, y in zip(resumed, batches[start:start + 2]):
      np.testing.assert_array_equal(x["image"], y["image"])
      np.testing.assert_array_equal(x["label"], y["label"])
  # Two hosts (one device each): the same resolution every step, disjoint shards.
  hosts = [_take(_train(cfg, batch=batch, devices=devices, host=h, hosts=2), 6) for h in range(2)]
  for s, (x, y) in enumerate(zip(*hosts)):
    r, g = sched.resolution[s], sched.global_batch[s]
    assert x["image"].shape == y["image"].shape == (g // 2, r, r, 3)
  labels = [set(np.concatenate([b["label"] for b in h]).tolist()) for h in hosts]
  assert not labels[0] & labels[1]


# ----------------------------------------------------------------------------- bad input


def test_bad_batches_and_sampler_configs_raise_with_the_fix(digits_dir):
  cfg = data_cfg("mobilevis_digits", digits_dir)
  with pytest.raises(ValueError, match="smaller than the 8 devices.*at least 8"):
    _train(cfg, batch=4, devices=8)
  with pytest.raises(ValueError, match="not divisible by the 8 devices.*multiple of 8.*16 or 24"):
    _train(cfg, batch=20, devices=8)
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    pipeline.train_schedule(config_lib.parc_config(), num_examples=1000, global_batch_size=100,
                            num_devices=8, seed=0, num_epochs=1)
  with pytest.raises(ValueError, match="num_devices=3 is not divisible by process_count=2"):
    _train(cfg, batch=6, devices=3, hosts=2)
  with pytest.raises(ValueError, match="repeated_aug.*multi_scale.*cannot be combined"):
    _train(data_cfg("mobilevis_digits", digits_dir, repeated_aug=3, multi_scale=(16, 32)),
           batch=8, devices=1)
  # 1437 digits leave 1280 samples per epoch, fewer than one step of 2048.
  with pytest.raises(ValueError, match="repeated_aug.*smaller global_batch_size"):
    _train(data_cfg("mobilevis_digits", digits_dir, repeated_aug=3), batch=2048, devices=1)
