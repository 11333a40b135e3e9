"""RandAugment with timm's semantics (``rand-m9-mstd0.5-inc1`` and friends), in TensorFlow.

What timm does, and so what this does, per image:

* ``n`` layers (default 2); each picks one of the ops uniformly *with* replacement and applies it
  with probability ``p`` (default 0.5).
* the magnitude of each applied op is drawn from N(m, mstd) (``mstd`` > 100: uniform in [0, m])
  and clipped to [0, mmax] (default 10); ``level = magnitude / 10``.
* ``inc1`` selects the "increasing" op set, whose strength grows with the magnitude: AutoContrast,
  Equalize, Invert, Rotate (+-30 deg), PosterizeIncreasing (keep 4 - int(4 level) bits),
  SolarizeIncreasing (threshold 256 - int(256 level)), SolarizeAdd (+int(110 level) below 128),
  Color/Contrast/Brightness/SharpnessIncreasing (factor max(0.1, 1 +- 0.9 level)), ShearX/Y
  (+-0.3 level), TranslateXRel/YRel (+-0.45 level of the image size). Signs are random.
* geometric ops fill uncovered pixels with the ImageNet mean colour (124, 116, 104).

The ops reproduce PIL's integer semantics (``ImageOps``/``ImageEnhance``: truncating blends,
``L`` = rounded ITU-R 601 luma, PIL's equalize and autocontrast look-up tables, SMOOTH kernel for
sharpness with untouched borders). Known deviation: geometric ops interpolate bilinearly (timm uses
bicubic when the train interpolation is bicubic, a random pick of the two otherwise), because
``ImageProjectiveTransformV3`` has no bicubic mode.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import tensorflow as tf

from mobilevis_jax.data.transforms import split_seed, uniform

LEVEL_DENOM = 10.0
FILL = (124, 116, 104)  # timm: round(255 * ImageNet mean)
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                  "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                  "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                  "TranslateXRel", "TranslateYRel")
CLASSIC_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
               "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
               "TranslateXRel", "TranslateYRel")


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  magnitude: float = 10.0
  num_layers: int = 2
  prob: float = 0.5
  magnitude_std: float = 0.0
  magnitude_max: float = LEVEL_DENOM
  increasing: bool = False

  @property
  def ops(self) -> tuple[str, ...]:
    return INCREASING_OPS if self.increasing else CLASSIC_OPS


def parse_randaugment(config: str) -> RandAugmentSpec:
  """Parses a timm RandAugment string such as ``rand-m9-mstd0.5-inc1``."""
  parts = config.split("-")
  if parts[0] != "rand":
    raise ValueError(f"randaugment={config!r}: must start with 'rand'")
  kw = {}
  for part in parts[1:]:
    m = re.fullmatch(r"([a-z]+)(\d.*)", part)
    if not m:
      raise ValueError(f"randaugment={config!r}: cannot parse section {part!r}")
    key, val = m.groups()
    if key == "m":
      kw["magnitude"] = float(int(val))
    elif key == "n":
      kw["num_layers"] = int(val)
    elif key == "p":
      kw["prob"] = float(val)
    elif key == "mstd":
      kw["magnitude_std"] = math.inf if float(val) > 100 else float(val)
    elif key == "mmax":
      kw["magnitude_max"] = float(int(val))
    elif key == "inc":
      kw["increasing"] = bool(int(val))
    else:
      raise ValueError(f"randaugment={config!r}: unknown section {part!r} "
                       "(weighted op sets 't...' are not supported)")
  return RandAugmentSpec(**kw)


# ----------------------------------------------------------------------------- PIL-like ops
# All take and return float32 HWC images holding integers in 0..255.


def _trunc_u8(x):
  return tf.floor(tf.clip_by_value(x, 0.0, 255.0))


def _blend(degenerate, image, factor):
  """PIL ``Image.blend(degenerate, image, factor)``: truncation towards zero, clipped."""
  return _trunc_u8(degenerate + factor * (image - degenerate))


def _luma(image):
  return tf.round(tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), -1, keepdims=True))


def _lut(image, table):
  """Per-channel look-up: ``table`` is (3, 256) or (256,)."""
  idx = tf.cast(image, tf.int32)
  if table.shape.rank == 1:
    return tf.gather(table, idx)
  chans = [tf.gather(table[c], idx[..., c]) for c in range(3)]
  return tf.stack(chans, axis=-1)


def _histograms(image):
  idx = tf.reshape(tf.cast(image, tf.int32), [-1, 3])
  return tf.stack([tf.math.bincount(idx[:, c], minlength=256, maxlength=256, dtype=tf.int32)
                   for c in range(3)])


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  hist = _histograms(image)
  levels = tf.range(256, dtype=tf.float32)
  present = hist > 0
  lo = tf.cast(tf.argmax(tf.cast(present, tf.int32), axis=1), tf.float32)
  hi = 255.0 - tf.cast(tf.argmax(tf.cast(present[:, ::-1], tf.int32), axis=1), tf.float32)
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  table = tf.clip_by_value(tf.floor(levels[None] * scale[:, None] - lo[:, None] * scale[:, None]),
                           0.0, 255.0)
  table = tf.where((hi <= lo)[:, None], levels[None], table)
  return _lut(image, table)


def equalize(image: tf.Tensor) -> tf.Tensor:
  hist = _histograms(image)
  levels = tf.range(256, dtype=tf.float32)
  tables = []
  for c in range(3):
    h = hist[c]
    nonzero = tf.boolean_mask(h, h > 0)
    # PIL: step = (sum of non-empty bins except the last one) // 255.
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    cum = tf.cumsum(h, exclusive=True)
    table = tf.cast((step // 2 + cum) // tf.maximum(step, 1), tf.float32)
    table = tf.clip_by_value(table, 0.0, 255.0)
    tables.append(tf.where(step > 0, table, levels))
  return _lut(image, tf.stack(tables))


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255.0 - image


def posterize(image: tf.Tensor, bits: tf.Tensor | int) -> tf.Tensor:
  shift = tf.cast(8 - bits, tf.int32)
  as_int = tf.cast(image, tf.int32)
  kept = tf.bitwise.left_shift(tf.bitwise.right_shift(as_int, shift), shift)
  return tf.where(bits >= 8, image, tf.cast(kept, tf.float32))


def solarize(image: tf.Tensor, threshold: tf.Tensor | float) -> tf.Tensor:
  return tf.where(image < threshold, image, 255.0 - image)


def solarize_add(image: tf.Tensor, add: tf.Tensor | float, threshold: float = 128.0) -> tf.Tensor:
  return tf.where(image < threshold, tf.minimum(image + add, 255.0), image)


def color(image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
  return _blend(_luma(image) * tf.ones_like(image), image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
  mean = tf.floor(tf.reduce_mean(_luma(image)) + 0.5)
  return _blend(mean * tf.ones_like(image), image, factor)


def brightness(image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.round(smooth)
  # PIL leaves the one-pixel border unfiltered.
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  shape = tf.shape(image)
  rows = tf.range(shape[0])[:, None]
  cols = tf.range(shape[1])[None, :]
  inner = (rows > 0) & (rows < shape[0] - 1) & (cols > 0) & (cols < shape[1] - 1)
  degenerate = tf.where(inner[..., None], smooth, image)
  return _blend(degenerate, image, factor)


def affine(image: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
  """PIL ``Image.transform(size, AFFINE, matrix, BILINEAR, fillcolor=FILL)``.

  ``matrix`` (a, b, c, d, e, f) maps output to input coordinates in PIL's convention (pixel centres
  at +0.5); it is converted to TF's index convention (centres at integers).
  """
  a, b, c, d, e, f = tf.unstack(tf.cast(matrix, tf.float32))
  c_idx = c + 0.5 * (a + b) - 0.5
  f_idx = f + 0.5 * (d + e) - 0.5
  transform = tf.stack([a, b, c_idx, d, e, f_idx, 0.0, 0.0])[None]
  shape = tf.shape(image)[:2]
  # One pass over image and coverage mask; uncovered area (mask 0) gets the fill colour.
  stacked = tf.concat([image, tf.ones_like(image[..., :1])], -1)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=stacked, transforms=transform, output_shape=shape, fill_value=0.0,
      interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  img, mask = out[..., :3], out[..., 3:]
  filled = img + (1.0 - mask) * tf.constant(FILL, tf.float32)
  return tf.clip_by_value(tf.round(filled), 0.0, 255.0)


def rotate(image: tf.Tensor, degrees: tf.Tensor | float) -> tf.Tensor:
  shape = tf.cast(tf.shape(image), tf.float32)
  cx, cy = shape[1] / 2.0, shape[0] / 2.0
  angle = -degrees * (math.pi / 180.0)
  cos, sin = tf.cos(angle), tf.sin(angle)
  # PIL rotate: input = R (output - centre) + centre.
  c = cos * -cx + sin * -cy + cx
  f = -sin * -cx + cos * -cy + cy
  return affine(image, tf.stack([cos, sin, c, -sin, cos, f]))


def shear_x(image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
  return affine(image, tf.stack([1.0, factor, 0.0, 0.0, 1.0, 0.0]))


def shear_y(image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
  return affine(image, tf.stack([1.0, 0.0, 0.0, factor, 1.0, 0.0]))


def translate_x_rel(image: tf.Tensor, pct: tf.Tensor | float) -> tf.Tensor:
  pixels = pct * tf.cast(tf.shape(image)[1], tf.float32)
  return affine(image, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0]))


def translate_y_rel(image: tf.Tensor, pct: tf.Tensor | float) -> tf.Tensor:
  pixels = pct * tf.cast(tf.shape(image)[0], tf.float32)
  return affine(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, pixels]))


# ----------------------------------------------------------------------------- level -> argument


def _signed(value, negate):
  return tf.where(negate, -value, value)


def apply_op(name: str, image: tf.Tensor, magnitude: tf.Tensor | float, negate: tf.Tensor | bool,
             translate_pct: float = 0.45) -> tf.Tensor:
  """Applies the timm op ``name`` at ``magnitude`` (0..10); ``negate`` is timm's random sign."""
  level = magnitude / LEVEL_DENOM
  enhance_inc = tf.maximum(0.1, 1.0 + _signed(level * 0.9, negate))
  enhance = level * 1.8 + 0.1
  if name == "AutoContrast":
    return autocontrast(image)
  if name == "Equalize":
    return equalize(image)
  if name == "Invert":
    return invert(image)
  if name == "Rotate":
    return rotate(image, _signed(level * 30.0, negate))
  if name == "Posterize":
    return posterize(image, tf.cast(tf.floor(level * 4), tf.int32))
  if name == "PosterizeIncreasing":
    return posterize(image, 4 - tf.cast(tf.floor(level * 4), tf.int32))
  if name == "Solarize":
    return solarize(image, tf.minimum(256.0, tf.floor(level * 256)))
  if name == "SolarizeIncreasing":
    return solarize(image, 256.0 - tf.minimum(256.0, tf.floor(level * 256)))
  if name == "SolarizeAdd":
    return solarize_add(image, tf.minimum(128.0, tf.floor(level * 110)))
  if name in ("Color", "ColorIncreasing"):
    return color(image, enhance if name == "Color" else enhance_inc)
  if name in ("Contrast", "ContrastIncreasing"):
    return contrast(image, enhance if name == "Contrast" else enhance_inc)
  if name in ("Brightness", "BrightnessIncreasing"):
    return brightness(image, enhance if name == "Brightness" else enhance_inc)
  if name in ("Sharpness", "SharpnessIncreasing"):
    return sharpness(image, enhance if name == "Sharpness" else enhance_inc)
  if name == "ShearX":
    return shear_x(image, _signed(level * 0.3, negate))
  if name == "ShearY":
    return shear_y(image, _signed(level * 0.3, negate))
  if name == "TranslateXRel":
    return translate_x_rel(image, _signed(level * translate_pct, negate))
  if name == "TranslateYRel":
    return translate_y_rel(image, _signed(level * translate_pct, negate))
  raise ValueError(f"unknown RandAugment op {name!r}")


