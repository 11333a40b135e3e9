"""TFDS builders on generated archives: imagenet2012 (TFDS's own), imagenet22k, mobilevis_digits."""
import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from mobilevis_jax import data
from mobilevis_jax.data import cli, fake_archives, imagenet22k_builder, sources
from tests.data.conftest import data_cfg

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")


def _records(builder, split):
  """Every example of a split, image left encoded (works for TFRecord and ArrayRecord builds)."""
  ds, _ = sources.eval_records(builder, split, process_index=0, process_count=1)
  features = builder.info.features
  ds = ds.map(lambda r: features.deserialize_example(
      r, decoders={"image": tfds.decode.SkipDecoding()}))
  return list(ds.as_numpy_iterator())


def test_digits_stats_cli_prints_json_last_line(digits_dir, capsys):
  assert cli.main(["stats", "mobilevis_digits", "--data-dir", digits_dir]) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(last) == {"splits": {"train": 1437, "validation": 360}, "num_classes": 10}


def test_imagenet2012_builder_on_fake_tars(ilsvrc):
  builder = sources.get_builder("imagenet2012", data_dir=ilsvrc["data_dir"])
  layout = ilsvrc["layout"]
  n_train = sum(len(v) for v in layout["train"].values())
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      "train": n_train, "validation": 5}
  names = builder.info.features["label"].names
  train = _records(builder, "train")
  for ex in train:
    fname = ex["file_name"].decode()
    assert names[ex["label"]] == fname.split("_")[0]
    img = tf.io.decode_jpeg(ex["image"]).numpy()  # every record is a real JPEG (PNG converted)
    assert img.shape == (375, 500, 3)
  by_name = {ex["file_name"].decode(): ex for ex in train}
  assert set(by_name) >= {fake_archives.CMYK_TRAIN_FILE[1], fake_archives.PNG_TRAIN_FILE[1]}
  # The CMYK specimen was converted to RGB with the right colours (not inverted).
  src = fake_archives.random_image(np.random.default_rng(0), 8, 8)  # noqa: F841 (layout only)
  cmyk = by_name[fake_archives.CMYK_TRAIN_FILE[1]]
  rgb = tf.io.decode_jpeg(cmyk["image"]).numpy().astype(np.float32)
  assert 40 < rgb.mean() < 215
  # Validation labels come from TFDS's validation_labels.txt in sorted file-name order.
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common
  with open(imagenet_common.tfds.core.tfds_path(imagenet_common._VALIDATION_LABELS_FNAME)) as f:
    expected = f.read().split()[:5]
  val = {ex["file_name"].decode(): names[ex["label"]] for ex in _records(builder, "validation")}
  assert [val[n] for n in sorted(val)] == expected


def test_imagenet2012_pipeline_batches(ilsvrc):
  cfg = data_cfg("imagenet2012", ilsvrc["data_dir"], image_size=64,
                 randaugment="rand-m9-mstd0.5-inc1", random_erasing=0.25, shuffle_buffer=16)
  batch = next(data.train_iterator(cfg, global_batch_size=4, seed=0, process_index=0,
                                   process_count=1))
  assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32
  names = sources.get_builder("imagenet2012", data_dir=ilsvrc["data_dir"]).info.features[
      "label"].names
  assert {names[i] for i in batch["label"]} <= set(ilsvrc["layout"]["train"])
  # ImageNet normalisation: roughly within [-2.2, 2.7] (erased pixels are N(0, 1)).
  assert -6 < batch["image"].min() < 0 < batch["image"].max() < 6
  ev = list(data.eval_iterator(cfg, global_batch_size=4, process_index=0, process_count=1))
  assert [b["image"].shape for b in ev] == [(4, 64, 64, 3)] * 2
  assert ev[1]["mask"].tolist() == [1.0, 0.0, 0.0, 0.0]
  assert data.dataset_info(cfg)["num_classes"] == 1000


def _make_22k(tmp_path, **kw):
  manual = str(tmp_path / "manual")
  layout = fake_archives.write_imagenet21k(manual, **kw)
  return manual, layout


def test_imagenet22k_builder_classes_split_and_array_record(tmp_path):
  manual, layout = _make_22k(tmp_path)
  d = str(tmp_path / "tfds")
  assert cli.main(["prepare", "imagenet22k", "--manual-dir", manual, "--data-dir", d,
                   "--file-format", "array_record"]) == 0
  builder = sources.get_builder("imagenet22k", data_dir=d)
  names = builder.info.features["label"].names
  assert names == sorted(layout)  # the class list is recorded with the data
  assert builder.info.metadata["release"] == "fall11"
  assert builder.info.metadata["num_classes"] == len(layout)
  assert os.path.exists(os.path.join(builder.data_dir, "label.labels.txt"))
  # Held-out rule: per synset, the 2 names with the smallest md5 digests.
  expected_val = set()
  for files in layout.values():
    expected_val |= set(sorted(files, key=lambda n: hashlib.md5(n.encode()).hexdigest())[:2])
  val = {ex["file_name"].decode() for ex in _records(builder, "validation")}
  train = {ex["file_name"].decode() for ex in _records(builder, "train")}
  assert val == expected_val and not (val & train)
  assert val | train == {n for files in layout.values() for n in files}
  # The PNG and the CMYK file were re-encoded as RGB JPEGs.
  for ex in _records(builder, "train") + _records(builder, "validation"):
    with Image.open(io.BytesIO(ex["image"])) as im:
      assert (im.format, im.mode) == ("JPEG", "RGB")
  # The pipeline reads the ArrayRecord build (random-access path).
  cfg = data_cfg("imagenet22k", d, image_size=32)
  batch = next(data.train_iterator(cfg, global_batch_size=4, seed=1, process_index=0,
                                   process_count=1))
  assert batch["image"].shape == (4, 32, 32, 3)
  assert set(batch["label"].tolist()) <= set(range(len(layout)))
  # Reloading from the directory alone restores the class list.
  reloaded = tfds.builder_from_directory(builder.data_dir)
  assert reloaded.info.features["label"].names == names


def test_imagenet22k_truncated_jpeg_error_names_the_file(tmp_path):
  manual, _ = _make_22k(tmp_path, corrupt_file="n00005787_3.JPEG")
  with pytest.raises(data.CorruptImageError, match="n00005787.tar/n00005787_3.JPEG"):
    sources.prepare("imagenet22k", data_dir=str(tmp_path / "a"), manual_dir=manual)
  builder = sources.prepare("imagenet22k", data_dir=str(tmp_path / "b"), manual_dir=manual,
                            skip_corrupt=True)
  skipped = builder.info.metadata["skipped_corrupt"]
  assert len(skipped) == 1 and skipped[0].endswith("n00005787.tar/n00005787_3.JPEG")
  total = sum(s.num_examples for s in builder.info.splits.values())
  assert total == 3 * 6 + 2 - 1


def test_list_synsets_rejects_a_wrong_archive(tmp_path):
  bad = tmp_path / "fall11_whole.tar"
  import tarfile
  with tarfile.open(bad, "w") as t:
    info = tarfile.TarInfo("readme.txt")
    t.addfile(info, io.BytesIO(b""))
  with pytest.raises(ValueError, match="no per-synset tars"):
    imagenet22k_builder.list_synsets(str(bad))
