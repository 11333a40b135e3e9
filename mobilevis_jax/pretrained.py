"""Pretrained weights by path: ``create_model(name, pretrained=PATH, num_classes=K)``.

``PATH`` is a PyTorch ``.safetensors`` / ``.pth`` file or an orbax checkpoint of this project
(``mobilevis import`` output, a ``save_variables`` directory or a training work directory).

* **PyTorch files**: the key layout (``official`` or ``timm``) and the variant the checkpoint was
  made with (two heads or one; RepViT fused or not) are detected from the keys, the number of
  classes from the classifier's shape; then :func:`~mobilevis_jax.interop.from_torch_state_dict`
  converts it with full validation (missing, unexpected and misshaped keys are named).
* **orbax**: the variables are checked leaf by leaf against the model the checkpoint's
  ``meta.json`` names (same errors, by Flax path).
* **Head adaptation** (:func:`adapt_variables`): when the requested model differs from the
  checkpoint's only in its head, the classifier is re-initialised (``num_classes``), the
  distillation head dropped or re-initialised (``distillation``), or every head module dropped
  (``features_only``); a warning lists what was dropped and re-initialised. Everything else must
  match. :func:`reset_classifier` is the same operation on variables in hand (timm's
  ``reset_classifier``).

Nothing is half-loaded: the variables are returned only when every step succeeded.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mobilevis_jax import fs
from mobilevis_jax.interop import io as torch_io
from mobilevis_jax.interop.state_dict import StateDictError, _entries, from_torch_state_dict
from mobilevis_jax.models.registry import abstract_variables, model_info

log = logging.getLogger(__name__)

# Parameter shapes of every family do not depend on the input size (ParC kernels are stored at
# their meta size and resampled), so structures are read off a small, cheap-to-trace input.
_PROBE_RESOLUTION = 64
# Model arguments that describe the head; every other argument is the caller's to pass through.
HEAD_KWARGS = ("num_classes", "distillation", "features_only", "fused")


class PretrainedFileError(ValueError):
  """A ``pretrained=`` path exists but cannot be read as weights (truncated, corrupt, wrong
  type)."""


def create_model(name: str, pretrained: str | os.PathLike | None = None, *,
                 out_indices: Sequence[int] | None = None, **kwargs: Any) -> nn.Module:
  """``mobilevis_jax.create_model``: the registry's model, bound to the weights at ``pretrained``
  when given (see :func:`mobilevis_jax.models.registry.create_model` for the arguments and
  :func:`load_pretrained` for what is loaded)."""
  from mobilevis_jax.models import registry
  if pretrained is None:
    return registry.create_model(name, out_indices=out_indices, **kwargs)
  model, variables = load_pretrained(name, pretrained, out_indices=out_indices, **kwargs)
  return model.bind(variables)


def load_pretrained(name: str, path: str | os.PathLike, *, out_indices: Sequence[int] | None = None,
                    rng: jax.Array | None = None, **kwargs: Any) -> tuple[nn.Module, dict]:
  """``(model, variables)`` of ``name`` built with ``kwargs`` and loaded from ``path``.

  Head arguments the caller leaves out (``num_classes``, ``distillation``, ``fused``) are taken
  from the checkpoint, so an official two-head RepViT file loads without ``distillation=True``.
  ``rng`` seeds re-initialised heads (default ``PRNGKey(0)``).
  """
  from mobilevis_jax.models.registry import create_model
  path = os.fspath(path)
  base = {k: v for k, v in kwargs.items() if k not in HEAD_KWARGS}
  if fs.isdir(path):
    variables, ckpt_kw = _read_orbax(name, path, base)
  else:
    variables, ckpt_kw = _read_torch(name, path, base)
  want = {**ckpt_kw, **{k: kwargs[k] for k in HEAD_KWARGS if k in kwargs}}
  source = create_model(name, **base, **ckpt_kw)
  target = create_model(name, **base, **want)
  if target != source:  # the variables were validated against ``source`` already
    variables = adapt_variables(source, variables, target, rng=rng, label=f"{name} from {path}")
  if out_indices is not None:
    target = create_model(name, out_indices=out_indices, **base, **want)
  return target, variables


# --- reading ------------------------------------------------------------------------------------

def _read_torch(name: str, path: str, base: dict) -> tuple[dict, dict]:
  if not fs.exists(path):
    raise FileNotFoundError(f"pretrained={path!r}: no such file or directory")
  try:
    state_dict = torch_io.load_state_dict(path)
  except (StateDictError, ImportError):
    raise
  except ValueError as e:  # unknown suffix
    raise PretrainedFileError(f"pretrained={path!r}: {e}") from None
  except Exception as e:
    # safetensors' SafetensorError, torch's "PytorchStreamReader failed ..." on a cut-off zip.
    raise PretrainedFileError(
        f"pretrained={path!r} could not be read "
        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
        "the file is truncated or not a weight file") from None
  layout, ckpt_kw = detect_torch_checkpoint(name, state_dict, **base)
  variables = from_torch_state_dict(name, state_dict, layout=layout, **base, **ckpt_kw)
  log.info("%s: loaded %d tensors from %s (%s layout, %s)", name, len(state_dict), path, layout,
           ckpt_kw)
  return variables, ckpt_kw


def _read_orbax(name: str, path: str, base: dict) -> tuple[dict, dict]:
  from mobilevis_jax.models.registry import create_model
  from mobilevis_jax.train.checkpoint import restore_variables
  try:
    variables, meta = restore_variables(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"pretrained={path!r}: {e}") from None
  except Exception as e:
    raise PretrainedFileError(f"pretrained={path!r}: the orbax checkpoint could not be restored "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
  variables = {k: v for k, v in dict(variables).items() if k in ("params", "batch_stats") and v}
  stored = dict(meta.get("model_kwargs") or {})
  ckpt_kw = {k: stored[k] for k in HEAD_KWARGS if k in stored}
  model = create_model(name, **base, **ckpt_kw)
  if "num_classes" not in ckpt_kw or ("distillation" not in ckpt_kw
                                      and hasattr(model, "distillation")):
    ckpt_kw = {**_infer_head_kwargs(name, variables, base), **ckpt_kw}
    model = create_model(name, **base, **ckpt_kw)
  other = meta.get("model_name")
  _check_tree(abstract_variables(model, _PROBE_RESOLUTION), variables,
              f"orbax checkpoint {path} (meta model_name={other!r}) vs {name} {ckpt_kw or ''}")
  if other not in (None, name):
    raise StateDictError(f"orbax checkpoint {path} holds {other!r}, not {name!r} (its variables "
                         "happen to have the same structure; pass the right name)")
  return variables, ckpt_kw


def _infer_head_kwargs(name: str, variables: Mapping, base: dict) -> dict:
  """``num_classes`` / ``distillation`` of a variables tree made without a recorded model_kwargs."""
  from mobilevis_jax.models.registry import create_model
  model = create_model(name, **base)
  heads = head_modules(model)
  params = variables.get("params", {})
  out = {}
  if hasattr(model, "distillation") and heads["distillation"]:
    out["distillation"] = all(m in params for m in heads["distillation"])
  for module, (leaf, axis) in heads["class_axis"].items():
    node = params.get(module)
    for key in leaf:
      node = node.get(key) if isinstance(node, Mapping) else None
    if node is not None:
      out["num_classes"] = int(np.shape(node)[axis])
      break
  return out


# --- PyTorch layout detection ------------------------------------------------------------------

def _factory_accepts(name: str, arg: str, model: nn.Module) -> bool:
  params = inspect.signature(model_info(name).factory).parameters
  return arg in params or (any(p.kind == p.VAR_KEYWORD for p in params.values())
                           and hasattr(model, arg))


def _candidates(name: str, base: dict) -> list[tuple[str, dict]]:
  """(layout, head kwargs) a torch checkpoint of ``name`` may have been written with, likeliest
  first."""
  from mobilevis_jax.models.registry import create_model
  info = model_info(name)
  probe = create_model(name, **base)
  dists = [None]
  if _factory_accepts(name, "distillation", probe):
    released = bool(info.pretrained_cfg and info.pretrained_cfg.distillation)
    dists = [released, not released]
  fused = [False, True] if _factory_accepts(name, "fused", probe) else [None]
  out = []
  for f in fused:
    for layout in info.layouts:
      for d in (dists if not f else dists[:1]):  # a fused model has one head either way
        kw = {k: v for k, v in (("distillation", d), ("fused", f)) if v is not None}
        out.append((layout, kw))
  return out


@functools.lru_cache(maxsize=256)
def _torch_shapes(name: str, layout: str,
                  frozen_kwargs: tuple) -> dict[str, tuple[int, ...]] | None:
  """torch key -> shape that ``name`` built with ``kwargs`` expects in ``layout`` (None: no such
  layout)."""
  from mobilevis_jax.models.registry import create_model
  kwargs = dict(frozen_kwargs)
  model = create_model(name, **kwargs)
  abstract = abstract_variables(model, _PROBE_RESOLUTION)
  try:
    entries = _entries(name, model, abstract, layout)
  except ValueError:  # e.g. timm has no fused RepViT
    return None
  leaves = traverse_util.flatten_dict(nn.unbox(dict(abstract)))
  return {e.torch_key: (e.torch_shape_for(leaves[(e.collection,) + e.path].shape)
                        if e.collection is not None else None) for e in entries}


def _freeze(kwargs: dict) -> tuple:
  return tuple(sorted(kwargs.items()))


def detect_torch_checkpoint(name: str, state_dict: Mapping[str, Any],
                            **base: Any) -> tuple[str, dict]:
  """``(layout, head kwargs)`` of a torch state_dict of ``name``: which layout, whether it has the
  distillation head, whether it is fused, and its ``num_classes``.

  The layout and variant whose key set equals the checkpoint's wins. When none does, the closest
  one is returned, and loading it names the missing and unexpected keys.
  """
  given = set(state_dict)
  best, best_score = None, -1.0
  for layout, kw in _candidates(name, base):
    shapes = _torch_shapes(name, layout, _freeze({**base, **kw, "num_classes": 1000}))
    if shapes is None:
      continue
    expected = set(shapes)
    if expected == given:
      best = (layout, kw)
      break
    score = len(expected & given) / len(expected | given)
    if score > best_score:
      best, best_score = (layout, kw), score
  if best is None:
    raise StateDictError(f"{name} has no PyTorch layout to load this checkpoint with")
  layout, kw = best
  # The class count: the axis along which the classifier's torch shapes change with num_classes
  # (only traced again when some shape differs from a 1000-class model's).
  a = _torch_shapes(name, layout, _freeze({**base, **kw, "num_classes": 1000}))
  differ = [k for k, shape in a.items()
            if shape is not None and k in state_dict and tuple(np.shape(state_dict[k])) != shape]
  if not differ:
    return layout, {**kw, "num_classes": 1000}
  b = _torch_shapes(name, layout, _freeze({**base, **kw, "num_classes": 7}))
  for key in differ:
    shape = a[key]
    if b.get(key) == shape:
      continue
    axes = [i for i, (u, v) in enumerate(zip(shape, b[key])) if u != v]
    got = tuple(np.shape(state_dict[key]))
    if len(got) == len(shape) and len(axes) == 1:
      return layout, {**kw, "num_classes": int(got[axes[0]])}
  return layout, kw


# --- heads ---------------------------------------------------------------------------------------

def _top_level(abstract) -> dict[str, set[str]]:
  return {c: set(tree) for c, tree in dict(abstract).items()}


def _flat(tree) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(nn.unbox(dict(tree)))


def head_modules(model: nn.Module) -> dict[str, Any]:
  """The top-level modules of a classifier that make up its head.

  ``head``: everything a ``features_only`` model does not have (pooling convs included);
  ``classifier``: the head modules whose shapes depend on ``num_classes``; ``distillation``: the
  modules only a ``distillation=True`` model has; ``class_axis``: per classifier module, a leaf
  and the axis of it that has ``num_classes`` entries.
  """
  model = model.clone(parent=None, features_only=False)
  try:
    return _head_modules_cached(model)
  except TypeError:  # an unhashable attribute: compute without the cache
    return _head_modules_cached.__wrapped__(model)


@functools.lru_cache(maxsize=64)
def _head_modules_cached(model: nn.Module) -> dict[str, Any]:
  full = abstract_variables(model, _PROBE_RESOLUTION)
  feats = abstract_variables(model.clone(features_only=True), _PROBE_RESOLUTION)
  other_nc = 7 if model.num_classes != 7 else 8
  fewer = _flat(abstract_variables(model.clone(num_classes=other_nc), _PROBE_RESOLUTION))
  params = set(full.get("params", {}))
  head = params - set(feats.get("params", {}))
  classifier, class_axis = set(), {}
  for path, leaf in _flat(full).items():
    if path[0] == "params" and path[1] in head and fewer.get(path) is not None:
      if fewer[path].shape != leaf.shape:
        classifier.add(path[1])
        axis = [i for i, (u, v) in enumerate(zip(leaf.shape, fewer[path].shape)) if u != v]
        class_axis.setdefault(path[1], (path[2:], axis[0]))
  dist = set()
  if hasattr(model, "distillation") and not getattr(model, "fused", False):
    with_d = abstract_variables(model.clone(distillation=True), _PROBE_RESOLUTION)
    without = abstract_variables(model.clone(distillation=False), _PROBE_RESOLUTION)
    dist = set(with_d.get("params", {})) - set(without.get("params", {}))
  return {"head": head | dist, "classifier": classifier | dist, "distillation": dist,
          "class_axis": class_axis}


def _forward_features_shape(model: nn.Module) -> jax.ShapeDtypeStruct:
  x = jax.ShapeDtypeStruct((1, _PROBE_RESOLUTION, _PROBE_RESOLUTION, 3), jnp.float32)
  feats = model.clone(parent=None, features_only=True)
  return jax.eval_shape(lambda x: feats.init_with_output(jax.random.PRNGKey(0), x)[0][-1], x)


def _init_head(model: nn.Module, rng: jax.Array) -> dict:
  """Fresh head variables, initialised as the model's own init does (``forward_head`` only)."""
  x = jnp.zeros(_forward_features_shape(model).shape, jnp.float32)
  return jax.jit(lambda r, x: model.init(r, x, train=False, method="forward_head"))(rng, x)


