"""``interop.onnx_export.export_onnx`` / ``mobilevis export --format onnx``.

The smallest model of every family (``export_cases.CASES``), random variables by shape, at tiny
resolutions (ParC-Net and ParC-MobileNetV2 non-square): ONNX Runtime gives the JAX eval logits to
1e-4 of max |logit| from the fused, ParC-baked NCHW graph, with a dynamic batch axis (batch 2;
ParameterNet batch 1, see export_cases.ONNX_STATIC_BATCH).
Then NHWC input through the CLI, and the bad inputs, each a clear error with nothing at the path.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mobilevis_jax import cli, interop
from tests.interop.export_cases import (
  CASES,
  ONNX_LEFT_OUT,
  ONNX_STATIC_BATCH,
  family_cases,
  jax_logits,
  onnx_logits,
  random_variables,
  rel_err,
)

pytest.importorskip("jax2onnx")
ort = pytest.importorskip("onnxruntime")
from mobilevis_jax.interop.onnx_export import export_onnx, read_metadata  # noqa: E402


class Exported:
  """Random variables of ``name``, its JAX eval logits on a batch of 2 and the ONNX file."""

  def __init__(self, name: str, directory):
    self.name = name
    self.resolution, self.kwargs = CASES[name]
    self.variables = random_variables(name, self.resolution, **self.kwargs)
    self.x = np.random.RandomState(1).rand(2, *self.resolution, 3).astype(np.float32)
    self.logits = jax_logits(name, self.variables, self.x, **self.kwargs)
    self.path = os.path.join(directory, f"{name}.onnx")
    self.dynamic = name not in ONNX_STATIC_BATCH
    self.info = export_onnx(name, self.variables, self.path, resolution=self.resolution,
                            dynamic_batch=self.dynamic, **self.kwargs)

  def run(self, path=None, x=None) -> np.ndarray:
    if x is None:
      x = self.x.transpose(0, 3, 1, 2)
    return onnx_logits(path or self.path, x, self.dynamic)


_EXPORTED: dict[str, Exported] = {}


def _exported(name: str, tmp_path_factory) -> Exported:
  # One JAX compile and one conversion per model for the whole module.
  if name not in _EXPORTED:
    _EXPORTED[name] = Exported(name, tmp_path_factory.mktemp(name))
  return _EXPORTED[name]


# ParC-ConvNeXt and ParC-ResNet50 are exported with the rest of the zoo (test_export_zoo.py).
ONNX_CASES = [n for n in family_cases() if n not in ONNX_LEFT_OUT]


@pytest.fixture(scope="module", params=ONNX_CASES)
def exported(request, tmp_path_factory):
  return _exported(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def ghostnet(tmp_path_factory):
  return _exported("ghostnet_050", tmp_path_factory)


def _listing(directory) -> list[str]:
  return sorted(os.listdir(directory))


def test_onnx_runtime_matches_jax(exported):
  # Batch 2 through the dynamic batch axis of an NCHW graph.
  got = exported.run()
  assert got.shape == exported.logits.shape
  err = rel_err(got, exported.logits)
  assert err <= 1e-4, f"{exported.name}: max |onnx - jax| / max |jax| = {err:.2e}"
  sess = ort.InferenceSession(exported.path, providers=["CPUExecutionProvider"])
  (inp,) = sess.get_inputs()
  h, w = exported.resolution
  assert inp.name == "images" and inp.shape[1:] == [3, h, w]
  assert isinstance(inp.shape[0], str) if exported.dynamic else inp.shape[0] == 1
  meta = read_metadata(exported.path)
  from mobilevis_jax.models import registry
  family = registry.model_info(exported.name).family
  assert meta["mobilevis_model"] == exported.name and meta["resolution"] == f"{h}x{w}"
  assert meta["layout"] == "nchw" and meta["fused"] == str(family == "repvit").lower()
  assert meta["parc_baked"] == str(family in ("parcnet", "parc_convnets")).lower()
  assert json.loads(meta["pretrained_cfg"])["input_size"][0] == 3


def test_fused_graph_has_no_batchnorm(tmp_path_factory):
  import onnx
  exported = _exported("repvit_m0_6", tmp_path_factory)
  ops = {n.op_type for n in onnx.load(exported.path).graph.node}
  assert "BatchNormalization" not in ops and "Conv" in ops


def test_baked_parc_graph_has_no_fft(tmp_path_factory):
  import onnx
  exported = _exported("parcnet_xs", tmp_path_factory)
  ops = {n.op_type for n in onnx.load(exported.path).graph.node}
  assert not ops & {"DFT", "STFT"}, ops


def test_cli_exports_nhwc(ghostnet, tmp_path):
  from mobilevis_jax.train.checkpoint import save_variables
  ckpt = tmp_path / "ckpt"
  save_variables(str(ckpt), ghostnet.variables, model_name="ghostnet_050",
                 extra={"model_kwargs": {}})
  out = tmp_path / "g.onnx"
  assert cli.main(["export", "--model", "ghostnet_050", "--checkpoint", str(ckpt), "--format",
                   "onnx", "--layout", "nhwc", "--resolution", "32", "--out", str(out)]) == 0
  sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
  assert sess.get_inputs()[0].shape[1:] == [32, 32, 3]
  assert rel_err(ghostnet.run(str(out), ghostnet.x), ghostnet.logits) <= 1e-4
  assert read_metadata(out)["layout"] == "nhwc"
  # A PyTorch key layout is not an input layout.
  with pytest.raises(SystemExit, match="nchw or nhwc, not 'timm'"):
    cli.main(["export", "--model", "ghostnet_050", "--checkpoint", str(ckpt), "--format", "onnx",
              "--layout", "timm", "--out", str(tmp_path / "t.onnx")])
  assert not (tmp_path / "t.onnx").exists()


@pytest.mark.parametrize("method", ["fft", "fft2", "auto"])
def test_fft_parc_is_refused(method, tmp_path):
  from tests.helpers import abstract_variables
  variables = abstract_variables("parcnet_xs", 64)
  with pytest.raises(ValueError, match=f"parc_method='{method}' cannot be exported to ONNX: "
                                       "phone runtimes have no inverse real FFT"):
    export_onnx("parcnet_xs", variables, tmp_path / "p.onnx", resolution=64, parc_method=method)
  assert _listing(tmp_path) == []


def test_variables_of_another_model_are_refused(ghostnet, tmp_path):
  with pytest.raises(interop.StateDictError, match="not those of regnety_002: .* missing"):
    export_onnx("regnety_002", ghostnet.variables, tmp_path / "r.onnx", resolution=32)
  assert _listing(tmp_path) == []


def test_bad_paths_and_options(ghostnet, tmp_path):
  with pytest.raises(FileNotFoundError, match="missing"):
    export_onnx("ghostnet_050", ghostnet.variables, tmp_path / "missing" / "g.onnx")
  with pytest.raises(ValueError, match=r"must end in \.onnx"):
    export_onnx("ghostnet_050", ghostnet.variables, tmp_path / "g.tflite")
  with pytest.raises(ValueError, match="layout must be one of"):
    export_onnx("ghostnet_050", ghostnet.variables, tmp_path / "g.onnx", layout="chw")
  # parc_convnext_xt's VALID stem and downsamples leave nothing of a 16 px input (the error
  # comes before any weight is read, so abstract variables suffice).
  from tests.helpers import abstract_variables
  with pytest.raises(ValueError, match="parc_convnext_xt cannot take a 16x16 input"):
    export_onnx("parc_convnext_xt", abstract_variables("parc_convnext_xt", 224),
                tmp_path / "p.onnx", resolution=16)
  assert _listing(tmp_path) == []


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
  from mobilevis_jax import fs
  out = tmp_path / "g.onnx"
  out.write_bytes(b"previous")

  def fail(src, dst):
    assert open(src, "rb").read() == b"new"  # written in full under a temporary name first
    raise OSError("disk full")

  monkeypatch.setattr(fs.os, "replace", fail)
  with pytest.raises(OSError, match="disk full"):
    fs.write_bytes_atomic(str(out), b"new")
  assert out.read_bytes() == b"previous" and _listing(tmp_path) == ["g.onnx"]
