"""Export a model to a deployable PyTorch file (``mobilevis export --format torch``).

The file is what :func:`mobilevis_jax.torch_models.load` rebuilds without the official
repositories and without unpickling anything: a ``.safetensors`` state_dict of the packaged
module (``mobilevis_jax.torch_models``) plus a header naming the model, its kwargs, the input
resolution and the form written. That form is the deployable one: fused where the family has a
structural re-parameterisation (RepViT), and for the ParC families with every kernel and position
embedding resampled ("baked") to the maps of the export resolution, so the module runs no
interpolation and refuses other input sizes.

torch is imported inside the functions only (the ``[torch]`` extra).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mobilevis_jax import fs
from mobilevis_jax.interop.state_dict import StateDictError, to_torch_state_dict
from mobilevis_jax.models import registry


def parse_resolution(resolution: int | str | tuple[int, int] | None, name: str) -> tuple[int, int]:
  """``(H, W)`` from an int, ``'H'``, ``'HxW'`` or a pair; None gives the model's default."""
  if resolution is None:
    r = registry.model_info(name).default_resolution
    return r, r
  try:
    if isinstance(resolution, str):
      parts = resolution.lower().split("x")
      if len(parts) not in (1, 2):
        raise ValueError
      h, w = int(parts[0]), int(parts[-1])
    elif isinstance(resolution, int):
      h = w = resolution
    else:
      h, w = (int(v) for v in resolution)
  except (TypeError, ValueError):
    raise ValueError(
        f"resolution must be H or HxW (e.g. 256 or 256x192), got {resolution!r}") from None
  if h < 1 or w < 1:
    raise ValueError(f"resolution must be positive, got {h}x{w}")
  return h, w


def _leaf_shapes(tree: Mapping) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(
      {c: tree[c] for c in ("params", "batch_stats") if c in tree})[0]
  return {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in flat}


def _check_variables(name: str, model, variables: Mapping, kwargs: Mapping) -> None:
  """A StateDictError naming the leaves when ``variables`` are not those of ``name(**kwargs)``."""
  expected = _leaf_shapes(registry.abstract_variables(
      model, registry.model_info(name).default_resolution))
  got = _leaf_shapes(variables)
  missing = sorted(set(expected) - set(got))
  unexpected = sorted(set(got) - set(expected))
  misshaped = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
  if missing or unexpected or misshaped:
    show = lambda keys: ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")
    raise StateDictError(
        f"the variables are not those of {name}{' ' + str(dict(kwargs)) if kwargs else ''}: "
        f"{len(missing)} missing ({show(missing)}), {len(unexpected)} unexpected "
        f"({show(unexpected)}), {len(misshaped)} misshaped ({show(misshaped)})")


def _check_resolution(name: str, model, variables, resolution: tuple[int, int]) -> None:
  """Raise a ValueError naming the model and resolution if the JAX model cannot take it."""
  h, w = resolution
  x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  # The last features_only map is the stride-32 one (every family has the switch).
  backbone = model.clone(features_only=True)
  try:
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    feats = jax.eval_shape(lambda v, x: backbone.apply(v, x, train=False)[-1], variables, x)
  except Exception as e:  # the model's own error says why (fixed ParC length, ...)
    raise ValueError(f"{name} cannot take a {h}x{w} input: {e}") from e
  if min(feats.shape[1:3]) < 1:
    raise ValueError(f"{name} cannot take a {h}x{w} input: its stride-32 feature map would be "
                     f"{feats.shape[1]}x{feats.shape[2]}")