def _describe(paths) -> str:
  return ", ".join(sorted(paths)) or "nothing"


def _check_tree(expected, variables, what: str) -> None:
  """Raise :class:`StateDictError` naming the missing, unexpected and misshaped leaves."""
  want = {k: v for k, v in _flat(expected).items() if k[0] in ("params", "batch_stats")}
  have = {k: v for k, v in _flat(variables).items() if k[0] in ("params", "batch_stats")}
  missing = sorted("/".join(k) for k in want.keys() - have.keys())
  unexpected = sorted("/".join(k) for k in have.keys() - want.keys())
  mismatched = sorted(
      f"{'/'.join(k)}: checkpoint {tuple(np.shape(have[k]))} vs model {tuple(want[k].shape)}"
      for k in want.keys() & have.keys() if tuple(np.shape(have[k])) != tuple(want[k].shape))
  if missing or unexpected or mismatched:
    parts = [f"{label} ({len(v)}): {v[:20]}{' ...' if len(v) > 20 else ''}"
             for label, v in (("missing", missing), ("unexpected", unexpected),
                              ("shape mismatches", mismatched)) if v]
    raise StateDictError(f"{what}: " + "; ".join(parts))


def adapt_variables(source: nn.Module, variables: Mapping, target: nn.Module, *,
                    rng: jax.Array | None = None, label: str = "") -> dict:
  """Variables of ``source`` (a model instance) made fit for ``target``, which may differ only in
  its head (``num_classes``, ``distillation``, ``features_only``).

  Classifier modules are re-initialised when the class count differs, the distillation head is
  dropped or initialised when ``distillation`` differs, every head module is dropped for
  ``features_only``. A warning lists the changes; :class:`StateDictError` names the leaves when
  anything else differs.
  """
  if type(source) is not type(target):
    raise ValueError(f"{label}: cannot adapt {type(source).__name__} weights to "
                     f"{type(target).__name__} (a fused checkpoint loads into fused=True; use "
                     "fuse() for the other direction)")
  label = label or type(target).__name__
  heads = head_modules(source)
  params = dict(variables.get("params", {}))
  stats = dict(variables.get("batch_stats", {}))
  dropped, reinit = set(), set()
  if target.features_only:
    dropped = heads["head"] & set(params)
  elif source.features_only:
    reinit = set(heads["head"])
    if hasattr(target, "distillation") and not target.distillation:
      reinit -= heads["distillation"]
  else:
    if source.num_classes != target.num_classes:
      reinit |= heads["classifier"] - heads["distillation"]
    if hasattr(target, "distillation") and heads["distillation"]:
      if source.distillation and not target.distillation:
        dropped |= heads["distillation"]
      elif target.distillation and (not source.distillation
                                    or source.num_classes != target.num_classes):
        reinit |= heads["distillation"]
  for m in dropped | reinit:
    params.pop(m, None)
    stats.pop(m, None)
  out = {"params": params}
  if stats or "batch_stats" in variables:
    out["batch_stats"] = stats
  if reinit:
    fresh = _init_head(target, jax.random.PRNGKey(0) if rng is None else rng)
    for collection, tree in dict(fresh).items():
      if collection in out:
        out[collection].update({m: tree[m] for m in reinit if m in tree})
  if dropped or reinit:
    log.warning("%s: re-initialised %s (checkpoint: %s classes%s -> model: %s classes%s); "
                "dropped %s", label, _describe(reinit), source.num_classes, _dist_note(source),
                target.num_classes, _dist_note(target), _describe(dropped - reinit))
  _check_tree(abstract_variables(target, _PROBE_RESOLUTION), out,
              f"{label}: adapted variables vs the model")
  if not out.get("batch_stats"):
    out.pop("batch_stats", None)
  return out


def _dist_note(model) -> str:
  if model.features_only:
    return ", features only"
  return ", distillation head" if getattr(model, "distillation", False) else ""


def reset_classifier(model: nn.Module, variables: Mapping, num_classes: int, *,
                     rng: jax.Array | None = None, **head_kwargs: Any) -> tuple[nn.Module, dict]:
  """timm's ``reset_classifier`` for Flax: ``(new_model, new_variables)`` with a fresh classifier
  for ``num_classes`` (``head_kwargs`` may also switch ``distillation``); the backbone is kept."""
  new_model = model.clone(parent=None, num_classes=num_classes, **head_kwargs)
  return new_model, adapt_variables(model, variables, new_model, rng=rng,
                                    label=f"reset_classifier({type(model).__name__})")


# --- the eval transform -------------------------------------------------------------------------

EVAL_FIELDS = ("crop_pct", "eval_interpolation", "normalization")
