"""``imagenet22k``: a TFDS builder for the full ImageNet-21k ("22K") release, which TFDS lacks.

Sources (``manual_dir``), either layout of the same release:

* the release archive as distributed, a tar of per-synset tars of JPEGs: ``fall11_whole.tar``
  (builder config ``fall11``, 21,841 synsets) or ``winter21_whole.tar.gz`` (``winter21``, 19,167
  synsets after the 2021 filtering). Inner members are ``n01440764.tar`` holding
  ``n01440764_10026.JPEG`` etc. Gzip or plain tars are both read;
* or the per-synset tars extracted from it (``n01440764.tar``, ...) directly in ``manual_dir``,
  the layout most users keep. If both are present the extracted tars are used (they need no
  archive index) and the choice is logged and recorded in the metadata (``source``).

Rules (the same for every source and for both preparation paths below):

* Classes: the sorted synset ids found in the source (tars named ``n\\d{8}.tar``). They are
  recorded in the prepared dataset (``label.labels.txt`` next to the records and in
  ``metadata.json`` together with the release name and its class count), so a model trained on one
  release can never be silently paired with another release's label ids.
* Held-out validation split (ours; the release has none): in every synset with at least 2 images,
  the ``val_per_class`` images (default 2, at most half of the synset) whose file names have the
  smallest MD5 digests. This depends only on the file names, not on tar order, so it is the same on
  every machine. ``train`` is every other image. For fall11 this holds out ~43.7k images.
* Images are checked while preparing: CMYK / greyscale-with-alpha / PNG-under-.JPEG files are
  re-encoded as RGB JPEG; an undecodable (e.g. truncated) file raises ``CorruptImageError`` naming
  ``synset_tar/file``, or, with ``skip_corrupt=True``, is skipped, logged and listed (sorted) in the
  metadata (``skipped_corrupt``).
* ``file_format='array_record'`` (a TFDS builder argument) writes ArrayRecord files for random
  access, e.g. ``mobilevis data prepare imagenet22k --file-format array_record``.

Two ways to prepare, giving the same records (same keys, labels and splits; tested):

* Single process (no Beam runner given): each split streams the source once (train and validation
  are generated separately; only the images of the split being written are decoded).
* Apache Beam (``download_config.beam_runner`` or ``beam_options`` set; the ``beam`` extra;
  ``mobilevis data prepare imagenet22k --beam-runner DirectRunner --num-workers N``): one work item
  per synset tar, both splits in one pass (a synset's images go to train or validation as tagged
  outputs of the same step). Extracted tars and a plain release tar are read by the worker that
  processes them (a plain tar's members are located by one pass over its headers, then read at
  their offsets); a gzip archive cannot be read at an offset, so one reader streams it and hands
  the synset tars to the workers, which decode in parallel (extract it first to parallelise the
  reading too). Corrupt files skipped by the workers are collected into the same metadata list.
  TFDS's Beam writer shuffles every encoded example (by key hash, as the single-process writer
  orders them), and the DirectRunner holds a shuffle in memory: locally it suits builds whose
  encoded images fit in RAM; the full release needs a runner that spills (Dataflow, Flink, Spark).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

from mobilevis_jax.data.image_check import CorruptImageError, checked_jpeg

log = logging.getLogger(__name__)

_SYNSET_TAR = re.compile(r"^(?:.*/)?(n\d{8})\.tar$")
# Written by the Beam pipeline into the (temporary) dataset directory, read back and removed.
_BEAM_SKIPPED_FILE = "skipped_corrupt.beam.json"


@dataclasses.dataclass(eq=False)
class Imagenet22kConfig(tfds.core.BuilderConfig):
  archive: str = ""
  val_per_class: int = 2


@dataclasses.dataclass(frozen=True)
class SynsetTar:
  """One work item: a per-synset tar, as a byte range of a file.

  ``path`` is the extracted synset tar itself (``offset=0, size=-1``: the whole file) or the plain
  release tar holding it at ``offset`` (``size`` bytes). ``where`` names it in messages and in the
  ``skipped_corrupt`` list (``n01440764.tar`` or ``fall11_whole.tar:n01440764.tar``).
  """
  synset: str
  path: str
  where: str
  offset: int = 0
  size: int = -1

  def read(self) -> bytes:
    with epath.Path(self.path).open("rb") as f:
      f.seek(self.offset)
      return f.read() if self.size < 0 else f.read(self.size)


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one release lies: ``kind`` is ``'synset_tars'`` (a directory) or ``'release_tar'``.

  ``items`` are the synset tars, sorted by synset; empty for a gzip release tar (no offsets: it is
  streamed).
  """
  kind: str
  path: str
  synsets: tuple[str, ...]
  items: tuple[SynsetTar, ...]


