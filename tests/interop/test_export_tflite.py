"""``interop.tflite_export.export_tflite`` / ``mobilevis export --format tflite``.

The smallest model of every family (``export_cases.CASES``), random variables by shape, at tiny
resolutions (ParC-Net and ParC-MobileNetV2 non-square): the LiteRT interpreter gives the JAX eval
logits to 1e-4 of max |logit| from the fused, ParC-baked float32 file. Then float16 weights and
full-integer int8 (calibrated on digits images from the data pipeline, through the CLI) on
GhostNet-0.5, and the bad inputs, each a clear error with nothing left at the output path.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from mobilevis_jax import cli, interop
from tests.interop.export_cases import (
  CASES,
  family_cases,
  jax_logits,
  litert_logits,
  random_variables,
  rel_err,
)

pytest.importorskip("tensorflow")
from mobilevis_jax.interop import tflite_export  # noqa: E402
from mobilevis_jax.interop.tflite_export import export_tflite  # noqa: E402


class Exported:
  """Random variables of ``name``, its JAX eval logits on two images and the fp32 file."""

  def __init__(self, name: str, directory):
    self.name = name
    self.resolution, self.kwargs = CASES[name]
    self.variables = random_variables(name, self.resolution, **self.kwargs)
    self.x = np.random.RandomState(1).rand(2, *self.resolution, 3).astype(np.float32)
    self.logits = jax_logits(name, self.variables, self.x, **self.kwargs)
    self.path = os.path.join(directory, f"{name}.tflite")
    self.info = export_tflite(name, self.variables, self.path, resolution=self.resolution,
                              **self.kwargs)


_EXPORTED: dict[str, Exported] = {}


def _exported(name: str, tmp_path_factory) -> Exported:
  # One JAX compile and one conversion per model for the whole module.
  if name not in _EXPORTED:
    _EXPORTED[name] = Exported(name, tmp_path_factory.mktemp(name))
  return _EXPORTED[name]


@pytest.fixture(scope="module", params=family_cases())
def exported(request, tmp_path_factory):
  return _exported(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def ghostnet(tmp_path_factory):
  return _exported("ghostnet_050", tmp_path_factory)


def _listing(directory) -> list[str]:
  return sorted(os.listdir(directory))


def test_litert_matches_jax(exported):
  got = litert_logits(exported.path, exported.x)
  assert got.shape == exported.logits.shape
  err = rel_err(got, exported.logits)
  assert err <= 1e-4, f"{exported.name}: max |tflite - jax| / max |jax| = {err:.2e}"
  from mobilevis_jax.models import registry
  family = registry.model_info(exported.name).family
  h, w = exported.resolution
  info = exported.info
  assert info["input_shape"] == [1, h, w, 3] and info["quantize"] is None
  assert info["fused"] == str(family == "repvit").lower()
  assert info["bytes"] == os.path.getsize(exported.path)


def test_fp16_weights(ghostnet, tmp_path):
  out = tmp_path / "g16.tflite"
  info = export_tflite("ghostnet_050", ghostnet.variables, out, resolution=32, quantize="fp16")
  assert info["quantize"] == "fp16"
  # Half the bytes of the float32 file (the weights dominate), and float16 rounding of weights.
  assert os.path.getsize(out) < 0.6 * os.path.getsize(ghostnet.path)
  err = rel_err(litert_logits(out, ghostnet.x), ghostnet.logits)
  assert 1e-6 < err < 2e-2, err


def test_cli_int8_calibrated_on_the_data_pipeline(ghostnet, tmp_path):
  from mobilevis_jax.train.checkpoint import save_variables
  ckpt = tmp_path / "ckpt"
  save_variables(str(ckpt), ghostnet.variables, model_name="ghostnet_050",
                 extra={"model_kwargs": {}})
  out = tmp_path / "g8.tflite"
  assert cli.main(["export", "--model", "ghostnet_050", "--checkpoint", str(ckpt), "--format",
                   "tflite", "--quantize", "int8", "--calibration-count", "16", "--resolution",
                   "32", "--out", str(out)]) == 0
  with open(out, "rb") as f:
    it = tflite_export.interpreter(f.read())
  # Full integer: every op computes in int8; only the float input is quantized and the
  # output dequantized.
  types = {d["dtype"] for d in it.get_tensor_details()}
  assert np.int8 in types
  from mobilevis_jax.data.calibration import calibration_images
  images = calibration_images(8, image_size=32, normalization="imagenet", split="validation")
  assert images.shape == (8, 32, 32, 3) and images.dtype == np.float32
  fp32 = litert_logits(ghostnet.path, images)
  int8 = litert_logits(out, images)
  assert int8.shape == fp32.shape == (8, 1000)
  # Loose: int8 logits follow the float ones (random weights make top-1 a weak signal).
  corr = np.corrcoef(int8.ravel(), fp32.ravel())[0, 1]
  assert corr > 0.9, corr
  assert (int8.argmax(-1) == fp32.argmax(-1)).mean() >= 0.5


def test_int8_needs_calibration(ghostnet, tmp_path):
  with pytest.raises(ValueError, match="needs calibration images"):
    export_tflite("ghostnet_050", ghostnet.variables, tmp_path / "g.tflite", resolution=32,
                  quantize="int8")
  with pytest.raises(ValueError, match="calibration images must be 32x32x3"):
    export_tflite("ghostnet_050", ghostnet.variables, tmp_path / "g.tflite", resolution=32,
                  quantize="int8", calibration=np.zeros((4, 16, 16, 3), np.float32))
  with pytest.raises(ValueError, match="quantize must be one of"):
    export_tflite("ghostnet_050", ghostnet.variables, tmp_path / "g.tflite", quantize="int4")
  assert _listing(tmp_path) == []


@pytest.mark.parametrize("method", ["fft", "fft2", "auto"])
def test_fft_parc_is_refused(method, tmp_path):
  from tests.helpers import abstract_variables
  variables = abstract_variables("parcnet_xs", 64)
  with pytest.raises(ValueError, match=f"parc_method='{method}' cannot be exported to LiteRT: "
                                       "phone runtimes have no inverse real FFT"):
    export_tflite("parcnet_xs", variables, tmp_path / "p.tflite", resolution=64,
                  parc_method=method)
  assert _listing(tmp_path) == []


def test_variables_of_another_model_are_refused(ghostnet, tmp_path):
  with pytest.raises(interop.StateDictError, match="not those of regnety_002: .* missing"):
    export_tflite("regnety_002", ghostnet.variables, tmp_path / "r.tflite", resolution=32)
  assert _listing(tmp_path) == []


def test_bad_paths(ghostnet, tmp_path):
  with pytest.raises(FileNotFoundError, match="missing"):
    export_tflite("ghostnet_050", ghostnet.variables, tmp_path / "missing" / "g.tflite")
  with pytest.raises(ValueError, match=r"must end in \.tflite"):
    export_tflite("ghostnet_050", ghostnet.variables, tmp_path / "g.onnx")
  with pytest.raises(SystemExit, match="--quantize applies to --format tflite only"):
    cli.main(["export", "--model", "ghostnet_050", "--checkpoint", str(tmp_path / "none"),
              "--format", "onnx", "--quantize", "int8", "--out", str(tmp_path / "g.onnx")])
  assert _listing(tmp_path) == []


def test_tanh_gelu_only_inside_the_context():
  import jax
  import jax.numpy as jnp

  from mobilevis_jax.layers.activations import gelu, tanh_gelu_when_traced
  x = jnp.linspace(-4.0, 4.0, 101)
  exact = jax.nn.gelu(x, approximate=False)
  with tanh_gelu_when_traced():
    inside = gelu(x)
  np.testing.assert_array_equal(gelu(x), exact)
  np.testing.assert_array_equal(inside, jax.nn.gelu(x, approximate=True))
  assert 1e-5 < float(jnp.abs(inside - exact).max()) < 1e-3
