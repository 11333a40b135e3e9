"""Per-image train and eval transforms in TensorFlow, with torchvision/timm semantics.

Every random choice is a stateless op keyed by a per-example seed (derived from the run seed and
the example's position in the stream), so an augmented image is a pure function of
``(seed, position)``: this is what makes the stream reproducible and resumable.

Train: decode (fused with the crop for JPEG) -> RandomResizedCrop (torchvision's sampling: 10 tries
of area/log-ratio, then the centre-crop fallback) -> horizontal flip -> RandAugment or colour jitter
-> normalise -> random erasing. Eval: resize the shorter side to ``floor(size / crop_pct)`` ->
centre crop (torchvision's rounding) -> normalise.

Resizing uses ``tf.image.resize(..., antialias=True)``, which like PIL widens the kernel when
downsampling; values differ from PIL by a few grey levels (kernel coefficients and rounding), not
in geometry. ``antialias=False`` samples without widening, as OpenCV's ``cv2.resize`` (cvnets,
ParC-Net) does.
"""
from __future__ import annotations

import math

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_EOI_SEARCH_BYTES = 1024


def split_seed(seed: tf.Tensor, n: int) -> list[tf.Tensor]:
  """``n`` independent stateless seeds from one."""
  return tf.unstack(tf.random.experimental.stateless_split(seed, num=n))


def uniform(seed: tf.Tensor, shape: tuple[int, ...] = (), minval: float = 0.0,
            maxval: float = 1.0) -> tf.Tensor:
  return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval, dtype=tf.float32)


def randint(seed: tf.Tensor, low: tf.Tensor | int, high: tf.Tensor | int) -> tf.Tensor:
  """Integer in [low, high] inclusive (``high >= low``), like ``torch.randint(low, high + 1)``."""
  return tf.random.stateless_uniform([], seed, minval=low, maxval=high + 1, dtype=tf.int32)


# ----------------------------------------------------------------------------- decoding


def jpeg_is_complete(data: tf.Tensor) -> tf.Tensor:
  """Whether a JPEG's last KiB holds the end-of-image marker FF D9.

  TensorFlow's ``decode_and_crop_jpeg`` happily decodes the top of a truncated file, so truncation
  must be caught before decoding. In entropy-coded data every FF byte is followed by 00 or a restart
  marker, so FF D9 there can only be the real end marker (trailing padding after it is allowed).
  """
  length = tf.strings.length(data)
  start = tf.maximum(length - _EOI_SEARCH_BYTES, 0)
  tail = tf.io.decode_raw(tf.strings.substr(data, start, length - start), tf.uint8)
  return tf.reduce_any(tf.logical_and(tf.equal(tail[:-1], 0xFF), tf.equal(tail[1:], 0xD9)))


def image_shape(data: tf.Tensor) -> tf.Tensor:
  return tf.image.extract_jpeg_shape(data)[:2]


# ----------------------------------------------------------------------------- geometry


def random_resized_crop_window(seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor,
                               scale: tuple[float, float] = (0.08, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)
                               ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
  """torchvision ``RandomResizedCrop.get_params``: returns ``(top, left, h, w)`` (int32)."""
  h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = h_f * w_f
  s_area, s_ratio, s_top, s_left = split_seed(seed, 4)
  tries = 10
  target = area * uniform(s_area, [tries], scale[0], scale[1])
  aspect = tf.exp(uniform(s_ratio, [tries], math.log(ratio[0]), math.log(ratio[1])))
  # Python's round() (used by torchvision) rounds half to even, like tf.round.
  w = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  h = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
  # Fallback: the whole image, cropped centrally to the nearest allowed aspect ratio.
  in_ratio = w_f / h_f
  fb_w = tf.where(in_ratio < ratio[0], width,
                  tf.where(in_ratio > ratio[1], tf.cast(tf.round(h_f * ratio[1]), tf.int32), width))
  fb_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w_f / ratio[0]), tf.int32), height)
  any_ok = tf.reduce_any(ok)
  crop_h = tf.where(any_ok, h[first], fb_h)
  crop_w = tf.where(any_ok, w[first], fb_w)
  top = tf.where(any_ok, randint(s_top, 0, height - crop_h), (height - crop_h) // 2)
  left = tf.where(any_ok, randint(s_left, 0, width - crop_w), (width - crop_w) // 2)
  return top, left, crop_h, crop_w


def resize(image: tf.Tensor, size: tf.Tensor | tuple[int, int], method: str,
           seed: tf.Tensor | None = None, antialias: bool = True) -> tf.Tensor:
  """Float resize to ``size`` (h, w); ``method`` bilinear/bicubic/random."""
  image = tf.cast(image, tf.float32)
  if method == "random":
    pick = uniform(seed) < 0.5
    return tf.cond(pick, lambda: tf.image.resize(image, size, "bilinear", antialias=antialias),
                   lambda: tf.image.resize(image, size, "bicubic", antialias=antialias))
  return tf.image.resize(image, size, method, antialias=antialias)


def decode_random_resized_crop(data: tf.Tensor, seed: tf.Tensor,
                               size: tf.Tensor | tuple[int, int], *, scale: tuple[float, float],
                               ratio: tuple[float, float], interpolation: str,
                               is_jpeg: bool = True, antialias: bool = True) -> tf.Tensor:
  """Decodes only the sampled window (fused for JPEG) and resizes it to ``size`` (float32
  0..255)."""
  s_win, s_interp = split_seed(seed, 2)
  if is_jpeg:
    hw = image_shape(data)
    top, left, h, w = random_resized_crop_window(s_win, hw[0], hw[1], scale, ratio)
    crop = tf.io.decode_and_crop_jpeg(data, tf.stack([top, left, h, w]), channels=3)
  else:
    img = tf.io.decode_image(data, channels=3, expand_animations=False)
    hw = tf.shape(img)[:2]
    top, left, h, w = random_resized_crop_window(s_win, hw[0], hw[1], scale, ratio)
    crop = img[top:top + h, left:left + w]
  out = resize(crop, size, interpolation, s_interp, antialias)
  return tf.clip_by_value(out, 0.0, 255.0)


def random_flip(image: tf.Tensor, seed: tf.Tensor, prob: float = 0.5) -> tf.Tensor:
  return tf.cond(uniform(seed) < prob, lambda: tf.reverse(image, [1]), lambda: image)


def resize_shorter_center_crop(image: tf.Tensor, size: int, crop_pct: float,
                               method: str = "bicubic", antialias: bool = True) -> tf.Tensor:
  """timm eval transform: Resize(floor(size / crop_pct)) on the shorter side, CenterCrop(size)."""
  scale_size = int(math.floor(size / crop_pct))
  hw = tf.shape(image)[:2]
  h, w = hw[0], hw[1]
  # torchvision: the long side becomes int(scale_size * long / short) (truncation).
  new_h = tf.where(h <= w, scale_size, tf.cast(scale_size * h / w, tf.int32))
  new_w = tf.where(h <= w, tf.cast(scale_size * w / h, tf.int32), scale_size)
  image = tf.clip_by_value(resize(image, tf.stack([new_h, new_w]), method, antialias=antialias),
                           0.0, 255.0)
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2.0), tf.int32)
  return image[top:top + size, left:left + size]


