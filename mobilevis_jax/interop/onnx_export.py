"""Export a model to ONNX from JAX (``mobilevis export --format onnx``).

Route: ``jax2onnx`` (``to_onnx``), which converts the jaxpr of the deployable forward
(:func:`mobilevis_jax.interop.deploy.deployable`: fused, ParC baked with ``parc_method='conv'``,
library convolution ops) primitive by primitive into standard ONNX ops, with a symbolic batch.
For the smallest model of every family ONNX Runtime agrees with JAX to ~1e-6 of max |logit|
(``tests/interop/test_export_onnx.py``). Its cost is conversion time: it checks every lowered
value against the whole graph built so far, so time grows with the square of the graph size
(15-50 s for GhostNet-0.5 at 32 px on 2 loaded cores; ~2 min for ParameterNet-300M at batch 1,
more than 8 min with a symbolic batch, whose shape arithmetic multiplies the nodes of the
per-sample convolutions). The other route, jax2tf -> ``tf2onnx``, was not tried in the time
available (jax2tf's default output is one ``XlaCallModule`` op holding StableHLO, so tf2onnx
would need jax2tf's deprecated non-native mode); it is the first thing to measure if the
conversion time matters.

The graph:

* input ``images``: float32, NCHW ``(B, 3, H, W)`` by default (the layout PyTorch users and most
  ONNX tooling expect; the transpose to the model's NHWC is the first op of the graph) or NHWC
  ``(B, H, W, 3)`` with ``layout='nhwc'``; ``B`` is a symbolic (dynamic) axis unless
  ``dynamic_batch=False`` (then 1). H and W are fixed: the ParC kernels are baked for them.
* output ``logits``: ``(B, num_classes)``, the eval logits (RepViT with distillation: the mean of
  both heads, as ``model.apply(..., train=False)``).
* ``metadata_props``: model name and kwargs, resolution, layout, fused, ParC baked, input
  convention and the ``pretrained_cfg`` (how to preprocess).

ParameterNet's dynamic convolution (per-sample mixed kernels) exports as the expert mixing
followed by im2col and one batched matmul per layer (``deploy.EXPORT_KERNELS``), batch-free.

The packages (``onnx``, ``onnxruntime``, ``jax2onnx``: the ``[export]`` extra) are imported inside
the functions, never at package import.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from mobilevis_jax import fs
from mobilevis_jax.interop.deploy import (
  check_output_path,
  deployable,
  export_kernels,
)

LAYOUTS = ("nchw", "nhwc")
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def export_onnx(name: str, variables: Mapping, path: str | os.PathLike, *,
                resolution: int | str | tuple[int, int] | None = None, fuse: bool = True,
                layout: str = "nchw", dynamic_batch: bool = True, opset: int = 23,
                **model_kwargs: Any) -> dict:
  """Write model ``name`` with ``variables`` as an ONNX file at ``path``.

  Args:
    name: a registered model name.
    variables: its Flax variables (``params`` and ``batch_stats``), unfused; those of another
      model (or other kwargs) are a StateDictError naming the leaves that differ.
    path: an ``.onnx`` file in an existing directory. Written under a temporary name and renamed,
      so a failed export leaves nothing at ``path``.
    resolution: the input size (``H``, ``'HxW'`` or ``(H, W)``; default: the model's).
    fuse: export the fused form where the family has one (RepViT).
    layout: ``'nchw'`` (default) or ``'nhwc'`` input.
    dynamic_batch: a symbolic batch axis (else batch 1).
    opset: the ONNX opset.
    **model_kwargs: how the variables were created (``num_classes``, ``distillation``, ...);
      ``parc_method`` may be ``'conv'`` (default) or ``'direct'``, never an FFT.

  Returns:
    The metadata written, plus ``path``, ``input_shape`` (``'B'`` for a dynamic batch) and the
    input and output names.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  path = check_output_path(path, ".onnx")
  dep = deployable(name, variables, resolution=resolution, fuse=fuse, target="ONNX",
                   **model_kwargs)

  import jax.numpy as jnp
  import onnx
  from jax2onnx import to_onnx

  h, w = dep.resolution
  batch = "B" if dynamic_batch else 1
  if layout == "nchw":
    shape = (batch, 3, h, w)
    fn = lambda x: dep.apply(jnp.transpose(x, (0, 2, 3, 1)))
  else:
    shape = (batch, h, w, 3)
    fn = dep.apply
  with export_kernels():
    proto = to_onnx(fn, inputs=[shape], model_name=name, opset=opset, input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME])
  metadata = {**dep.metadata, "layout": layout}
  onnx.helper.set_model_props(proto, metadata)
  onnx.checker.check_model(proto)
  data = proto.SerializeToString()
  _check_runs(data, shape)
  fs.write_bytes_atomic(path, data)
  return {**metadata, "path": path, "input_shape": list(shape), "input_name": INPUT_NAME,
          "output_name": OUTPUT_NAME}


def _check_runs(data: bytes, shape: tuple) -> None:
  """Load the model in ONNX Runtime and run one batch, so a file the runtime refuses is an
  error here, before anything is written."""
  import numpy as np
  import onnxruntime as ort

  sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
  x = np.zeros([2 if isinstance(d, str) else d for d in shape], np.float32)
  out = sess.run(None, {INPUT_NAME: x})[0]
  if out.ndim != 2 or out.shape[0] != x.shape[0]:
    raise RuntimeError(f"the exported graph returned shape {out.shape}, not (batch, classes)")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
  """The ``metadata_props`` of an ONNX file, as a dict."""
  import onnx

  model = onnx.load(os.fspath(path), load_external_data=False)
  return {p.key: p.value for p in model.metadata_props}
