"""Describing a PyTorch state_dict as a list of entries, one per tensor.

A family's layout function returns the *complete* list of :class:`Entry` objects for one model;
the generic converters in :mod:`mobilevis_jax.interop.state_dict` then do everything else
(layout transposes, validation, ``num_batches_tracked``). Keeping the mapping declarative means
the order and the names of the keys can be read straight off one function per family.

A ``flax_path`` is a tuple of module names below the collection root, e.g.
``('features_0', 'conv', 'bn')``; builders append the leaf name (``kernel``, ``scale``, ...).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

# How a Flax leaf becomes a PyTorch tensor.
CONV = "conv"            # HWIO <-> OIHW
DENSE = "dense"          # (in, out) <-> (out, in) [optionally viewed as torch_shape, e.g. 1x1 conv]
COPY = "copy"            # same values, optionally reshaped (e.g. layer scale (C,) <-> (C,1,1))
PERMUTE = "permute"      # arbitrary transpose given by ``perm`` (Flax axes in torch order)
NUM_BATCHES_TRACKED = "num_batches_tracked"  # no Flax leaf; written as int64 0
ALIAS = "alias"          # a second torch key holding the same tensor as ``alias_of``


@dataclasses.dataclass(frozen=True)
class Entry:
  torch_key: str
  kind: str
  collection: str | None = None
  path: tuple[str, ...] = ()
  torch_shape: tuple[int, ...] | None = None
  perm: tuple[int, ...] | None = None
  alias_of: str | None = None

  def torch_shape_for(self, flax_shape: Sequence[int]) -> tuple[int, ...]:
    s = tuple(flax_shape)
    if self.kind == CONV:
      if len(s) != 4:
        raise ValueError(f"{self.torch_key}: conv kernel must be 4-D, got {s}")
      return (s[3], s[2], s[0], s[1])
    if self.kind == DENSE:
      if len(s) != 2:
        raise ValueError(f"{self.torch_key}: dense kernel must be 2-D, got {s}")
      return self.torch_shape or (s[1], s[0])
    if self.kind == COPY:
      return self.torch_shape or s
    if self.kind == PERMUTE:
      return tuple(s[p] for p in self.perm)
    raise ValueError(f"{self.torch_key}: entry of kind {self.kind!r} has no Flax leaf")

  def to_torch(self, value: np.ndarray) -> np.ndarray:
    v = np.asarray(value)
    if self.kind == CONV:
      v = v.transpose(3, 2, 0, 1)
    elif self.kind == DENSE:
      v = v.T.reshape(self.torch_shape_for(v.shape))
    elif self.kind == COPY:
      v = v.reshape(self.torch_shape_for(v.shape))
    elif self.kind == PERMUTE:
      v = v.transpose(self.perm)
    else:
      raise ValueError(f"{self.torch_key}: entry of kind {self.kind!r} has no Flax leaf")
    return np.ascontiguousarray(v)

  def from_torch(self, value: np.ndarray, flax_shape: Sequence[int]) -> np.ndarray:
    v = np.asarray(value)
    flax_shape = tuple(flax_shape)
    if self.kind == CONV:
      v = v.transpose(2, 3, 1, 0)
    elif self.kind == DENSE:
      v = v.reshape(flax_shape[::-1]).T
    elif self.kind == COPY:
      v = v.reshape(flax_shape)
    elif self.kind == PERMUTE:
      v = v.transpose(np.argsort(self.perm))
    else:
      raise ValueError(f"{self.torch_key}: entry of kind {self.kind!r} has no Flax leaf")
    return np.ascontiguousarray(v)


def _join(prefix: str, name: str) -> str:
  return f"{prefix}.{name}" if prefix else name


def conv(torch_prefix: str, flax_path: Sequence[str], bias: bool = False) -> list[Entry]:
  """``<prefix>.weight`` (+ ``.bias``) of a Conv2d <-> ``params/<path>/kernel`` (+ ``bias``)."""
  path = tuple(flax_path)
  out = [Entry(_join(torch_prefix, "weight"), CONV, "params", path + ("kernel",))]
  if bias:
    out.append(Entry(_join(torch_prefix, "bias"), COPY, "params", path + ("bias",)))
  return out


def bn(torch_prefix: str, flax_path: Sequence[str], affine: bool = True) -> list[Entry]:
  """A BatchNorm{1,2}d: weight/bias (params), running stats (batch_stats), num_batches_tracked."""
  path = tuple(flax_path)
  out = []
  if affine:
    out += [Entry(_join(torch_prefix, "weight"), COPY, "params", path + ("scale",)),
            Entry(_join(torch_prefix, "bias"), COPY, "params", path + ("bias",))]
  out += [Entry(_join(torch_prefix, "running_mean"), COPY, "batch_stats", path + ("mean",)),
          Entry(_join(torch_prefix, "running_var"), COPY, "batch_stats", path + ("var",)),
          Entry(_join(torch_prefix, "num_batches_tracked"), NUM_BATCHES_TRACKED)]
  return out


def conv_bn(torch_prefix: str, flax_path: Sequence[str], conv_name: str = "c", bn_name: str = "bn",
            flax_conv: str = "conv", flax_bn: str = "bn", *, bias: bool = False,
            conv_entries: Callable[[str, tuple[str, ...]], list[Entry]] | None = None,
            ) -> list[Entry]:
  """A conv + BN pair (``layers.ConvBN``) stored as two torch submodules, conv keys first.

  The torch modules are ``<prefix>.<conv_name>`` and ``<prefix>.<bn_name>``: ``c`` / ``bn`` in
  RepViT's ``Conv2d_BN``, ``0`` / ``1`` in an ``nn.Sequential``, ``conv`` / ``norm`` in cvnets'
  ``ConvLayer``. ``bias`` adds the conv bias; ``conv_entries(torch_key_prefix, flax_path)``
  replaces the plain conv (e.g. ParameterNet's dynamic conv) while keeping the pairing.
  """
  path = tuple(flax_path)
  conv_prefix, conv_path = _join(torch_prefix, conv_name), path + (flax_conv,)
  if conv_entries is None:
    conv_part = conv(conv_prefix, conv_path, bias=bias)
  else:
    conv_part = conv_entries(conv_prefix, conv_path)
  return conv_part + bn(_join(torch_prefix, bn_name), path + (flax_bn,))


def dense(torch_prefix: str, flax_path: Sequence[str], bias: bool = True,
          torch_shape: Sequence[int] | None = None) -> list[Entry]:
  """A Linear (or a 1x1 conv head stored as Dense: pass ``torch_shape=(out, in, 1, 1)``)."""
  path = tuple(flax_path)
  shape = tuple(torch_shape) if torch_shape is not None else None
  out = [Entry(_join(torch_prefix, "weight"), DENSE, "params", path + ("kernel",),
               torch_shape=shape)]
  if bias:
    out.append(Entry(_join(torch_prefix, "bias"), COPY, "params", path + ("bias",)))
  return out


def param(torch_key: str, flax_path: Sequence[str], torch_shape: Sequence[int] | None = None,
          transpose: Sequence[int] | None = None, collection: str = "params") -> list[Entry]:
  """A single tensor; ``flax_path`` includes the leaf name here.

  ``torch_shape`` reshapes (same element order); ``transpose`` gives, for each torch axis, the
  Flax axis it comes from.
  """
  path = tuple(flax_path)
  if transpose is not None:
    return [Entry(torch_key, PERMUTE, collection, path, perm=tuple(transpose))]
  return [Entry(torch_key, COPY, collection, path,
                torch_shape=tuple(torch_shape) if torch_shape is not None else None)]


def alias(torch_key: str, same_as: str) -> list[Entry]:
  """A duplicated key (two torch names for one tensor, e.g. ParC-Net's ``residual.*``)."""
  return [Entry(torch_key, ALIAS, alias_of=same_as)]


def alias_prefix(entries: Sequence[Entry], old_prefix: str, new_prefix: str) -> list[Entry]:
  """Aliases under ``new_prefix`` for every entry whose key starts with ``old_prefix``."""
  return [Entry(new_prefix + e.torch_key[len(old_prefix):], ALIAS, alias_of=e.torch_key)
          for e in entries if e.torch_key.startswith(old_prefix)]


# --- layout registry ---------------------------------------------------------------------------
LayoutFn = Callable[..., list[Entry]]
_LAYOUTS: dict[tuple[str, str], LayoutFn] = {}


def register_torch_layout(layout: str) -> Callable[[LayoutFn], LayoutFn]:
  """Decorator registering ``fn(model_name, model, variables) -> list[Entry]`` as the ``layout``
  key layout of the family named by ``fn``'s module (``interop/repvit.py`` -> ``'repvit'``)."""

  def wrap(fn):
    family = fn.__module__.rsplit(".", 1)[-1]
    _LAYOUTS[(family, layout)] = fn
    return fn

  return wrap


def get_layout(family: str, layout: str) -> LayoutFn:
  fn = _LAYOUTS.get((family, layout))
  if fn is None:
    have = sorted(l for f, l in _LAYOUTS if f == family)
    raise ValueError(f"family {family!r} has no {layout!r} PyTorch layout "
                     f"(it has: {have or 'none'})")
  return fn
