"""``antialias=False``: the resize OpenCV's ``cv2.resize(INTER_LINEAR)`` does (ParC-Net's cvnets
train crop and eval Resize(288) -> CenterCrop(256))."""
import numpy as np
import tensorflow as tf

from mobilevis_jax.data import config as config_lib
from mobilevis_jax.data import transforms


def _cv2_linear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """OpenCV's INTER_LINEAR in float: half-pixel centres, edge-clamped taps, no kernel widening."""
  def taps(n_in, n_out):
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    lo = np.floor(x).astype(int)
    frac = x - lo
    frac = np.where(lo < 0, 0.0, frac)
    lo = np.clip(lo, 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, frac
  y0, y1, fy = taps(img.shape[0], out_h)
  x0, x1, fx = taps(img.shape[1], out_w)
  rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]
  return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def test_no_antialias_is_cv2_bilinear():
  img = np.random.default_rng(0).uniform(0, 255, (45, 60, 3)).astype(np.float32)
  for out in ((20, 27), (9, 12), (80, 100)):  # downscales by non-integer factors, and an upscale
    ours = transforms.resize(img, out, "bilinear", antialias=False).numpy()
    np.testing.assert_allclose(ours, _cv2_linear(img, *out), atol=0.02)  # float32 rounding
  # PIL-style antialiasing widens the kernel when shrinking, which cv2 does not.
  wide = transforms.resize(img, (20, 27), "bilinear").numpy()
  assert np.abs(wide - _cv2_linear(img, 20, 27)).max() > 10


def test_parc_eval_transform_is_cvnets():
  cfg = config_lib.parc_config()
  assert cfg.eval_interpolation == "bilinear" and not cfg.antialias
  img = np.random.default_rng(1).uniform(0, 255, (300, 400, 3)).astype(np.float32)
  out = transforms.resize_shorter_center_crop(tf.constant(img), cfg.image_size, cfg.crop_pct,
                                              cfg.eval_interpolation, cfg.antialias).numpy()
  # cvnets: Resize(288) on the shorter side (long side int(288 * 400 / 300) = 384), centre 256.
  ref = _cv2_linear(img, 288, 384)[16:272, 64:320]
  np.testing.assert_allclose(out, ref, atol=0.02)  # float32 rounding
