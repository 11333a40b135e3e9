"""Bad PyTorch inputs are refused with errors that name the problem.

A missing, an unexpected and a misshaped key each raise ``StateDictError`` naming that key; a
``.pth`` whose pickle would run code is refused and the code does not run. RepViT-M0.6 is the
guinea pig (the checks themselves are the family-independent ones in ``interop.state_dict``).
"""
import os

import jax
import numpy as np
import pytest

from mobilevis_jax import create_model
from mobilevis_jax.interop import (
  StateDictError,
  from_torch_state_dict,
  load_state_dict,
  save_state_dict,
  to_torch_state_dict,
)
from tests.helpers import abstract_variables

NAME = "repvit_m0_6"


@pytest.fixture(scope="module")
def state_dict():
  """A complete official-layout state_dict (zeros: only names and shapes matter here)."""
  model = create_model(NAME)
  model_shapes = abstract_variables(model, 32)
  zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), model_shapes)
  return to_torch_state_dict(NAME, zeros)


def test_valid_state_dict_loads(state_dict):
  assert len(state_dict) == 469  # the official M0.6: 476 keys with two heads, 7 fewer with one
  from_torch_state_dict(NAME, state_dict)


def test_missing_key_is_named(state_dict):
  sd = dict(state_dict)
  del sd["features.5.token_mixer.0.conv1.bias"]
  with pytest.raises(StateDictError, match=r"missing keys \(1\).*features\.5\.token_mixer\.0\.conv1\.bias"):
    from_torch_state_dict(NAME, sd)


def test_unexpected_key_is_named(state_dict):
  sd = dict(state_dict, **{"features.99.token_mixer.0.weight": np.zeros((3,), np.float32)})
  with pytest.raises(StateDictError, match=r"unexpected keys \(1\).*features\.99\.token_mixer\.0\.weight"):
    from_torch_state_dict(NAME, sd)


def test_wrong_shape_is_named(state_dict):
  sd = dict(state_dict)
  sd["classifier.classifier.l.weight"] = np.zeros((10, 320), np.float32)
  with pytest.raises(StateDictError, match=r"classifier\.classifier\.l\.weight.*\(10, 320\).*\(1000, 320\)"):
    from_torch_state_dict(NAME, sd)


def test_distillation_mismatch_is_explained(state_dict):
  # A one-head checkpoint into a two-head model: the head_dist keys are reported missing.
  with pytest.raises(StateDictError, match=r"classifier\.classifier_dist\.l\.weight"):
    from_torch_state_dict(NAME, state_dict, distillation=True)


def test_unknown_layout_and_file_type(state_dict, tmp_path):
  with pytest.raises(ValueError, match="no 'caffe' PyTorch layout"):
    from_torch_state_dict(NAME, state_dict, layout="caffe")
  with pytest.raises(ValueError, match="unknown weight file type"):
    save_state_dict(state_dict, tmp_path / "weights.npz")


class _Payload:
  """Unpickling this calls ``os.mkdir(marker)``: a stand-in for arbitrary code execution."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


def test_malicious_pth_is_refused_and_not_executed(tmp_path):
  torch = pytest.importorskip("torch")
  marker = str(tmp_path / "payload_ran")
  path = tmp_path / "evil.pth"
  torch.save({"model": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, path)
  with pytest.raises(StateDictError, match="refusing to load"):
    load_state_dict(path)
  assert not os.path.exists(marker)
  # The payload is live: an unsafe load (what we never do) runs it.
  torch.load(path, weights_only=False)
  assert os.path.exists(marker)
