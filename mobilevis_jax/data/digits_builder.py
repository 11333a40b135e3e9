"""``mobilevis_digits``: an offline default dataset, exposed through the real TFDS builder
interface.

Built from scikit-learn's bundled handwritten digits (1,797 8x8 greyscale images, 10 classes; the
data ships inside the scikit-learn wheel, so nothing is downloaded). Each image is scaled to
0..255, upsampled 4x (bilinear) to 32x32, replicated to RGB and stored as a JPEG, so the main job
exercises exactly the decode / crop / augment path ImageNet uses.

Splits (deterministic, balanced enough for a smoke run): ``validation`` = images whose index in
``load_digits()`` is a multiple of 5 (360 images), ``train`` = the rest (1,437 images).
"""
from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

IMAGE_SIZE = 32
VALIDATION_EVERY = 5


def _digit_jpeg(pixels_8x8: np.ndarray) -> bytes:
  grey = np.clip(np.round(pixels_8x8 * (255.0 / 16.0)), 0, 255).astype(np.uint8)
  big = Image.fromarray(grey, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
  out = io.BytesIO()
  big.convert("RGB").save(out, format="JPEG", quality=95)
  return out.getvalue()


class MobilevisDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn digits as 32x32 RGB JPEGs (train 1,437 / validation 360)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything comes from the scikit-learn wheel
    return {"train": self._generate_examples(validation=False),
            "validation": self._generate_examples(validation=True)}

  def _generate_examples(self, validation: bool):
    from sklearn.datasets import load_digits
    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
      if (i % VALIDATION_EVERY == 0) != validation:
        continue
      name = f"digit_{i:04d}.jpg"
      # `image` is a file-like object: TFDS stores the bytes as they are (no re-encoding).
      yield name, {"image": io.BytesIO(_digit_jpeg(pixels)), "label": int(label), "file_name": name}