# ----------------------------------------------------------------------------- colour


def _grey(image):
  # ITU-R 601-2 luma, as PIL's convert('L') and torchvision's rgb_to_grayscale use.
  return tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)


def _blend(a, b, factor):
  """b + factor * (a - b), clipped to 0..255 (factor 1 gives ``a``)."""
  return tf.clip_by_value(b + factor * (a - b), 0.0, 255.0)


def color_jitter(image: tf.Tensor, seed: tf.Tensor, strength: float) -> tf.Tensor:
  """torchvision ``ColorJitter(strength, strength, strength)`` on float 0..255, random op order."""
  s_order, s_b, s_c, s_s = split_seed(seed, 4)
  lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
  fb, fc, fs = uniform(s_b, (), lo, hi), uniform(s_c, (), lo, hi), uniform(s_s, (), lo, hi)
  ops = [
      lambda x: _blend(x, tf.zeros_like(x), fb),
      lambda x: _blend(x, tf.reduce_mean(_grey(x)) * tf.ones_like(x), fc),
      lambda x: _blend(x, _grey(x) * tf.ones_like(x), fs),
  ]
  order = tf.argsort(uniform(s_order, [3]))
  for i in range(3):
    image = tf.switch_case(order[i], [lambda f=f: f(image) for f in ops])
  return image


def normalize(image: tf.Tensor, mode: str) -> tf.Tensor:
  """float 0..255 RGB -> model input. ``parc_bgr`` is ParC-Net's cv2 convention (BGR, /255)."""
  image = image / 255.0
  if mode == "imagenet":
    return (image - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)
  if mode == "parc_bgr":
    return image[..., ::-1]
  if mode == "none":
    return image
  raise ValueError(f"normalization={mode!r}; expected 'imagenet', 'parc_bgr' or 'none'")


# ----------------------------------------------------------------------------- random erasing


def random_erasing(image: tf.Tensor, seed: tf.Tensor, prob: float, *, min_area: float = 0.02,
                   max_area: float = 1 / 3, min_aspect: float = 0.3,
                   attempts: int = 10) -> tf.Tensor:
  """timm ``RandomErasing(prob, mode='pixel', max_count=1)`` on a normalised HWC image.

  With probability ``prob`` one rectangle (area fraction in [min_area, max_area], log-uniform
  aspect ratio in [min_aspect, 1/min_aspect], first of 10 tries that fits) is filled with
  per-pixel standard-normal values.
  """
  s_gate, s_area, s_aspect, s_top, s_left, s_fill = split_seed(seed, 6)
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  area = tf.cast(height * width, tf.float32)
  target = area * uniform(s_area, [attempts], min_area, max_area)
  aspect = tf.exp(uniform(s_aspect, [attempts], math.log(min_aspect), -math.log(min_aspect)))
  h = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  w = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  fits = (w < width) & (h < height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  do = (uniform(s_gate) < prob) & tf.reduce_any(fits)
  eh, ew = h[first], w[first]
  top = randint(s_top, 0, height - eh)
  left = randint(s_left, 0, width - ew)
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew) & do
  noise = tf.random.stateless_normal(shape, s_fill, dtype=image.dtype)
  return tf.where(box[..., None], noise, image)
