"""Train/eval pipelines: determinism, resumption, sharding, multi-scale, corrupt records (the
repeated-augmentation and variable-batch samplers in detail: test_samplers.py)."""
import hashlib

import numpy as np
import pytest

from mobilevis_jax import data
from mobilevis_jax.data import fake_archives, sources
from tests.data.conftest import data_cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def _train(cfg, batch=8, seed=0, **kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  kw.setdefault("num_devices", kw["process_count"])
  return data.train_iterator(cfg, global_batch_size=batch, seed=seed, **kw)


def test_digits_batches_deterministic_and_resumable(digits_dir):
  cfg = data_cfg("mobilevis_digits", digits_dir, randaugment="rand-m9-mstd0.5-inc1",
                 random_erasing=0.25, shuffle_buffer=64)
  a = _take(_train(cfg), 4)
  assert a[0]["image"].shape == (8, 32, 32, 3) and a[0]["image"].dtype == np.float32
  assert a[0]["label"].dtype == np.int32 and set(a[0]["label"]) <= set(range(10))
  other = next(_train(cfg, seed=1))
  assert not np.array_equal(other["image"], a[0]["image"])
  # A new iterator restarted at step 3 yields the uninterrupted stream's batch, bit for bit
  # (so the stream is also deterministic across iterators).
  resumed = next(_train(cfg, start_step=3))
  np.testing.assert_array_equal(resumed["image"], a[3]["image"])
  np.testing.assert_array_equal(resumed["label"], a[3]["label"])


def test_resume_across_an_epoch_boundary(digits_dir):
  # 1437 train images, batch 200: step 7 starts in epoch 0 and ends in epoch 1.
  cfg = data_cfg("mobilevis_digits", digits_dir, shuffle_buffer=32)
  full = _take(_train(cfg, batch=200), 9)
  resumed = _take(_train(cfg, batch=200, start_step=7), 2)
  for x, y in zip(full[7:], resumed):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_train_hosts_read_disjoint_shards(digits_dir):
  cfg = data_cfg("mobilevis_digits", digits_dir, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0,
                 normalization="none")
  # One epoch per host: 1437 -> 719 + 718 images; batch 2 * 100 per step, 7 steps < 1 epoch.
  seen = []
  for host in range(2):
    it = _train(cfg, batch=200, process_index=host, process_count=2)
    seen.append({hashlib.md5(img.tobytes()).hexdigest() for b in _take(it, 7) for img in b["image"]})
  assert len(seen[0]) > 600 and len(seen[1]) > 600
  # Identical digit bitmaps exist in the data set; host overlap must stay at that level.
  assert len(seen[0] & seen[1]) < 10


def test_eval_two_hosts_cover_every_example_once(digits_dir):
  cfg = data_cfg("mobilevis_digits", digits_dir)
  def images(host, count):
    out, nb = [], 0
    for b in data.eval_iterator(cfg, global_batch_size=64, process_index=host, process_count=count):
      nb += 1
      assert b["image"].shape == (64 // count, 32, 32, 3)
      out += [hashlib.md5(i.tobytes()).hexdigest() + str(l)
              for i, l, m in zip(b["image"], b["label"], b["mask"]) if m == 1.0]
      assert np.all(b["image"][b["mask"] == 0] == 0)
    return out, nb
  single, _ = images(0, 1)
  (h0, n0), (h1, n1) = images(0, 2), images(1, 2)
  assert len(single) == 360 and n0 == n1  # same number of eval steps on every host
  assert sorted(h0 + h1) == sorted(single)


def test_multi_scale_constant_pixels_and_resume(digits_dir):
  cfg = data_cfg("mobilevis_digits", digits_dir, multi_scale=(16, 24, 32, 40), shuffle_buffer=16)
  a = _take(_train(cfg, batch=32), 8)
  sizes = {b["image"].shape[1] for b in a}
  assert len(sizes) > 1 and sizes <= {16, 24, 32, 40}
  for b in a:
    bs, r = b["image"].shape[0], b["image"].shape[1]
    assert b["image"].shape[2] == r and b["label"].shape == (bs,)
    # cvnets: about constant pixels below the base resolution, never fewer than the base batch.
    assert bs == max(32, int(round(32 * (32 / r) ** 2, 2)))
  resumed = _take(_train(cfg, batch=32, start_step=5), 3)
  for x, y in zip(a[5:], resumed):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_parc_bgr_normalisation(digits_dir):
  rgb = next(data.eval_iterator(data_cfg("mobilevis_digits", digits_dir, normalization="none"),
                                global_batch_size=8, process_index=0, process_count=1))
  bgr = next(data.eval_iterator(data_cfg("mobilevis_digits", digits_dir,
                                         normalization="parc_bgr"),
                                global_batch_size=8, process_index=0, process_count=1))
  np.testing.assert_allclose(bgr["image"], rgb["image"][..., ::-1])
  assert 0.0 <= rgb["image"].min() and rgb["image"].max() <= 1.0


def test_truncated_jpeg_in_records_error_or_counted_skip(tmp_path):
  manual = str(tmp_path / "manual")
  fake_archives.write_ilsvrc2012(manual, images_per_class=2, num_val=2,
                                 corrupt_train_file="n01440764_2.JPEG")
  d = str(tmp_path / "tfds")
  sources.prepare("imagenet2012", data_dir=d, manual_dir=manual)  # TFDS stores bytes as they are
  cfg = data_cfg("imagenet2012", d, image_size=16)
  with pytest.raises(data.CorruptImageError, match="n01440764_2.JPEG"):
    _take(_train(cfg, batch=2), 3)  # 6 images: one epoch
  cfg.skip_corrupt = True
  it = _train(cfg, batch=2)
  labels = np.concatenate([b["label"] for b in _take(it, 5)])  # 2 epochs of 5 good images
  # Both consumed epochs skipped the bad record; prefetch may already have read into a third.
  assert labels.shape == (10,) and 2 <= it.skipped_corrupt <= 3


def test_bad_configs_raise_naming_the_field(digits_dir):
  cfg = data_cfg("mobilevis_digits", digits_dir, normalization="bgr")
  with pytest.raises(ValueError, match="normalization"):
    _train(cfg)
  cfg = data_cfg("mobilevis_digits", digits_dir, repeated_aug=3)
  with pytest.raises(ValueError, match="repeated_aug"):
    _train(cfg, batch=2048)  # 1437 images: DeiT's RASampler keeps 1280 per epoch, < one step
  with pytest.raises(ValueError, match="randaugment"):
    _train(data_cfg("mobilevis_digits", digits_dir, randaugment="rand-x1"))
  with pytest.raises(ValueError, match="process_count"):
    _train(data_cfg("mobilevis_digits", digits_dir), batch=9, process_count=2, process_index=0)
  with pytest.raises(FileNotFoundError, match="mobilevis data prepare imagenet2012"):
    _train(data_cfg("imagenet2012", digits_dir))
