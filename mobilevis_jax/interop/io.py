"""Reading and writing PyTorch weight files without executing pickled code.

``.safetensors`` files are plain tensors. ``.pth`` files are pickles: they are read with
``torch.load(weights_only=True)``, which refuses any object that is not a tensor or a container
of tensors, so a checkpoint with a code payload is rejected instead of run.
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping

import numpy as np

from mobilevis_jax import fs
from mobilevis_jax.interop.state_dict import StateDictError, _to_numpy

# Keys under which official training scripts nest the model's state_dict.
CHECKPOINT_KEYS = ("model", "state_dict", "state_dict_ema", "model_ema")
PTH_SUFFIXES = (".pth", ".pt", ".pth.tar", ".bin")


def _require_torch():
  try:
    import torch  # noqa: F401
  except ImportError as e:
    raise ImportError("reading/writing .pth needs PyTorch: pip install 'mobilevis_jax[torch]'") from e
  return torch


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike,
                    checkpoint_key: str | None = "model",
                    metadata: Mapping[str, str] | None = None) -> None:
  """Write a state_dict as ``.safetensors`` or as a ``.pth`` holding ``{checkpoint_key: sd}``.

  ``metadata`` (strings) goes into the safetensors header, or beside the state_dict under
  ``"metadata"`` in a ``.pth`` (which then needs a ``checkpoint_key``); :func:`read_metadata`
  reads it back.
  """
  path = os.fspath(path)
  arrays = {k: np.ascontiguousarray(_to_numpy(v)) for k, v in state_dict.items()}
  metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
  if not path.endswith((".safetensors", *PTH_SUFFIXES)):
    raise ValueError(f"unknown weight file type {path!r}: use .safetensors or .pth")
  if path.endswith(".safetensors"):
    from safetensors.numpy import save
    fs.write_bytes_atomic(path, save(arrays, metadata=metadata or None))
  else:
    torch = _require_torch()
    sd = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    if metadata and not checkpoint_key:
      raise ValueError("a .pth with metadata needs a checkpoint_key (the state_dict's entry)")
    obj = {checkpoint_key: sd} if checkpoint_key else sd
    if metadata:
      obj["metadata"] = metadata
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    fs.write_bytes_atomic(path, buffer.getvalue())


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
  """The string metadata :func:`save_state_dict` wrote ({} when the file has none)."""
  path = os.fspath(path)
  if not fs.exists(path):
    raise FileNotFoundError(path)
  if not path.endswith((".safetensors", *PTH_SUFFIXES)):
    raise ValueError(f"unknown weight file type {path!r}: use .safetensors or .pth")
  with fs.local_input(path) as local:
    if path.endswith(".safetensors"):
      from safetensors import safe_open
      with safe_open(local, framework="numpy") as f:
        return dict(f.metadata() or {})
    obj = _require_torch().load(local, map_location="cpu", weights_only=True)
  meta = obj.get("metadata", {}) if isinstance(obj, dict) else {}
  return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def load_state_dict(path: str | os.PathLike, checkpoint_key: str | None = None) -> dict[str, np.ndarray]:
  """Read a state_dict from ``.safetensors`` or ``.pth`` (never unpickling arbitrary objects).

  For ``.pth`` files holding a training checkpoint, the state_dict is taken from
  ``checkpoint_key`` or, when not given, the first of ``model``, ``state_dict``. ``path`` may be
  local or on any epath filesystem (``gs://...``).
  """
  path = os.fspath(path)
  if not fs.exists(path):
    raise FileNotFoundError(path)
  if not path.endswith((".safetensors", *PTH_SUFFIXES)):
    raise ValueError(f"unknown weight file type {path!r}: use .safetensors or .pth")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load
    return dict(load(fs.read_bytes(path)))
  torch = _require_torch()
  import pickle
  try:
    with fs.local_input(path) as local:
      obj = torch.load(local, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise StateDictError(f"refusing to load {path}: it holds objects other than tensors, which "
                         f"would run code on unpickling ({str(e).splitlines()[0]})") from None
  if not isinstance(obj, Mapping):
    raise StateDictError(f"{path} holds a {type(obj).__name__}, not a state_dict")
  if checkpoint_key is not None:
    if checkpoint_key not in obj:
      raise StateDictError(f"{path} has no {checkpoint_key!r} entry (keys: {sorted(obj)[:10]})")
    obj = obj[checkpoint_key]
  elif not all(hasattr(v, "shape") for v in obj.values()):
    for key in CHECKPOINT_KEYS:
      if key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
        break
    else:
      raise StateDictError(f"{path} is a checkpoint without any of {CHECKPOINT_KEYS}: pass checkpoint_key")
  return {k: _to_numpy(v) for k, v in obj.items()}
