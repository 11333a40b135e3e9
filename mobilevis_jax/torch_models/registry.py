"""Registered model names -> PyTorch modules, and the deployable file format (save / load).

Every name of ``mobilevis_jax.list_models()`` has a module here, built by :func:`create_model`
with the keyword arguments of the JAX factory that change the network (``num_classes``,
``distillation``, ...). Arguments that only matter for training or for the JAX execution path
(dropout and drop-path rates, ``parc_method``, ``strategy``, initialisation scales) are accepted
and ignored: these modules are for inference. An argument without a PyTorch counterpart is an
error naming it.

A deployable file (what ``mobilevis export --format torch`` writes) is a ``.safetensors``
state_dict whose header says how to rebuild the module: model name, kwargs, input resolution,
fused or not, ParC kernels baked or not. :func:`load` rebuilds it and loads the tensors with a
strict key check; nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from mobilevis_jax.torch_models import (
  mobilevig,
  parameternet,
  parc_convnets,
  parcnet,
  regnet,
  repvit,
)

# Header key of the deployable format, and its version (bumped when the meaning of a field changes).
METADATA_KEY = "mobilevis_torch"
FORMAT_VERSION = 1

# JAX factory arguments that do not change the eval-mode network.
_INFERENCE_IRRELEVANT = frozenset({
    "drop_rate", "drop_path_rate", "dropout_rate", "ffn_dropout", "parc_method", "strategy",
    "layer_scale_init", "head_init_scale", "zero_init_last"})


def _take(name: str, kw: dict, allowed: Mapping[str, Any],
          fixed: Mapping[str, Any] | None = None) -> dict:
  """The ``allowed`` arguments of ``kw`` (with their defaults), after checking that every other
  argument is inference-irrelevant or, for those in ``fixed``, has the only supported value."""
  out, fixed = dict(allowed), fixed or {}
  for k, v in kw.items():
    if k in allowed:
      out[k] = v
    elif k in fixed:
      if v != fixed[k]:
        raise ValueError(f"{name}: the PyTorch module supports only {k}={fixed[k]!r}, got {v!r}")
    elif k == "features_only":
      if v:
        raise ValueError(f"{name}: the PyTorch modules are classifiers; features_only=True has no "
                         "PyTorch counterpart")
    elif k not in _INFERENCE_IRRELEVANT:
      raise TypeError(f"{name}: argument {k!r} has no PyTorch counterpart")
  return out


def _repvit(name: str, kw: dict) -> nn.Module:
  return repvit.RepViT(name, **_take(name, kw, {"num_classes": 1000, "distillation": False}))


def _mobilevig(name: str, kw: dict) -> nn.Module:
  args = _take(name, kw, {"num_classes": 1000, "distillation": True, "k": 2},
               {"graph_conv": "svga"})
  return mobilevig.build(name, drop_path=0.0, **args)


# name: (rows, width, activation, dynamic)
_GHOSTNETS = {
    "parameternet_600m": (parameternet.PARAMETERNET_ROWS, 1.9, nn.Hardswish, True),
    "ghostnet_600m": (parameternet.PARAMETERNET_ROWS, 1.9, nn.Hardswish, False),
    "parameternet_300m": (parameternet.GHOSTNET_ROWS, 1.45, nn.Hardswish, True),
    "ghostnet_300m": (parameternet.GHOSTNET_ROWS, 1.45, nn.Hardswish, False),
    "ghostnet_050": (parameternet.GHOSTNET_ROWS, 0.5, nn.ReLU, False),
    "ghostnet_100": (parameternet.GHOSTNET_ROWS, 1.0, nn.ReLU, False),
    "ghostnet_130": (parameternet.GHOSTNET_ROWS, 1.3, nn.ReLU, False),
}


def _parameternet(name: str, kw: dict) -> nn.Module:
  rows, width, act, dynamic = _GHOSTNETS[name]
  allowed = {"num_classes": 1000, **({"num_experts": 4} if dynamic else {})}
  args = _take(name, kw, allowed, {"routing": "sigmoid"})
  return parameternet.ParameterNet(rows, width=width, act_layer=act, dynamic=dynamic, **args)


def _parcnet(name: str, kw: dict) -> nn.Module:
  return parcnet.ParCNetRef(name.removeprefix("parcnet_"), **_take(name, kw, {"num_classes": 1000}))


def _parc_convnet(name: str, kw: dict) -> nn.Module:
  # resample=True is the JAX default (kernels follow the input size); the official fixed-size
  # operator is resample=False.
  return parc_convnets.BUILDERS[name](**_take(name, kw, {"num_classes": 1000, "resample": True}))


def _regnet(name: str, kw: dict) -> nn.Module:
  return regnet.build(name, **_take(name, kw, {"num_classes": 1000}))


# name -> (family, builder, layout of its state_dict keys in mobilevis_jax.interop)
_MODELS: dict[str, tuple[str, Callable[[str, dict], nn.Module], str]] = {}
for _n in repvit.ROW_TABLES:
  _MODELS[_n] = ("repvit", _repvit, "official")
for _n in mobilevig.VARIANTS:
  _MODELS[_n] = ("mobilevig", _mobilevig, "official")
for _n in _GHOSTNETS:
  _MODELS[_n] = ("parameternet", _parameternet,
                 "official" if _n.startswith("parameternet") else "timm")
for _n in parcnet.CONFIGS:
  _MODELS[f"parcnet_{_n}"] = ("parcnet", _parcnet, "official")
for _n in parc_convnets.BUILDERS:
  _MODELS[_n] = ("parc_convnets", _parc_convnet, "official")
for _n in regnet.STAGES:
  _MODELS[_n] = ("regnet", _regnet, "timm")

# Families with a structural re-parameterisation (fused form) and with baked ParC kernels.
FUSABLE_FAMILIES = frozenset({"repvit"})
BAKED_FAMILIES = frozenset({"parcnet", "parc_convnets"})
_BAKERS = {"parcnet": parcnet.bake_, "parc_convnets": parc_convnets.bake_}


def list_models() -> list[str]:
  """Every model name with a PyTorch module (the same names as ``mobilevis_jax.list_models()``)."""
  return sorted(_MODELS)


def _entry(name: str):
  if name not in _MODELS:
    import difflib
    close = difflib.get_close_matches(name, list(_MODELS), n=3, cutoff=0.5)
    raise KeyError(f"no PyTorch module for {name!r}" + (f"; did you mean {', '.join(close)}?"
                                                          if close else ""))
  return _MODELS[name]


def family(name: str) -> str:
  return _entry(name)[0]


def layout(name: str) -> str:
  """The ``mobilevis_jax.interop`` layout whose keys the module's ``state_dict`` has."""
  return _entry(name)[2]


