"""Export a model to LiteRT (``.tflite``) from JAX (``mobilevis export --format tflite``).

Route: ``jax2tf.convert`` of the deployable forward
(:func:`mobilevis_jax.interop.deploy.deployable`: fused, ParC baked with
``parc_method='conv'``) into a ``tf.function`` with a fixed ``(1, H, W, 3)`` float32 input,
then TensorFlow's ``tf.lite.TFLiteConverter`` (tensorflow-cpu, already a dependency), which
lowers jax2tf's StableHLO module to LiteRT builtin ops. Only builtins are allowed (no TF
"select" ops), so the file runs in the plain LiteRT runtime and its XNNPACK delegate. The
interpreter used to check and run the files is ``ai_edge_litert.interpreter`` (the ``[export]``
extra), else ``tf.lite.Interpreter``.

Quantisation (``quantize``):

* ``None``: float32.
* ``'fp16'``: float16 weights, float32 compute on CPU (the converter's float16 post-training
  quantisation).
* ``'int8'``: full-integer post-training quantisation (``TFLITE_BUILTINS_INT8``), activation
  ranges calibrated on ``calibration`` (the representative dataset: NHWC float images in the
  model's input convention, e.g. from :func:`mobilevis_jax.data.calibration.calibration_images`).
  The input and output stay float32 (a quantize op in, a dequantize op out), so the file is fed
  like the float one. GELU is exported in its tanh form
  (``layers.activations.tanh_gelu_when_traced``, ~1e-3 from the exact erf, far below int8
  rounding), which the converter turns into LiteRT's GELU op: the exact erf lowers to a
  polynomial with DIV, LESS and SELECT ops that have no int8 kernels, and the converter still
  emits such a file (with no error), on which the interpreter aborts the process when
  allocating it (measured with RepViT-M0.6, TF 2.21, LiteRT 2.3). With the tanh form RepViT-M0.6
  converts to one QUANTIZE, one DEQUANTIZE and int8 ops only.

The input is NHWC ``(1, H, W, 3)``, LiteRT's native layout; batch 1 is what phones run.
ParameterNet's dynamic convolution (per-sample kernels mixed from experts) converts to builtins
at batch 1.

TensorFlow is imported inside the functions only.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from mobilevis_jax import fs
from mobilevis_jax.interop.deploy import (
  check_output_path,
  deployable,
  export_kernels,
)
from mobilevis_jax.interop.export import parse_resolution

QUANTIZATIONS = (None, "fp16", "int8")


def interpreter(model_content: bytes, num_threads: int | None = None) -> Any:
  """A LiteRT interpreter over a ``.tflite`` blob (``ai_edge_litert`` if installed, else TF's),
  with its tensors allocated."""
  try:
    from ai_edge_litert.interpreter import Interpreter
  except ImportError:  # the [export] extra is not installed: TensorFlow's own copy
    import tensorflow as tf
    Interpreter = tf.lite.Interpreter
  it = Interpreter(model_content=model_content, num_threads=num_threads)
  it.allocate_tensors()
  return it


def run(it, x: np.ndarray) -> np.ndarray:
  """Logits of one image batch ``(1, H, W, 3)`` float32 through interpreter ``it``."""
  inp = it.get_input_details()[0]
  it.set_tensor(inp["index"], np.asarray(x, np.float32))
  it.invoke()
  return it.get_tensor(it.get_output_details()[0]["index"]).copy()


def _calibration_batches(calibration, hw: tuple[int, int]) -> list[np.ndarray]:
  if calibration is None:
    raise ValueError("quantize='int8' needs calibration images (NHWC float, the model's input "
                     "convention): pass calibration=")
  batches = []
  for img in calibration:
    a = np.asarray(img, np.float32)
    if a.ndim == 3:
      a = a[None]
    if a.ndim != 4 or a.shape[1:] != (*hw, 3):
      raise ValueError(f"calibration images must be {hw[0]}x{hw[1]}x3 (NHWC), got shape "
                       f"{tuple(np.shape(img))}")
    batches.extend(a[i:i + 1] for i in range(a.shape[0]))
  if not batches:
    raise ValueError("calibration holds no images")
  return batches


def export_tflite(name: str, variables: Mapping, path: str | os.PathLike, *,
                  resolution: int | str | tuple[int, int] | None = None, fuse: bool = True,
                  quantize: str | None = None, calibration: Iterable | np.ndarray | None = None,
                  **model_kwargs: Any) -> dict:
  """Write model ``name`` with ``variables`` as a LiteRT flatbuffer at ``path``.

  Args:
    name: a registered model name.
    variables: its Flax variables (``params`` and ``batch_stats``), unfused; those of another
      model (or other kwargs) are a StateDictError naming the leaves that differ.
    path: a ``.tflite`` file in an existing directory. Written under a temporary name and
      renamed, so a failed export leaves nothing at ``path``.
    resolution: the input size (``H``, ``'HxW'`` or ``(H, W)``; default: the model's).
    fuse: export the fused form where the family has one (RepViT).
    quantize: None (float32), ``'fp16'`` (float16 weights) or ``'int8'`` (full integer).
    calibration: for ``'int8'``: images ``(N, H, W, 3)`` or an iterable of ``(H, W, 3)`` /
      ``(1, H, W, 3)`` float arrays, preprocessed as the model expects.
    **model_kwargs: how the variables were created (``num_classes``, ``distillation``, ...);
      ``parc_method`` may be ``'conv'`` (default) or ``'direct'``, never an FFT.

  Returns:
    The export's description: model, kwargs, resolution, fused, ParC baked, quantize, input
    shape, path and size in bytes.
  """
  if quantize not in QUANTIZATIONS:
    raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
  path = check_output_path(path, ".tflite")
  # Bad calibration data fails before any tracing.
  batches = (_calibration_batches(calibration, parse_resolution(resolution, name))
             if quantize == "int8" else None)
  dep = deployable(name, variables, resolution=resolution, fuse=fuse, target="LiteRT",
                   **model_kwargs)
  h, w = dep.resolution

  import tensorflow as tf
  from jax.experimental import jax2tf

  from mobilevis_jax.layers.activations import tanh_gelu_when_traced

  shape = (1, h, w, 3)
  fn = tf.function(jax2tf.convert(dep.apply, with_gradient=False), autograph=False,
                   input_signature=[tf.TensorSpec(shape, tf.float32, name="images")])
  with export_kernels(), (tanh_gelu_when_traced() if quantize == "int8"
                          else contextlib.nullcontext()):  # jax2tf traces the JAX function here
    concrete = fn.get_concrete_function()
  converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], fn)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if quantize == "fp16":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  elif quantize == "int8":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([b] for b in batches)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.float32
    converter.inference_output_type = tf.float32
  try:
    blob = converter.convert()
  except Exception as e:  # the converter's message names the op it refused
    raise RuntimeError(f"LiteRT conversion of {name} failed: {e}") from e
  out = run(interpreter(blob), np.zeros(shape, np.float32))
  if out.ndim != 2 or out.shape[0] != 1:
    raise RuntimeError(f"the exported model returned shape {out.shape}, not (1, classes)")
  fs.write_bytes_atomic(path, blob)
  return {**dep.metadata, "quantize": quantize, "layout": "nhwc", "input_shape": list(shape),
          "path": path, "bytes": len(blob)}
