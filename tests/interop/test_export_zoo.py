"""Every registered model exports to ONNX and LiteRT float32 and matches its JAX logits to 1e-4.

``test_export_onnx`` and ``test_export_tflite`` check the smallest model of each family
(``export_cases.CASES``) in depth: metadata, NHWC, quantisation, refusals. This module takes the
rest of the zoo (``export_cases.zoo_cases``), one test per model, at the family's tiny resolution
(the ParC families non-square), random variables by shape: the fused, ParC-baked graph in ONNX
Runtime (dynamic batch, batch 2; ParameterNet with a fixed batch of 1) and in the LiteRT
interpreter, both against the unfused JAX eval logits. Between the three modules every registered
model is exported in both formats (``test_every_model_is_covered``).

Cost on 2 idle cores, per model: ~5-15 s per format (the conversion scales with the op count, not
the resolution), plus one JAX compile for the reference logits.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.interop.export_cases import (
  CASES,
  ONNX_LEFT_OUT,
  ONNX_STATIC_BATCH,
  family_cases,
  jax_logits,
  litert_logits,
  onnx_logits,
  own_models,
  random_variables,
  rel_err,
  zoo_cases,
)

pytest.importorskip("jax2onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("tensorflow")
from mobilevis_jax.interop.onnx_export import export_onnx  # noqa: E402
from mobilevis_jax.interop.tflite_export import export_tflite  # noqa: E402

ZOO = zoo_cases()
# What each format's export here covers: the zoo, and for ONNX also the two per-family cases that
# test_export_onnx leaves out.
ONNX_HERE = sorted(set(ZOO) | set(ONNX_LEFT_OUT))
TFLITE_HERE = sorted(ZOO)


def _case(name: str):
  return ZOO[name] if name in ZOO else CASES[name]


def test_every_model_is_covered():
  models = set(own_models())
  onnx_elsewhere = set(family_cases()) - set(ONNX_LEFT_OUT)
  tflite_elsewhere = set(family_cases())
  assert onnx_elsewhere | set(ONNX_HERE) == models
  assert tflite_elsewhere | set(TFLITE_HERE) == models
  assert len(models) == 29, sorted(models)  # a new model lands here by itself; say so if not


def _onnx_logits(path: str, x: np.ndarray, dynamic: bool) -> np.ndarray:
  sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  (inp,) = sess.get_inputs()
  assert isinstance(inp.shape[0], str) if dynamic else inp.shape[0] == 1
  return onnx_logits(sess, x.transpose(0, 3, 1, 2), dynamic)


@pytest.mark.parametrize("name", sorted(set(ONNX_HERE) | set(TFLITE_HERE)))
def test_export_matches_jax(name, tmp_path):
  resolution, kwargs = _case(name)
  variables = random_variables(name, resolution, **kwargs)
  x = np.random.RandomState(1).rand(2, *resolution, 3).astype(np.float32)
  want = jax_logits(name, variables, x, **kwargs)
  errors = {}
  if name in ONNX_HERE:
    dynamic = name not in ONNX_STATIC_BATCH
    path = str(tmp_path / f"{name}.onnx")
    export_onnx(name, variables, path, resolution=resolution, dynamic_batch=dynamic, **kwargs)
    got = _onnx_logits(path, x, dynamic)
    assert got.shape == want.shape
    errors["onnx"] = rel_err(got, want)
  if name in TFLITE_HERE:
    path = str(tmp_path / f"{name}.tflite")
    info = export_tflite(name, variables, path, resolution=resolution, **kwargs)
    assert info["input_shape"] == [1, *resolution, 3]
    got = litert_logits(path, x)
    assert got.shape == want.shape
    errors["tflite"] = rel_err(got, want)
  bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= 1e-4}
  assert not bad, f"{name} at {resolution}: max |runtime - jax| / max |jax| = {bad}"
