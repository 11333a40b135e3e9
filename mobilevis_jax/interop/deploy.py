"""What the ONNX and LiteRT exports share: the deployable JAX function and the atomic file write.

:func:`deployable` turns a registered model and its (unfused) variables into the function a
phone runtime is given: the eval forward at one fixed input resolution, with the variables closed
over as constants, in the fused form where the family has one (``registry.fuse``: RepViT) and,
for the ParC families, with ``parc_method='conv'`` by default: the official formulation (the map
wrapped by its own first rows, then a VALID n x 1 convolution), a plain (depthwise) convolution
in every runtime. ``'direct'`` (the circulant matmul) is accepted too, but its dense form
(ParC-ResNet50) is a rank-4 batched matmul, which the LiteRT converter refuses. The ParC meta
kernels and position embeddings are resampled to the maps of that resolution inside the traced
function, from constants only, so the converters fold them into instance-size constants
("baked"): the exported graph interpolates nothing and takes only that resolution. Phone
runtimes have no inverse real FFT, so asking for ``'fft'``/``'fft2'`` (or ``'auto'``, which picks
the FFT on large maps) is a ValueError rather than a silent switch.

The converters trace the function inside :func:`export_kernels`: the layers' backend-tuned paths
(``layers.kernels``: on the XLA CPU backend depthwise convolutions run as shifted multiply-adds)
are replaced by the library operators a runtime has kernels for: depthwise, grouped and 1x1
convolutions as convolutions (what a runtime fuses with the activation that follows), and
ParameterNet's per-sample dynamic convolutions as im2col plus one batched matmul (``'einsum'``),
which keeps the batch axis free. (The ``'vmap'``/``'grouped'`` forms fold the batch into the
channel groups: jax2onnx refuses them with a symbolic batch and, measured on one DynamicConv at
batch 2, converts them to a graph whose output is wrong by ~1.4.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from mobilevis_jax import fs
from mobilevis_jax.interop.export import _check_resolution, _check_variables, parse_resolution
from mobilevis_jax.models import registry

# The families whose models take ``parc_method`` (a ParC operator per block).
PARC_FAMILIES = ("parcnet", "parc_convnets")
# ParC methods a runtime without FFT can run: the circulant matmul and the official wrapped conv.
EXPORTABLE_PARC_METHODS = ("conv", "direct")


# `layers.kernels` implementations a converter is given (see the module docstring).
EXPORT_KERNELS = {"depthwise": "xla", "grouped": "xla", "pointwise": "xla",
                  "dynamic_1x1": "einsum", "dynamic_kxk": "einsum"}


@contextlib.contextmanager
def export_kernels() -> Iterator[None]:
  """Trace the layers with :data:`EXPORT_KERNELS` inside the context."""
  from mobilevis_jax.layers import kernels

  with kernels.use(**EXPORT_KERNELS):
    yield


@dataclasses.dataclass(frozen=True)
class Deployable:
  """The eval forward of a model at one resolution, ready for a converter.

  Attributes:
    apply: ``apply(x) -> logits`` on an NHWC float32 batch of ``resolution``, variables baked in.
    resolution: ``(H, W)``.
    fused: whether the fused form is exported.
    model_kwargs: the kwargs the model was built with (``parc_method`` included for ParC).
    metadata: strings describing the export (model, resolution, fused, input convention, ...).
  """
  apply: Callable
  resolution: tuple[int, int]
  fused: bool
  model_kwargs: dict
  metadata: dict


def check_output_path(path: str | os.PathLike, suffix: str) -> str:
  """``path`` as a string after checking its suffix and, for a local path, that its directory
  exists (fail fast). A URI (``gs://...``) is not checked beyond its suffix: object stores have no
  directories, and the bucket is checked by the write."""
  path = os.fspath(path)
  if not path.endswith(suffix):
    raise ValueError(f"the output file must end in {suffix}, got {path!r}")
  fs.check_output_dir(path)
  return path


def deployable(name: str, variables: Mapping, *, resolution: int | str | tuple[int, int] | None,
               fuse: bool, target: str, **model_kwargs: Any) -> Deployable:
  """The deployable forward of ``name`` (see the module docstring); ``target`` names the runtime
  in error messages. Raises StateDictError for variables of another model, ValueError for a
  resolution the model cannot take or an FFT ParC method."""
  info = registry.model_info(name)
  hw = parse_resolution(resolution, name)
  kwargs = dict(model_kwargs)
  if info.family in PARC_FAMILIES:
    method = kwargs.get("parc_method", "conv")
    if method not in EXPORTABLE_PARC_METHODS:
      raise ValueError(
          f"{name}: parc_method={method!r} cannot be exported to {target}: phone runtimes have no "
          f"inverse real FFT (and 'auto' picks it on large maps); use one of "
          f"{EXPORTABLE_PARC_METHODS}")
    kwargs["parc_method"] = method
  elif "parc_method" in kwargs:
    raise ValueError(f"{name} has no ParC operator: parc_method does not apply")
  model = registry.create_model(name, **kwargs)
  _check_variables(name, model, variables, model_kwargs)
  _check_resolution(name, model, variables, hw)
  fused = bool(fuse) and registry.can_fuse(model)
  if fused:
    model, variables = registry.fuse(model, variables)

  def apply(x):
    return model.apply(variables, x, train=False)

  cfg = info.pretrained_cfg
  metadata = {"mobilevis_model": name, "model_kwargs": json.dumps(kwargs, sort_keys=True),
              "resolution": f"{hw[0]}x{hw[1]}", "fused": str(fused).lower(),
              "parc_baked": str(info.family in PARC_FAMILIES).lower(),
              "input_convention": info.input_convention}
  if cfg is not None:
    # How to feed the model (eval transform, normalisation; ParC-Net takes BGR in [0, 1]).
    metadata["pretrained_cfg"] = json.dumps(dataclasses.asdict(cfg))
  return Deployable(apply, hw, fused, kwargs, metadata)
