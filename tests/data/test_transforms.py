"""Per-image transforms against torchvision/PIL semantics and their defining statistics."""
import math

import numpy as np
import pytest
from PIL import Image

from mobilevis_jax.data import transforms  # first: it orders the native-library loads
from mobilevis_jax.data.fake_archives import encode, random_image, truncated

tf = pytest.importorskip("tensorflow")


def _seed(i):
  return tf.constant([7, i], tf.int64)


def test_random_erasing_changes_the_expected_fraction():
  img = tf.zeros([24, 24, 3])
  n = 600
  erase = tf.function(lambda s: transforms.random_erasing(img, s, 0.25))
  changed = np.array([bool(np.any(erase(_seed(i)).numpy() != 0)) for i in range(n)])
  # Binomial(600, 0.25): sd = 0.0177; accept +-4 sd.
  assert abs(changed.mean() - 0.25) < 0.071, changed.mean()


def test_random_erasing_box_size_and_fill():
  img = tf.zeros([40, 40, 3])
  areas = []
  erase = tf.function(lambda s: transforms.random_erasing(img, s, 1.0))
  for i in range(200):
    out = erase(_seed(i)).numpy()
    box = np.any(out != 0, axis=-1)
    if box.any():
      rows, cols = np.where(box)
      h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
      assert box.sum() == h * w  # one solid rectangle
      areas.append(h * w / 1600)
      assert abs(out[box].std() - 1.0) < 0.35  # per-pixel standard-normal fill
  assert len(areas) == 200  # with p=1 a 40x40 image always gets a box
  assert 0.02 * 0.8 <= min(areas) and max(areas) <= 1 / 3 * 1.2


def test_random_resized_crop_window_statistics():
  torchvision = pytest.importorskip("torchvision")
  import torch
  areas, ratios = [], []
  window = tf.function(lambda s: transforms.random_resized_crop_window(s, 375, 500))
  for i in range(400):
    t, l, h, w = [int(v) for v in window(_seed(i))]
    assert 0 <= t and t + h <= 375 and 0 <= l and l + w <= 500
    areas.append(h * w / (375 * 500))
    ratios.append(w / h)
  assert min(areas) >= 0.08 * 0.9 and max(areas) <= 1.0
  assert min(ratios) >= 0.75 * 0.95 and max(ratios) <= 4 / 3 * 1.05
  # Same sampling as torchvision (rejections included): compare the mean kept area.
  torch.manual_seed(0)
  img = torch.zeros(3, 375, 500)
  ref = [np.prod(torchvision.transforms.RandomResizedCrop.get_params(
      img, (0.08, 1.0), (3 / 4, 4 / 3))[2:]) / (375 * 500) for _ in range(3000)]
  # sd of the mean of 400 areas is about 0.014.
  assert abs(np.mean(areas) - np.mean(ref)) < 0.05, (np.mean(areas), np.mean(ref))


def test_rrc_fallback_is_the_torchvision_centre_crop():
  # A 10:1 strip admits no crop with ratio in [3/4, 4/3] covering >= 8% ... only via fallback
  # when every try fails; with scale=(1, 1) every try fails and torchvision centre-crops at 4/3.
  t, l, h, w = [int(v) for v in transforms.random_resized_crop_window(
      _seed(0), 30, 300, scale=(1.0, 1.0))]
  assert (h, w) == (30, 40) and t == 0 and l == (300 - 40) // 2


def test_eval_transform_matches_pil_resize_and_centre_crop():
  img = random_image(np.random.default_rng(0), 500, 375)
  size, crop_pct = 224, 0.875
  scale = math.floor(size / crop_pct)  # 256
  ref = img.resize((int(scale * 500 / 375), scale), Image.BICUBIC)
  left = int(round((ref.width - size) / 2.0))
  top = int(round((ref.height - size) / 2.0))
  ref = np.asarray(ref.crop((left, top, left + size, top + size)), np.float32)
  ours = transforms.resize_shorter_center_crop(
      tf.constant(np.asarray(img)), size, crop_pct, "bicubic").numpy()
  assert ours.shape == (224, 224, 3)
  diff = np.abs(ours - ref)
  # Same geometry; kernels differ only in coefficients/rounding (a few grey levels).
  assert diff.mean() < 1.5 and np.percentile(diff, 99) < 6, (diff.mean(), diff.max())


def test_color_jitter_zero_strength_is_identity_and_nonzero_changes():
  img = tf.constant(np.asarray(random_image(np.random.default_rng(1), 64, 48), np.float32))
  np.testing.assert_allclose(transforms.color_jitter(img, _seed(0), 0.0).numpy(), img.numpy(),
                             atol=1e-3)
  assert np.abs(transforms.color_jitter(img, _seed(0), 0.4).numpy() - img.numpy()).mean() > 1.0


def test_normalisations():
  img = tf.constant(np.arange(12, dtype=np.float32).reshape(2, 2, 3) * 20)
  bgr = transforms.normalize(img, "parc_bgr").numpy()
  np.testing.assert_allclose(bgr, img.numpy()[..., ::-1] / 255.0)
  inet = transforms.normalize(img, "imagenet").numpy()
  np.testing.assert_allclose(inet[0, 0, 0], (0 / 255 - 0.485) / 0.229, rtol=1e-6)
  with pytest.raises(ValueError, match="normalization"):
    transforms.normalize(img, "bgr")


def test_truncated_jpeg_is_detected_but_padding_after_eoi_is_allowed():
  data = encode(random_image(np.random.default_rng(2), 200, 150))
  assert bool(transforms.jpeg_is_complete(tf.constant(data)))
  assert bool(transforms.jpeg_is_complete(tf.constant(data + b"\x00" * 100)))
  assert not bool(transforms.jpeg_is_complete(tf.constant(truncated(data))))
  # ...and TensorFlow alone would decode the top of the truncated file without complaint:
  crop = tf.io.decode_and_crop_jpeg(truncated(data, 0.8), [0, 0, 8, 8], channels=3)
  assert crop.shape == (8, 8, 3)