def _op_dispatcher(ops: tuple[str, ...]):
  """One traced function holding every op, shared by all layers (graph built once, not n times)."""
  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, None, 3], tf.float32), tf.TensorSpec([], tf.int32),
      tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.bool)])
  def dispatch(image, op, magnitude, negate):
    branches = [lambda name=name: apply_op(name, image, magnitude, negate) for name in ops]
    return tf.switch_case(op, branches)
  return dispatch


def randaugment(image: tf.Tensor, seed: tf.Tensor, spec: RandAugmentSpec,
                dispatch: Callable | None = None) -> tf.Tensor:
  """timm ``RandAugment`` on a float32 HWC image in 0..255 (rounded to integers first, as the
  PIL image timm works on is uint8). ``dispatch``: a shared :func:`_op_dispatcher` (optional)."""
  image = tf.round(tf.clip_by_value(image, 0.0, 255.0))
  ops = spec.ops
  dispatch = dispatch or _op_dispatcher(ops)
  for layer_seed in split_seed(seed, spec.num_layers):
    s_op, s_gate, s_mag, s_sign = split_seed(layer_seed, 4)
    op = tf.random.stateless_uniform([], s_op, 0, len(ops), dtype=tf.int32)
    if math.isinf(spec.magnitude_std):
      mag = uniform(s_mag, (), 0.0, spec.magnitude)
    elif spec.magnitude_std > 0:
      mag = spec.magnitude + spec.magnitude_std * tf.random.stateless_normal([], s_mag)
    else:
      mag = tf.constant(spec.magnitude, tf.float32)
    mag = tf.clip_by_value(mag, 0.0, spec.magnitude_max)
    negate = uniform(s_sign) > 0.5
    apply = uniform(s_gate) < spec.prob
    shape = image.shape
    image = tf.cond(apply, lambda: dispatch(image, op, mag, negate), lambda: image)
    image.set_shape(shape)
  return image
