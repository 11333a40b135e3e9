"""Small stand-ins for the ImageNet release archives, for tests, smoke runs and benchmarks.

They reproduce the layouts the real builders read, including the real archives' oddities:

* :func:`write_ilsvrc2012`: ``ILSVRC2012_img_train.tar`` (a tar of per-synset tars) and
  ``ILSVRC2012_img_val.tar`` (flat, ``ILSVRC2012_val_00000001.JPEG`` ...; TFDS assigns validation
  labels from the ``validation_labels.txt`` it ships, in sorted file-name order). The train tar
  holds ``n01739381_1309.JPEG`` as a CMYK JPEG and ``n02105855_2933.JPEG`` as a PNG, the very file
  names TFDS's builder repairs.
* :func:`write_imagenet21k`: ``fall11_whole.tar`` / ``winter21_whole.tar.gz`` of per-synset tars;
  :func:`write_imagenet21k_synset_tars`: the same synset tars extracted into a directory.

Images are smooth random colour fields (JPEG sizes close to photographs', unlike white noise).
"""
from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Sequence

import numpy as np
from PIL import Image

CMYK_TRAIN_FILE = ("n01739381", "n01739381_1309.JPEG")
PNG_TRAIN_FILE = ("n02105855", "n02105855_2933.JPEG")


def random_image(rng: np.random.Generator, width: int = 500, height: int = 375) -> Image.Image:
  """A smooth random RGB image (bilinearly upsampled coarse noise plus a gradient)."""
  coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
  img = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
  arr = np.asarray(img, np.float32)
  arr += np.linspace(-30, 30, width, dtype=np.float32)[None, :, None]
  arr += rng.normal(0, 6, size=arr.shape).astype(np.float32)  # texture, like sensor noise
  return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
  out = io.BytesIO()
  if fmt == "JPEG":
    img.save(out, format="JPEG", quality=quality)
  else:
    img.save(out, format=fmt)
  return out.getvalue()


def truncated(data: bytes, keep: float = 0.6) -> bytes:
  """The first ``keep`` fraction of a file, as a broken download or disk leaves it."""
  return data[: int(len(data) * keep)]


def _tar_bytes(members: dict[str, bytes]) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def _write_tar(path: str, members: dict[str, bytes], gzip: bool = False) -> None:
  with tarfile.open(path, mode="w:gz" if gzip else "w") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def synset_images(rng: np.random.Generator, synset: str, count: int,
                  size: tuple[int, int] = (500, 375), start: int = 1) -> dict:
  return {f"{synset}_{start + i}.JPEG": encode(random_image(rng, *size)) for i in range(count)}


def write_ilsvrc2012(manual_dir: str, *, synsets: Sequence[str] = ("n01440764", "n01443537"),
                     images_per_class: int = 3, num_val: int = 6,
                     size: tuple[int, int] = (500, 375), seed: int = 0,
                     corrupt_train_file: str | None = None) -> dict:
  """Writes the two ILSVRC2012 tars; returns ``{'train': {synset: [names]}, 'val': [names]}``.

  The CMYK and PNG specimen synsets are always added. ``corrupt_train_file`` (e.g.
  ``'n01440764_1.JPEG'``) is written truncated.
  """
  rng = np.random.default_rng(seed)
  os.makedirs(manual_dir, exist_ok=True)
  per_synset = {s: synset_images(rng, s, images_per_class, size) for s in synsets}
  cmyk_synset, cmyk_name = CMYK_TRAIN_FILE
  per_synset.setdefault(cmyk_synset, {})[cmyk_name] = encode(
      random_image(rng, *size).convert("CMYK"))
  png_synset, png_name = PNG_TRAIN_FILE
  per_synset.setdefault(png_synset, {})[png_name] = encode(random_image(rng, *size), "PNG")
  if corrupt_train_file:
    synset = corrupt_train_file.split("_")[0]
    per_synset[synset][corrupt_train_file] = truncated(per_synset[synset][corrupt_train_file])
  _write_tar(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"),
             {f"{s}.tar": _tar_bytes(files) for s, files in sorted(per_synset.items())})
  val = {f"ILSVRC2012_val_{i:08d}.JPEG": encode(random_image(rng, *size))
         for i in range(1, num_val + 1)}
  _write_tar(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), val)
  return {"train": {s: sorted(f) for s, f in per_synset.items()}, "val": sorted(val)}


def _imagenet21k_synsets(synsets: Sequence[str], images_per_class: int, size: tuple[int, int],
                         seed: int, corrupt_file: str | None) -> dict:
  """{synset: {file name: bytes}} of the fake 21k release (see :func:`write_imagenet21k`)."""
  rng = np.random.default_rng(seed)
  per_synset = {s: synset_images(rng, s, images_per_class, size) for s in synsets}
  first = synsets[0]
  per_synset[first][f"{first}_9001.JPEG"] = encode(random_image(rng, *size).convert("CMYK"))
  per_synset[first][f"{first}_9002.JPEG"] = encode(random_image(rng, *size), "PNG")
  if corrupt_file:
    synset = corrupt_file.split("_")[0]
    per_synset[synset][corrupt_file] = truncated(per_synset[synset][corrupt_file])
  return per_synset


def write_imagenet21k(manual_dir: str, *, archive: str = "fall11_whole.tar",
                      synsets: Sequence[str] = ("n00004475", "n00005787", "n00006024"),
                      images_per_class: int = 6, size: tuple[int, int] = (120, 90), seed: int = 0,
                      corrupt_file: str | None = None) -> dict:
  """Writes a release-layout archive (gzip if the name ends in .gz); returns {synset: [names]}.

  The first synset also gets a CMYK JPEG and a PNG saved under a .JPEG name; ``corrupt_file``
  (e.g. ``'n00005787_3.JPEG'``) is written truncated.
  """
  per_synset = _imagenet21k_synsets(synsets, images_per_class, size, seed, corrupt_file)
  os.makedirs(manual_dir, exist_ok=True)
  _write_tar(os.path.join(manual_dir, archive),
             {f"{s}.tar": _tar_bytes(files) for s, files in per_synset.items()},
             gzip=archive.endswith(".gz"))
  return {s: sorted(f) for s, f in per_synset.items()}


def write_imagenet21k_synset_tars(manual_dir: str, *,
                                  synsets: Sequence[str] = ("n00004475", "n00005787", "n00006024"),
                                  images_per_class: int = 6, size: tuple[int, int] = (120, 90),
                                  seed: int = 0, corrupt_file: str | None = None) -> dict:
  """The release extracted: ``manual_dir/n00004475.tar``, ... (one tar per synset).

  Same content as :func:`write_imagenet21k` with the same arguments; returns {synset: [names]}.
  """
  per_synset = _imagenet21k_synsets(synsets, images_per_class, size, seed, corrupt_file)
  os.makedirs(manual_dir, exist_ok=True)
  for s, files in per_synset.items():
    _write_tar(os.path.join(manual_dir, f"{s}.tar"), files)
  return {s: sorted(f) for s, f in per_synset.items()}
