"""``imagenet22k``: a TFDS builder for the full ImageNet-21k ("22K") release, which TFDS lacks.

Source layout (``manual_dir``): the release archive as distributed, a tar of per-synset tars of
JPEGs: ``fall11_whole.tar`` (builder config ``fall11``, 21,841 synsets) or ``winter21_whole.tar.gz``
(``winter21``, 19,167 synsets after the 2021 filtering). Inner members are ``n01440764.tar`` holding
``n01440764_10026.JPEG`` etc. Gzip or plain tars are both read as streams.

* Classes: the sorted synset ids found in the archive (inner tars named ``n\\d{8}.tar``). They are
  recorded in the prepared dataset (``label.labels.txt`` next to the records and in
  ``metadata.json`` together with the release name and its class count), so a model trained on one
  release can never be silently paired with another release's label ids.
* Held-out validation split (ours; the release has none): in every synset with at least 2 images,
  the ``val_per_class`` images (default 2, at most half of the synset) whose file names have the
  smallest MD5 digests. This depends only on the file names, not on tar order, so it is the same on
  every machine. ``train`` is every other image. For fall11 this holds out ~43.7k images.
* Images are checked while preparing: CMYK / greyscale-with-alpha / PNG-under-.JPEG files are
  re-encoded as RGB JPEG; an undecodable (e.g. truncated) file raises ``CorruptImageError`` naming
  ``synset_tar/file``, or, with ``skip_corrupt=True``, is skipped, logged and listed in the
  metadata (``skipped_corrupt``).
* ``file_format='array_record'`` (a TFDS builder argument) writes ArrayRecord files for random
  access, e.g. ``mobilevis data prepare imagenet22k --file-format array_record``.

Cost: each split streams the whole archive once (train and validation are generated separately).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import re
import tarfile

import tensorflow_datasets as tfds

from mobilevis_jax.data.image_check import CorruptImageError, checked_jpeg

log = logging.getLogger(__name__)

_SYNSET_TAR = re.compile(r"^(?:.*/)?(n\d{8})\.tar$")


@dataclasses.dataclass(eq=False)
class Imagenet22kConfig(tfds.core.BuilderConfig):
  archive: str = ""
  val_per_class: int = 2


def _val_names(names: list[str], val_per_class: int) -> set[str]:
  """The held-out file names of one synset (see the module docstring)."""
  k = min(val_per_class, len(names) // 2)
  ranked = sorted(names, key=lambda n: (hashlib.md5(n.encode()).hexdigest(), n))
  return set(ranked[:k])


def list_synsets(archive_path: str) -> list[str]:
  """Sorted synset ids of the inner tars of a release archive (one pass over the tar headers)."""
  synsets = set()
  with tarfile.open(archive_path, mode="r:*") as tar:
    for member in tar:
      m = _SYNSET_TAR.match(member.name)
      if m and member.isfile():
        synsets.add(m.group(1))
  if not synsets:
    raise ValueError(f"{archive_path} holds no per-synset tars named like n01440764.tar")
  return sorted(synsets)


class Imagenet22k(tfds.core.GeneratorBasedBuilder):
  """ImageNet-21k (fall11 / winter21) from the release tar of per-synset tars."""

  name = "imagenet22k"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      Imagenet22kConfig(name="fall11", archive="fall11_whole.tar",
                        description="Fall 2011 release, 21,841 synsets."),
      Imagenet22kConfig(name="winter21", archive="winter21_whole.tar.gz",
                        description="Winter 2021 release (filtered), 19,167 synsets."),
  ]
  DEFAULT_CONFIG_NAME = "fall11"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Place the release archive in manual_dir: fall11_whole.tar (config fall11) or
  winter21_whole.tar.gz (config winter21), from https://image-net.org/download-images.
  """

  def __init__(self, *, skip_corrupt: bool = False, **kwargs: object) -> None:
    self._skip_corrupt = skip_corrupt
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            # Names are set in _split_generators from the archive (they depend on the release).
            "label": tfds.features.ClassLabel(),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://image-net.org/",
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    archive = os.path.join(dl_manager.manual_dir, self.builder_config.archive)
    if not os.path.exists(archive):
      raise FileNotFoundError(
          f"imagenet22k/{self.builder_config.name}: {archive} not found. "
          + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    synsets = list_synsets(archive)
    self.info.features["label"].names = synsets
    self.info.metadata["release"] = self.builder_config.name
    self.info.metadata["archive"] = os.path.basename(archive)
    self.info.metadata["num_classes"] = len(synsets)
    self.info.metadata["validation_rule"] = (
        f"per synset, the min({self.builder_config.val_per_class}, n//2) file names with the "
        "smallest MD5 hex digests")
    self.info.metadata["skipped_corrupt"] = []
    return {
        "train": self._generate_examples(archive, validation=False),
        "validation": self._generate_examples(archive, validation=True),
    }

  def _generate_examples(self, archive: str, validation: bool):
    skipped = self.info.metadata["skipped_corrupt"]
    with tarfile.open(archive, mode="r|*") as outer:
      for member in outer:
        m = _SYNSET_TAR.match(member.name)
        if not (m and member.isfile()):
          continue
        synset = m.group(1)
        # A synset tar is at most a few hundred MB; reading it into memory lets us choose the
        # held-out names before emitting anything.
        inner_bytes = outer.extractfile(member).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:") as inner:
          files = [(i.name, i) for i in inner.getmembers() if i.isfile()]
          held_out = _val_names([os.path.basename(n) for n, _ in files],
                                self.builder_config.val_per_class)
          for path, info in files:
            fname = os.path.basename(path)
            if (fname in held_out) != validation:
              continue
            where = f"{os.path.basename(archive)}:{member.name}/{path}"
            try:
              image = checked_jpeg(inner.extractfile(info).read(), where)
            except CorruptImageError as e:
              if not self._skip_corrupt:
                raise
              log.warning("skipping corrupt image (%d so far): %s", len(skipped) + 1, e)
              skipped.append(where)
              continue
            yield fname, {"image": io.BytesIO(image), "label": synset, "file_name": fname}
