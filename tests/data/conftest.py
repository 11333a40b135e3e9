"""Datasets the data tests build once per session (all from generated files, nothing downloaded)."""
import pytest

from mobilevis_jax import data  # first: it orders the native-library loads (see data/__init__)
from mobilevis_jax.data import fake_archives, sources


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds_digits"))
  sources.prepare("mobilevis_digits", data_dir=d)
  return d


@pytest.fixture(scope="session")
def ilsvrc(tmp_path_factory):
  """Fake ILSVRC2012 tars run through TFDS's own ``imagenet2012`` builder."""
  manual = str(tmp_path_factory.mktemp("ilsvrc_manual"))
  d = str(tmp_path_factory.mktemp("tfds_in1k"))
  layout = fake_archives.write_ilsvrc2012(manual, images_per_class=2, num_val=5)
  from mobilevis_jax.data import cli
  assert cli.main(["prepare", "imagenet2012", "--manual-dir", manual, "--data-dir", d]) == 0
  return {"data_dir": d, "manual_dir": manual, "layout": layout}


def data_cfg(name, data_dir, **overrides):
  cfg = data.default_data_config()
  cfg.name = name
  cfg.data_dir = data_dir
  for k, v in overrides.items():
    cfg[k] = v
  return cfg
