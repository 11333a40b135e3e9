"""Convert Flax variables to and from PyTorch state_dicts, with strict validation.

Both directions are driven by the family's entry list (see :mod:`keymap`), and both are strict
in the way ``load_state_dict(strict=True)`` is: every key must be accounted for, every shape must
match, and every Flax leaf must be mapped. Errors name the offending keys.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mobilevis_jax.interop import keymap
from mobilevis_jax.models.registry import abstract_variables, create_model, model_info


class StateDictError(ValueError):
  """A state_dict does not match the model: lists missing, unexpected or misshaped keys."""


def _to_numpy(value: Any) -> np.ndarray:
  """A private numpy copy: imported variables must not alias the caller's tensors, which PyTorch
  may later update in place (e.g. BN running stats in a train-mode forward)."""
  if hasattr(value, "detach"):  # a torch tensor; no torch import needed for numpy input
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy().copy()
  return np.array(value, copy=True)


def _entries(name: str, model: nn.Module, variables, layout: str) -> list[keymap.Entry]:
  family = model_info(name).family
  entries = keymap.get_layout(family, layout)(name, model, variables)
  seen: set[str] = set()
  dup = [e.torch_key for e in entries if e.torch_key in seen or seen.add(e.torch_key)]
  if dup:
    raise RuntimeError(f"layout {family}/{layout} maps these torch keys twice: {dup[:10]}")
  return entries


def _flax_leaves(variables) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(nn.unbox(dict(variables)))


def _check_flax_coverage(entries, leaves, name, layout):
  mapped = {(e.collection,) + e.path for e in entries if e.collection is not None}
  unmapped = sorted("/".join(k) for k in leaves
                    if k not in mapped and k[0] in ("params", "batch_stats"))
  dangling = sorted("/".join(k) for k in mapped if k not in leaves)
  if unmapped or dangling:
    raise RuntimeError(
        f"the {layout!r} layout of {name} does not cover the Flax variables: "
        f"unmapped leaves {unmapped[:10]}{' ...' if len(unmapped) > 10 else ''}; "
        f"entries without a leaf {dangling[:10]}{' ...' if len(dangling) > 10 else ''}")


def to_torch_state_dict(name: str, variables: Mapping, layout: str = "official",
                        **model_kwargs: Any) -> dict[str, np.ndarray]:
  """Flax variables of model ``name`` -> PyTorch state_dict (numpy arrays, PyTorch key order).

  ``model_kwargs`` (``num_classes``, ``distillation``, ...) must match how the variables were made.
  ``num_batches_tracked`` is written as an int64 zero: Flax does not count batches and PyTorch
  only reads it when BN ``momentum=None``, which none of these models use.
  """
  model = create_model(name, **model_kwargs)
  leaves = _flax_leaves(variables)
  entries = _entries(name, model, variables, layout)
  _check_flax_coverage(entries, leaves, name, layout)
  out: dict[str, np.ndarray] = {}
  for e in entries:
    if e.kind == keymap.NUM_BATCHES_TRACKED:
      out[e.torch_key] = np.array(0, dtype=np.int64)
    elif e.kind == keymap.ALIAS:
      continue
    else:
      out[e.torch_key] = e.to_torch(np.asarray(leaves[(e.collection,) + e.path], dtype=np.float32))
  for e in entries:
    if e.kind == keymap.ALIAS:
      if e.alias_of not in out:
        raise RuntimeError(f"alias {e.torch_key} refers to unknown key {e.alias_of}")
      out[e.torch_key] = out[e.alias_of].copy()
  return {e.torch_key: out[e.torch_key] for e in entries}


def from_torch_state_dict(name: str, state_dict: Mapping[str, Any], layout: str = "official",
                          *, alias_atol: float = 0.0, **model_kwargs: Any) -> dict:
  """PyTorch state_dict (numpy arrays or torch tensors) -> Flax variables of model ``name``.

  Raises :class:`StateDictError` listing missing keys, unexpected keys and shape mismatches, and
  when duplicated (alias) keys disagree with the tensor they duplicate.
  """
  model = create_model(name, **model_kwargs)
  target = abstract_variables(model, model_info(name).default_resolution)
  leaves = _flax_leaves(target)
  entries = _entries(name, model, target, layout)
  _check_flax_coverage(entries, leaves, name, layout)

  expected = {e.torch_key for e in entries}
  given = set(state_dict)
  missing = sorted(expected - given)
  unexpected = sorted(given - expected)
  sd = {k: _to_numpy(v) for k, v in state_dict.items() if k in expected}
  mismatched = []
  for e in entries:
    if e.torch_key not in sd or e.kind in (keymap.NUM_BATCHES_TRACKED, keymap.ALIAS):
      continue
    want = e.torch_shape_for(leaves[(e.collection,) + e.path].shape)
    if tuple(sd[e.torch_key].shape) != want:
      mismatched.append(f"{e.torch_key}: checkpoint {tuple(sd[e.torch_key].shape)} vs model {want}")
  bad_alias = []
  for e in entries:
    if e.kind == keymap.ALIAS and e.torch_key in sd and e.alias_of in sd:
      a, b = sd[e.torch_key], sd[e.alias_of]
      if a.shape != b.shape or not np.allclose(a, b, rtol=0.0, atol=alias_atol):
        bad_alias.append(f"{e.torch_key} != {e.alias_of}")
  if missing or unexpected or mismatched or bad_alias:
    parts = []
    if missing:
      parts.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
      parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if mismatched:
      parts.append(f"shape mismatches ({len(mismatched)}): {mismatched}")
    if bad_alias:
      parts.append(f"duplicated keys that differ from their original: {bad_alias}")
    hint = (f" [model {name} built with {model_kwargs or 'default arguments'}; pass num_classes=/"
            f"distillation= if the checkpoint was made differently]") if mismatched else ""
    raise StateDictError(f"state_dict does not match {name} ({layout} layout): "
                         + "; ".join(parts) + hint)

  flat = {}
  for e in entries:
    if e.collection is None:
      continue
    leaf = leaves[(e.collection,) + e.path]
    flat[(e.collection,) + e.path] = jnp.asarray(e.from_torch(sd[e.torch_key], leaf.shape),
                                                 dtype=leaf.dtype)
  return traverse_util.unflatten_dict(flat)