def _val_names(names: list[str], val_per_class: int) -> set[str]:
  """The held-out file names of one synset (see the module docstring)."""
  k = min(val_per_class, len(names) // 2)
  ranked = sorted(names, key=lambda n: (hashlib.md5(n.encode()).hexdigest(), n))
  return set(ranked[:k])


def _is_gzip(path: str) -> bool:
  with epath.Path(path).open("rb") as f:
    return f.read(2) == b"\x1f\x8b"


def _index_release_tar(archive_path: str) -> tuple[list[str], list[SynsetTar]]:
  """(sorted synsets, items) of a release tar; items is empty for a gzip archive.

  A plain tar is opened seekable, so listing it reads only the 512-byte member headers.
  """
  base = os.path.basename(archive_path)
  gz = _is_gzip(archive_path)
  synsets, items = set(), []
  with epath.Path(archive_path).open("rb") as f, tarfile.open(
      fileobj=f, mode="r|gz" if gz else "r:") as tar:
    for member in tar:
      m = _SYNSET_TAR.match(member.name)
      if m and member.isfile():
        synsets.add(m.group(1))
        if not gz:
          items.append(SynsetTar(m.group(1), archive_path, f"{base}:{member.name}",
                                 member.offset_data, member.size))
  if not synsets:
    raise ValueError(f"{archive_path} holds no per-synset tars named like n01440764.tar")
  return sorted(synsets), sorted(items, key=lambda i: i.synset)


def list_synsets(archive_path: str) -> list[str]:
  """Sorted synset ids of the inner tars of a release archive (one pass over the tar headers)."""
  return _index_release_tar(archive_path)[0]


def _synset_tar_dir_items(directory: str) -> list[SynsetTar]:
  items = []
  for p in epath.Path(directory).glob("n*.tar"):
    m = _SYNSET_TAR.match(p.name)
    if m and p.is_file():
      items.append(SynsetTar(m.group(1), os.fspath(p), p.name))
  return sorted(items, key=lambda i: i.synset)


def find_source(manual_dir: str, archive_name: str) -> Source:
  """The source of a release in ``manual_dir``: its extracted synset tars, else its archive."""
  items = _synset_tar_dir_items(manual_dir)
  archive = os.path.join(manual_dir, archive_name)
  if items:
    if epath.Path(archive).exists():
      log.info("%s holds both %s and extracted synset tars; reading the extracted tars",
               manual_dir, archive_name)
    return Source("synset_tars", manual_dir, tuple(i.synset for i in items), tuple(items))
  if not epath.Path(archive).exists():
    raise FileNotFoundError(f"neither {archive} nor per-synset tars (n01440764.tar, ...) found "
                            f"in {manual_dir}")
  synsets, items = _index_release_tar(archive)
  return Source("release_tar", archive, tuple(synsets), tuple(items))


def synset_examples(data: bytes, item: SynsetTar, *, val_per_class: int, skip_corrupt: bool,
                    split: str | None = None) -> Iterator[tuple[str, str, dict | None]]:
  """The examples of one synset tar: ``(split, key, example)``, and ``('skipped', where, None)``.

  ``split`` given: only that split's images are decoded and yielded (the single-process path,
  which writes one split at a time). ``where`` is ``<item.where>/<file>``.
  """
  with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as inner:
    files = [i for i in inner.getmembers() if i.isfile()]
    held_out = _val_names([os.path.basename(i.name) for i in files], val_per_class)
    for info in files:
      fname = os.path.basename(info.name)
      this_split = "validation" if fname in held_out else "train"
      if split is not None and this_split != split:
        continue
      where = f"{item.where}/{info.name}"
      try:
        image = checked_jpeg(inner.extractfile(info).read(), where)
      except CorruptImageError as e:
        if not skip_corrupt:
          raise
        log.warning("skipping corrupt image: %s", e)
        yield "skipped", where, None
        continue
      yield this_split, fname, {"image": io.BytesIO(image), "label": item.synset,
                                "file_name": fname}


def _stream_release_tar(archive_path: str) -> Iterator[tuple[SynsetTar, bytes]]:
  """The synset tars of a release archive in archive order, read as one stream (gzip or plain)."""
  base = os.path.basename(archive_path)
  with epath.Path(archive_path).open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as outer:
    for member in outer:
      m = _SYNSET_TAR.match(member.name)
      if m and member.isfile():
        # A synset tar is at most a few hundred MB; reading it into memory lets us choose the
        # held-out names before emitting anything.
        yield (SynsetTar(m.group(1), archive_path, f"{base}:{member.name}"),
               outer.extractfile(member).read())


# The Beam steps (module-level functions: the workers unpickle them by reference).

def _beam_examples(item_and_data: tuple[SynsetTar, bytes | None], val_per_class: int,
                   skip_corrupt: bool):
  from apache_beam import pvalue
  item, data = item_and_data
  for split, key, example in synset_examples(
      item.read() if data is None else data, item, val_per_class=val_per_class,
      skip_corrupt=skip_corrupt):
    if split == "train":
      yield key, example
    else:
      yield pvalue.TaggedOutput(split, key if example is None else (key, example))


def _beam_write_skipped(skipped: list[str], path: str) -> None:
  epath.Path(path).write_text(json.dumps(sorted(skipped)))


class Imagenet22k(tfds.core.GeneratorBasedBuilder):
  """ImageNet-21k (fall11 / winter21) from the release tar or its extracted per-synset tars."""

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
  winter21_whole.tar.gz (config winter21), from https://image-net.org/download-images;
  or the per-synset tars extracted from it (n01440764.tar, ...) directly in manual_dir.
  """

  def __init__(self, *, skip_corrupt: bool = False, **kwargs: object) -> None:
    self._skip_corrupt = skip_corrupt
    self._use_beam = False
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

  def _download_and_prepare(self, dl_manager, download_config) -> None:
    # Beam only when asked for: TFDS would create a pipeline for every build if _split_generators
    # took a `pipeline` argument, so the Beam variant is chosen here from the download config.
    self._use_beam = (download_config.beam_runner is not None
                      or download_config.beam_options is not None)
    super()._download_and_prepare(dl_manager, download_config)
    # (Absent when TFDS generated nothing, e.g. max_examples_per_split=0.)
    skipped = self.info.metadata.get("skipped_corrupt", [])
    path = self.data_path / _BEAM_SKIPPED_FILE
    if self._use_beam and path.exists():
      skipped = json.loads(path.read_text())
      path.unlink()
    self.info.metadata["skipped_corrupt"] = sorted(skipped)
    if skipped:
      log.warning("imagenet22k: skipped %d corrupt images (listed in metadata.json)", len(skipped))

  def _generate_splits(self, dl_manager, download_config):
    if self._use_beam:
      # TFDS passes its Beam pipeline to a _split_generators whose signature names `pipeline`.
      self._split_generators = self._beam_split_generators
    try:
      return super()._generate_splits(dl_manager, download_config)
    finally:
      self.__dict__.pop("_split_generators", None)

  def _source(self, dl_manager) -> Source:
    try:
      source = find_source(os.fspath(dl_manager.manual_dir), self.builder_config.archive)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"imagenet22k/{self.builder_config.name}: {e}. "
                              + self.MANUAL_DOWNLOAD_INSTRUCTIONS) from e
    self.info.features["label"].names = list(source.synsets)
    self.info.metadata["release"] = self.builder_config.name
    self.info.metadata["source"] = source.kind
    self.info.metadata["archive"] = (os.path.basename(source.path)
                                     if source.kind == "release_tar" else "")
    self.info.metadata["num_classes"] = len(source.synsets)
    self.info.metadata["validation_rule"] = (
        f"per synset, the min({self.builder_config.val_per_class}, n//2) file names with the "
        "smallest MD5 hex digests")
    self.info.metadata["skipped_corrupt"] = []
    return source

  def _split_generators(self, dl_manager):
    source = self._source(dl_manager)
    return {split: self._generate_examples(source, split) for split in ("train", "validation")}

  def _generate_examples(self, source: Source, split: str):
    skipped = self.info.metadata["skipped_corrupt"]
    tars = (_stream_release_tar(source.path) if source.kind == "release_tar"
            else ((item, item.read()) for item in source.items))
    for item, data in tars:
      for _, key, example in synset_examples(
          data, item, val_per_class=self.builder_config.val_per_class,
          skip_corrupt=self._skip_corrupt, split=split):
        if example is None:
          skipped.append(key)
        else:
          yield key, example

  def _beam_split_generators(self, dl_manager, pipeline):
    beam = tfds.core.lazy_imports.apache_beam
    source = self._source(dl_manager)
    if source.items:
      # Work items are byte ranges: each worker reads the synset tars it is given.
      tars = (pipeline
              | "SynsetTars" >> beam.Create([(item, None) for item in source.items])
              | "Distribute" >> beam.Reshuffle())
    else:
      tars = (pipeline
              | "Archive" >> beam.Create([source.path])
              | "StreamArchive" >> beam.FlatMap(_stream_release_tar)
              | "Distribute" >> beam.Reshuffle())
    outputs = tars | "Examples" >> beam.FlatMap(
        _beam_examples, val_per_class=self.builder_config.val_per_class,
        skip_corrupt=self._skip_corrupt).with_outputs("validation", "skipped", main="train")
    _ = (outputs.skipped
         | "CollectSkipped" >> beam.combiners.ToList()
         | "WriteSkipped" >> beam.Map(_beam_write_skipped,
                                      path=os.fspath(self.data_path / _BEAM_SKIPPED_FILE)))
    return {"train": outputs.train, "validation": outputs.validation}