def deployable_torch_module(name: str, variables: Mapping, *,
                            resolution: int | str | tuple[int, int] | None = None,
                            fuse: bool = True, check: bool = True,
                            **model_kwargs: Any) -> tuple[Any, dict]:
  """The deployable packaged PyTorch module of ``name`` with ``variables`` (eval mode).

  The one place that builds what every export format deploys (``export_torch``, Core ML, the
  PyTorch latency runner): variables and resolution checked against the JAX model, fused where
  the family has a structural re-parameterisation and ``fuse`` is set, ParC kernels baked for
  ``resolution``, and the module run once on a zero batch of that size. ``check=False`` skips
  the JAX-side checks of the variables and the resolution, for a caller that has made them.

  Returns:
    ``(module, info)`` with ``info = {'resolution': (H, W), 'fused': bool, 'baked': bool}``.
  """
  import torch

  from mobilevis_jax import torch_models

  hw = parse_resolution(resolution, name)
  model = registry.create_model(name, **model_kwargs)
  if check:
    _check_variables(name, model, variables, model_kwargs)
    _check_resolution(name, model, variables, hw)
  fam = torch_models.family(name)
  fused = bool(fuse) and fam in torch_models.FUSABLE_FAMILIES
  layout = torch_models.layout(name)
  if fused:
    _, fused_variables = registry.fuse(model, variables)
    sd = to_torch_state_dict(name, fused_variables, layout=layout, fused=True, **model_kwargs)
  else:
    sd = to_torch_state_dict(name, variables, layout=layout, **model_kwargs)
  module = torch_models.create_model(name, fused=fused, **model_kwargs)
  module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  baked = fam in torch_models.BAKED_FAMILIES
  try:
    if baked:
      torch_models.bake_(name, module, hw)
    with torch.no_grad():
      out = module.eval()(torch.zeros(1, 3, *hw))
  except (RuntimeError, ValueError) as e:
    raise ValueError(f"{name} cannot take a {hw[0]}x{hw[1]} input in PyTorch: {e}") from e
  if not isinstance(out, torch.Tensor) or out.ndim != 2:
    raise RuntimeError(f"{name}: the exported module returned {type(out).__name__}, not logits")
  return module, {"resolution": hw, "fused": fused, "baked": baked}


def check_torch_output_path(path: str | os.PathLike) -> str:
  """``path`` as a string after the checks of `torch_models.check_output_path` (a
  ``.safetensors`` file in an existing directory); a URI (``gs://...``) is checked for its suffix
  only, object stores having no directories."""
  from mobilevis_jax import torch_models

  path = os.fspath(path)
  if fs.is_remote(path) and path.endswith(".safetensors"):
    return path
  return torch_models.check_output_path(path)  # raises for a bad suffix, remote or not


def export_torch(name: str, variables: Mapping, path: str | os.PathLike, *,
                 resolution: int | str | tuple[int, int] | None = None, fuse: bool = True,
                 metadata: Mapping[str, str] | None = None, **model_kwargs: Any) -> dict:
  """Write model ``name`` with ``variables`` as a deployable PyTorch file at ``path``.

  Args:
    name: a registered model name.
    variables: its Flax variables (``params`` and ``batch_stats``), unfused; those of another
      model (or other kwargs) are a StateDictError naming the leaves that differ.
    path: a ``.safetensors`` file in an existing directory, or a URI (``gs://...``). Written
      under a temporary name and renamed (a URI: uploaded as one object), so a failed export
      leaves nothing at ``path`` (an existing file stays as it was).
    resolution: the input size the file is for (``H``, ``'HxW'`` or ``(H, W)``; default: the
      model's). The ParC families bake their kernels for it; every model is run at it once in
      PyTorch before the file is written.
    fuse: write the fused form where the family has one (RepViT); ignored for the others.
    metadata: extra strings for the file header.
    **model_kwargs: how the variables were created (``num_classes``, ``distillation``, ...).

  Returns:
    The header written (model, kwargs, resolution, fused, baked, layout).
  """
  from mobilevis_jax import torch_models

  path = check_torch_output_path(path)
  module, info = deployable_torch_module(name, variables, resolution=resolution, fuse=fuse,
                                         **model_kwargs)
  extra = dict(metadata or {})
  cfg = registry.model_info(name).pretrained_cfg
  if cfg is not None:
    # How to feed the model (eval transform, input convention: ParC-Net takes BGR in [0, 1]).
    extra.setdefault("pretrained_cfg", json.dumps(dataclasses.asdict(cfg)))
  with fs.local_output(path) as local:
    torch_models.save(module, local, name=name, kwargs=model_kwargs,
                      resolution=info["resolution"], fused=info["fused"], baked=info["baked"],
                      metadata=extra)
    return torch_models.read_header(local)
