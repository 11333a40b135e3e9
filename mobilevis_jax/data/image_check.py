"""Checking and normalising source images while a dataset is prepared.

Real archives hold surprises: CMYK JPEGs, PNGs saved under ``.JPEG`` names, truncated files. The
builders we own pass every source image through :func:`checked_jpeg`, which decodes it (with PIL's
DCT-domain downscaling for speed, still enough to detect truncation), re-encodes non-RGB or non-JPEG
files as RGB JPEG, and raises :class:`CorruptImageError` naming the file otherwise, so a bad file
never turns into silent garbage in the records.
"""
from __future__ import annotations

import io
import logging

from PIL import Image, ImageFile

log = logging.getLogger(__name__)


class CorruptImageError(ValueError):
  """An image in the source (or in the records) cannot be decoded; the message names the file."""


def checked_jpeg(data: bytes, name: str, quality: int = 95) -> bytes:
  """Returns ``data`` if it is a decodable RGB/greyscale JPEG, else an RGB JPEG re-encoding of it.

  Raises CorruptImageError (naming ``name``) if the image cannot be fully decoded.
  """
  # A truncated file must fail here, not be padded with grey by PIL.
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; corrupt files would pass")
  try:
    with Image.open(io.BytesIO(data)) as im:
      fmt, mode = im.format, im.mode
      if fmt == "JPEG" and mode in ("RGB", "L"):
        im.draft("RGB", (64, 64))  # decode at 1/8 scale: fast, still reads every entropy-coded byte
        im.load()
        return data
      im.load()
      rgb = im.convert("RGB")
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise CorruptImageError(f"cannot decode image {name}: {e}") from e
  out = io.BytesIO()
  rgb.save(out, format="JPEG", quality=quality)
  log.info("re-encoded %s (%s %s) as RGB JPEG", name, fmt, mode)
  return out.getvalue()
