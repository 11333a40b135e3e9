"""imagenet22k prepared on Apache Beam (DirectRunner, 2 worker processes) equals the plain build."""
import json

import pytest

from mobilevis_jax.data import cli, fake_archives, sources

pytest.importorskip("apache_beam")
tfds = pytest.importorskip("tensorflow_datasets")

CORRUPT = "n00005787_3.JPEG"


def _records(builder, split):
  """{file name: (label name, image bytes)} of a split, and the file names in record order."""
  ds, _ = sources.eval_records(builder, split, process_index=0, process_count=1)
  features = builder.info.features
  ds = ds.map(lambda r: features.deserialize_example(
      r, decoders={"image": tfds.decode.SkipDecoding()}))
  names = features["label"].names
  out, order = {}, []
  for ex in ds.as_numpy_iterator():
    fname = ex["file_name"].decode()
    assert fname not in out
    out[fname] = (names[ex["label"]], ex["image"])
    order.append(fname)
  return out, order


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
  """The same fake release as extracted synset tars (with one truncated JPEG), prepared three ways."""
  root = tmp_path_factory.mktemp("in22k_beam")
  kw = dict(synsets=("n00004475", "n00005787", "n00006024", "n00007846"), images_per_class=5,
            size=(64, 48), corrupt_file=CORRUPT)
  layout = fake_archives.write_imagenet21k_synset_tars(str(root / "tars"), **kw)
  fake_archives.write_imagenet21k(str(root / "release"), **kw)
  plain = sources.prepare("imagenet22k", data_dir=str(root / "plain"),
                          manual_dir=str(root / "tars"), file_format="array_record",
                          skip_corrupt=True)
  assert cli.main(["prepare", "imagenet22k", "--manual-dir", str(root / "tars"), "--data-dir",
                   str(root / "beam"), "--file-format", "array_record", "--skip-corrupt",
                   "--beam-runner", "DirectRunner", "--num-workers", "2"]) == 0
  beam = sources.get_builder("imagenet22k", data_dir=str(root / "beam"))
  # The release tar (plain, read at member offsets) on Beam too, in-process (quicker).
  beam_release = sources.prepare("imagenet22k", data_dir=str(root / "beam_release"),
                                 manual_dir=str(root / "release"), file_format="array_record",
                                 skip_corrupt=True, beam_runner="DirectRunner")
  return {"layout": layout, "plain": plain, "beam": beam, "beam_release": beam_release}


def test_beam_build_equals_single_process_build(builds):
  plain, beam, layout = builds["plain"], builds["beam"], builds["layout"]
  assert beam.info.features["label"].names == plain.info.features["label"].names == sorted(layout)
  assert {k: v.num_examples for k, v in beam.info.splits.items()} == {
      k: v.num_examples for k, v in plain.info.splits.items()}
  everything = {n for names in layout.values() for n in names} - {CORRUPT}
  seen = set()
  for split in ("train", "validation"):
    p, p_order = _records(plain, split)
    b, b_order = _records(beam, split)
    assert b == p  # same file names, labels and image bytes, in the same split
    assert all(label == fname.split("_")[0] for fname, (label, _) in p.items())
    # Both writers order records by the hash of their key: the same order too.
    assert b_order == p_order
    seen |= set(p)
  assert seen == everything
  for b in (plain, beam):
    assert b.info.metadata["skipped_corrupt"] == [f"n00005787.tar/{CORRUPT}"]
    assert b.info.metadata["source"] == "synset_tars"
  # The Beam pipeline's side file is not left in the dataset directory.
  assert not list(beam.data_path.glob("*.json.*")) and not (
      beam.data_path / "skipped_corrupt.beam.json").exists()
  meta = json.loads((beam.data_path / "metadata.json").read_text())
  assert meta["skipped_corrupt"] == [f"n00005787.tar/{CORRUPT}"]


def test_beam_build_from_the_release_tar(builds):
  plain, rel = builds["plain"], builds["beam_release"]
  assert rel.info.metadata["source"] == "release_tar"
  assert rel.info.metadata["skipped_corrupt"] == [f"fall11_whole.tar:n00005787.tar/{CORRUPT}"]
  for split in ("train", "validation"):
    assert _records(rel, split)[0] == _records(plain, split)[0]


def test_beam_options_are_checked():
  with pytest.raises(ValueError, match="only imagenet22k"):
    sources.prepare("mobilevis_digits", beam_runner="DirectRunner")
  with pytest.raises(ValueError, match="need a beam_runner"):
    sources.prepare("imagenet22k", num_workers=2)
  with pytest.raises(ValueError, match="runner's own worker option"):
    sources.beam_pipeline_options("DataflowRunner", num_workers=4)
  opts = sources.beam_pipeline_options("DirectRunner", 3, ["--direct_runner_bundle_repeat=0"])
  direct = opts.get_all_options()
  assert direct["direct_running_mode"] == "multi_processing" and direct["direct_num_workers"] == 3


def test_beam_build_from_a_gzip_release_tar_and_corrupt_error(builds, tmp_path):
  """A gzip archive has no offsets: one reader streams it, workers decode (in-process runner)."""
  kw = dict(synsets=("n00004475", "n00005787", "n00006024", "n00007846"), images_per_class=5,
            size=(64, 48), corrupt_file=CORRUPT)
  manual = str(tmp_path / "gz")
  fake_archives.write_imagenet21k(manual, archive="winter21_whole.tar.gz", **kw)
  gz = sources.prepare("imagenet22k", data_dir=str(tmp_path / "tfds"), manual_dir=manual,
                       builder_config="winter21", skip_corrupt=True, beam_runner="DirectRunner")
  assert gz.info.metadata["skipped_corrupt"] == [
      f"winter21_whole.tar.gz:n00005787.tar/{CORRUPT}"]
  for split in ("train", "validation"):
    assert _records(gz, split)[0] == _records(builds["plain"], split)[0]
  # Without skip_corrupt the Beam build fails naming the file, as the single-process one does.
  with pytest.raises(Exception, match=f"n00005787.tar/{CORRUPT}"):
    sources.prepare("imagenet22k", data_dir=str(tmp_path / "tfds2"), manual_dir=manual,
                    builder_config="winter21", beam_runner="DirectRunner")


def test_missing_source_names_both_layouts(tmp_path):
  with pytest.raises(FileNotFoundError, match="fall11_whole.tar nor per-synset tars"):
    sources.prepare("imagenet22k", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path))
