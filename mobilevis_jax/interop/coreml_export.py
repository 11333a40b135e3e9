"""Export a model to Core ML (``mobilevis export --format coreml``): an ``.mlpackage`` ML program.

The route is the one the RepViT and MobileViG papers measured their phone latencies with
(``../shared/reference/repvit.md``, ``../shared/reference/mobilevig.md``: Core ML Tools export of
the PyTorch model, batch 1): the deployable packaged PyTorch module (fused where the family has a
structural re-parameterisation, ParC kernels baked for the export resolution, built by
:func:`mobilevis_jax.interop.export.deployable_torch_module`, the same as ``--format torch``),
traced at batch 1 with ``torch.jit.trace`` and converted by ``coremltools`` to an ML program
(``minimum_deployment_target`` iOS 16) in fp32 or fp16.

Conversion runs on Linux; prediction needs macOS, so on Linux the package is checked through its
spec (:func:`coreml_summary`: input/output names and shapes, op types), not run.

Notes on the route (measured with coremltools 9.0 and torch 2.14.1):

* coremltools 9.0 warns that torch 2.14 is newer than the newest it was tested with (2.7). The
  ``torch.jit.trace`` route converts every family; the ``torch.export`` route does not (its
  frontend meets an ``alias`` node it does not know).
* ParameterNet's dynamic convolution converts as one ``linear`` (routing weights x expert bank)
  feeding a ``conv`` whose weight is that non-constant tensor (ML programs accept it). The packaged
  module runs a batch-1 input as that plain convolution; its folded-batch form for larger
  batches puts the batch size into ``groups``, which coremltools cannot convert from a trace.
  BatchNorm after a dynamic conv stays a ``batch_norm`` op (it cannot be folded into a
  non-constant weight).
* ParC converts as the baked ``'conv'`` form (pad + VALID convolution); there is no FFT path in
  the PyTorch module, so nothing asks Core ML for an inverse FFT.

coremltools and torch are imported inside the functions only (the ``[export]`` and ``[torch]``
extras).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

from mobilevis_jax import fs
from mobilevis_jax.interop.export import deployable_torch_module
from mobilevis_jax.models import registry

PRECISIONS = ("fp32", "fp16")
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# Core ML deployment target of the ML program: iOS 16, RepViT's measurement setup.
DEPLOYMENT_TARGET = "iOS16"


def import_coremltools() -> Any:
  """``coremltools``, imported so that the process survives it.

  coremltools probes for TensorFlow when imported, and torchvision (which it imports too) loads
  Triton through ``torch._dynamo``. Loading Triton's library after TensorFlow's kills the process
  with a segmentation fault (TensorFlow 2.21 with torch 2.14.1's Triton; ``import tensorflow;
  import triton`` alone does it). So TensorFlow is hidden from the probe when it is not loaded
  yet (only the PyTorch frontend is used here), and when it is already loaded while Triton is
  not, Triton is hidden for the rest of the process (PyTorch then runs without it, as CPU-only
  builds do).
  """
  if "coremltools" in sys.modules:
    return sys.modules["coremltools"]
  if "tensorflow" in sys.modules and "triton" not in sys.modules:
    sys.modules["triton"] = None  # a later `import triton` raises ImportError instead of crashing
  hide_tf = "tensorflow" not in sys.modules
  if hide_tf:
    sys.modules["tensorflow"] = None
  try:
    import coremltools
  except ImportError as e:
    raise ImportError(
        "Core ML export needs coremltools: pip install 'mobilevis_jax[export]'") from e
  finally:
    if hide_tf:
      del sys.modules["tensorflow"]
  return coremltools


def check_coreml_path(path: str | os.PathLike) -> str:
  """``path`` as a string, after checking that it names a ``.mlpackage`` in an existing
  directory (before any work is done, so that a bad path fails fast)."""
  path = os.fspath(path)
  if not path.rstrip("/").endswith(".mlpackage"):
    raise ValueError(f"a Core ML ML program is a .mlpackage directory, got {path!r}")
  path = path.rstrip("/")
  fs.check_output_dir(path)
  if not fs.is_remote(path) and os.path.exists(path) and not os.path.isdir(path):
    raise FileExistsError(f"{path} exists and is not a .mlpackage directory")
  return path


def check_precision(precision: str) -> str:
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
  return precision


def _replace_dir(src: str, dst: str, scratch: str) -> None:
  """Move directory ``src`` to ``dst``; an existing ``dst`` is replaced only once ``src`` is
  in place (restored if the final rename fails)."""
  if not os.path.exists(dst):
    os.replace(src, dst)
    return
  previous = os.path.join(scratch, "previous")
  os.replace(dst, previous)
  try:
    os.replace(src, dst)
  except BaseException:
    os.replace(previous, dst)
    raise


def coreml_summary(model_or_path: Any) -> dict:
  """Input and output names and shapes and the op-type counts of a Core ML ML program.

  Args:
    model_or_path: a ``coremltools.models.MLModel``, its spec, or a ``.mlpackage`` path.

  Returns:
    ``{'inputs': {name: shape}, 'outputs': {name: shape}, 'ops': {op_type: count},
    'precision': 'fp32'|'fp16'}`` (precision: fp16 when the program computes in float16).
  """
  ct = import_coremltools()
  if isinstance(model_or_path, (str, os.PathLike)):
    spec = ct.utils.load_spec(os.fspath(model_or_path))
  elif hasattr(model_or_path, "get_spec"):
    spec = model_or_path.get_spec()
  else:
    spec = model_or_path

  def shapes(features):
    return {f.name: tuple(int(d) for d in f.type.multiArrayType.shape) for f in features}

  ops: Counter = Counter()
  dtypes: set[int] = set()
  for function in spec.mlProgram.functions.values():
    for op in function.block_specializations[function.opset].operations:
      ops[op.type] += 1
      for out in op.outputs:
        if out.type.HasField("tensorType"):
          dtypes.add(out.type.tensorType.dataType)
  from coremltools.proto import MIL_pb2
  return {"inputs": shapes(spec.description.input), "outputs": shapes(spec.description.output),
          "ops": dict(sorted(ops.items())),
          "precision": "fp16" if MIL_pb2.DataType.FLOAT16 in dtypes else "fp32"}


def convert_module(module: Any, resolution: tuple[int, int], precision: str = "fp32") -> Any:
  """A PyTorch ``module`` (eval mode) as a Core ML ML program for ``[1, 3, H, W]`` inputs.

  Traced at batch 1 with ``torch.jit.trace`` and converted by ``coremltools.convert``; the
  program's input is ``image`` (float32 NCHW) and its output ``logits``. Returns the
  ``MLModel``, not loaded (loading compiles it with Core ML, which exists on macOS only).
  """
  check_precision(precision)
  ct = import_coremltools()
  import torch

  x = torch.zeros(1, 3, *resolution)
  with torch.no_grad(), warnings.catch_warnings():
    # The trace is of one fixed shape by design (batch 1, the baked resolution): the shape
    # checks that the trace freezes (ParC's baked-size test) are the intended constants.
    warnings.simplefilter("ignore", torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated")
    traced = torch.jit.trace(module, x)
  return ct.convert(
      traced, inputs=[ct.TensorType(name=INPUT_NAME, shape=tuple(x.shape))],
      outputs=[ct.TensorType(name=OUTPUT_NAME)], convert_to="mlprogram",
      minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
      compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
      skip_model_load=True)


def export_coreml(name: str, variables: Mapping, path: str | os.PathLike, *,
                  resolution: int | str | tuple[int, int] | None = None, fuse: bool = True,
                  precision: str = "fp32", **model_kwargs: Any) -> dict:
  """Write model ``name`` with ``variables`` as a Core ML ML program at ``path``.

  Args:
    name: a registered model name.
    variables: its Flax variables (``params`` and ``batch_stats``), unfused; those of another
      model (or other kwargs) are a StateDictError naming the leaves that differ.
    path: a ``.mlpackage`` in an existing directory. Built in a temporary directory beside it
      and renamed into place, so a failed export leaves nothing at ``path`` (an existing package
      stays as it was). A URI (``gs://...``) is built locally and then uploaded file by file
      (object stores cannot rename a directory, so there a failed upload can leave a part).
    resolution: the input size (``H``, ``'HxW'`` or ``(H, W)``; default: the model's). The
      program takes exactly ``[1, 3, H, W]`` float32 (NCHW, batch 1) named ``image`` and
      returns ``[1, num_classes]`` ``logits``; the ParC families bake their kernels for it.
    fuse: convert the fused form where the family has one (RepViT); ignored for the others.
    precision: ``'fp32'`` or ``'fp16'`` (Core ML's float16 compute precision, as on the
      Neural Engine; inputs and outputs stay float32).
    **model_kwargs: how the variables were created (``num_classes``, ``distillation``, ...).

  Returns:
    The export's description: model, kwargs, resolution, fused, baked, precision, and the
    package's :func:`coreml_summary` (inputs, outputs, op counts).
  """
  path = check_coreml_path(path)
  check_precision(precision)
  import_coremltools()  # before the model is built: a missing extra fails fast
  module, info = deployable_torch_module(name, variables, resolution=resolution, fuse=fuse,
                                         **model_kwargs)
  h, w = info["resolution"]
  mlmodel = convert_module(module, (h, w), precision)
  header = {"model": name, "kwargs": dict(model_kwargs), "resolution": [h, w],
            "fused": info["fused"], "baked": info["baked"], "precision": precision}
  meta = {"mobilevis_coreml": json.dumps(header), "mobilevis_model": name}
  cfg = registry.model_info(name).pretrained_cfg
  if cfg is not None:
    # How to feed the model (eval transform, input convention: ParC-Net takes BGR in [0, 1]).
    meta["pretrained_cfg"] = json.dumps(dataclasses.asdict(cfg))
  mlmodel.user_defined_metadata.update(meta)
  mlmodel.short_description = (f"mobilevis_jax {name} ({precision}), input {INPUT_NAME} "
                               f"[1, 3, {h}, {w}] float32 NCHW, output {OUTPUT_NAME}")
  remote = fs.is_remote(path)
  # Locally the package is built beside its destination (same filesystem, so the rename is
  # atomic); for a URI it is built in the system's temporary directory and uploaded.
  scratch = tempfile.mkdtemp(prefix=".tmp-",
                             dir=None if remote else os.path.dirname(os.path.abspath(path)))
  try:
    built = os.path.join(scratch, os.path.basename(path))
    mlmodel.save(built)
    summary = coreml_summary(built)
    if remote:
      fs.upload_tree(built, path)
    else:
      _replace_dir(built, path, scratch)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return {**summary, **header}