def _resolution(resolution) -> tuple[int, int]:
  h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
  if int(h) < 1 or int(w) < 1:
    raise ValueError(f"resolution must be positive, got {resolution!r}")
  return int(h), int(w)


def create_model(name: str, *, fused: bool = False, bake: int | tuple[int, int] | None = None,
                 **kwargs: Any) -> nn.Module:
  """The PyTorch module of registered model ``name`` (eval mode, untrained weights).

  Args:
    name: a registered name (``list_models()``).
    fused: the structurally re-parameterised tree (RepViT: the official ``replace_batchnorm``
      result); an error for families without one.
    bake: for the ParC families, an input resolution (``H`` or ``(H, W)``) to bake the ParC
      kernels and position embeddings for (see ``parcnet.bake_``); an error for the others.
    **kwargs: the JAX factory's arguments (``num_classes``, ``distillation``, ...).
  """
  fam, builder, _ = _entry(name)
  model = builder(name, dict(kwargs))
  if fused:
    if fam not in FUSABLE_FAMILIES:
      raise ValueError(f"{name}: the {fam} family has no fused form")
    model = repvit.fuse_model(model)
  if bake is not None:
    if fam not in BAKED_FAMILIES:
      raise ValueError(f"{name}: only the ParC families bake kernels, not {fam}")
    _BAKERS[fam](model, _resolution(bake))
  return model.eval()


def bake_(name: str, model: nn.Module, resolution: int | tuple[int, int]) -> nn.Module:
  """Bake the ParC kernels of ``model`` (a module of ``name``) for ``resolution``, in place."""
  fam = family(name)
  if fam not in BAKED_FAMILIES:
    raise ValueError(f"{name}: only the ParC families bake kernels, not {fam}")
  return _BAKERS[fam](model, _resolution(resolution))


def check_output_path(path: str | os.PathLike) -> str:
  """``path`` as a string, after checking that it names a ``.safetensors`` file in an existing
  directory (before any work is done, so that a bad path fails fast)."""
  path = os.fspath(path)
  if not path.endswith(".safetensors"):
    raise ValueError(f"a deployable PyTorch model is a .safetensors file, got {path!r}")
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"output directory {directory} does not exist (for {path})")
  return path


def save(model: nn.Module, path: str | os.PathLike, *, name: str, kwargs: Mapping[str, Any],
         resolution: int | tuple[int, int], fused: bool, baked: bool,
         metadata: Mapping[str, str] | None = None) -> None:
  """Write ``model``'s state_dict and the header :func:`load` rebuilds it from.

  The file is written to a temporary name in the target directory and renamed into place, so
  that an interrupted or failed save never leaves a half-written file at ``path``.
  """
  from safetensors.torch import save_file

  path = check_output_path(path)
  header = {"format_version": FORMAT_VERSION, "model": name, "kwargs": dict(kwargs),
            "resolution": list(_resolution(resolution)), "fused": bool(fused),
            "baked": bool(baked), "layout": layout(name)}
  meta = {**{str(k): str(v) for k, v in (metadata or {}).items()},
          METADATA_KEY: json.dumps(header), "mobilevis_model": name}
  # Cloned: safetensors refuses tensors that share memory (ParC-Net's official ``residual.*``
  # duplicates ``layer_5.0.*``); load_state_dict then fills the shared parameters twice.
  tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors",
                             dir=os.path.dirname(os.path.abspath(path)))
  os.close(fd)
  try:
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def read_header(path: str | os.PathLike) -> dict:
  """The rebuild header of a file :func:`save` wrote (model, kwargs, resolution, fused, baked)."""
  from safetensors import safe_open

  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(path)
  with safe_open(path, framework="pt") as f:
    meta = f.metadata() or {}
  if METADATA_KEY not in meta:
    raise ValueError(f"{path} is not a deployable mobilevis PyTorch file (no {METADATA_KEY!r} "
                     "header; write one with `mobilevis export --format torch`)")
  header = json.loads(meta[METADATA_KEY])
  if header.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: format version {header.get('format_version')} is not "
                     f"{FORMAT_VERSION}, the one this mobilevis_jax reads")
  return header


def load(path: str | os.PathLike) -> nn.Module:
  """Rebuild the module a deployable file describes and load its tensors (strict; eval mode).

  Reads only tensors and a JSON header (``safetensors``): no pickled code is executed.
  """
  from safetensors.torch import load_file

  header = read_header(path)
  model = create_model(header["model"], fused=header["fused"],
                       bake=header["resolution"] if header["baked"] else None, **header["kwargs"])
  state_dict = load_file(os.fspath(path))
  # num_batches_tracked is int64 in the file and in the module; everything else float32.
  model.load_state_dict(state_dict, strict=True)
  return model.eval()
