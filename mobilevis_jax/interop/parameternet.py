"""PyTorch key layouts of GhostNet and ParameterNet.

* ``timm``: timm's ``ghostnet_050/100/130`` keys (identical to the official GhostNet release),
  also used by the static ``ghostnet_300m/600m`` twins, whose official-style module tree is the
  same with plain ``nn.Conv2d`` at every position.
* ``official``: the official ParameterNet file. At each dynamic position the single
  ``<X>.weight`` becomes ``<X>.routing.{weight,bias}`` (Linear Cin -> M) and
  ``<X>.cond_conv.weight`` ``[M, Cout*Cin/g*kh*kw]``. The Flax expert bank is stored in exactly
  that layout, so it is copied without any transpose.

The layouts are read off the module tree of the Flax model (which mirrors the PyTorch one
block by block), so one function serves every width, table and number of experts.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn

from mobilevis_jax.interop import keymap
from mobilevis_jax.interop.keymap import Entry, register_torch_layout


def _conv_entries(torch_prefix: str, flax_path: Sequence[str], dynamic: bool,
                  routing: str) -> list[Entry]:
  path = tuple(flax_path)
  if not dynamic:
    return keymap.conv(torch_prefix, path)
  if routing != "sigmoid":
    # The paper's softmax/MLP router has no official PyTorch counterpart to name its keys after.
    raise ValueError("only routing='sigmoid' (the official router) has a PyTorch layout")
  return (keymap.dense(f"{torch_prefix}.routing", path + ("routing",))
          + keymap.param(f"{torch_prefix}.cond_conv.weight", path + ("experts",)))


def _ghost_module(torch_prefix: str, flax_path: tuple[str, ...], dynamic: bool,
                  routing: str) -> list[Entry]:
  conv = functools.partial(_conv_entries, dynamic=dynamic, routing=routing)
  return (keymap.conv_bn(f"{torch_prefix}.primary_conv", flax_path + ("primary_conv",), "0", "1",
                         conv_entries=conv)
          + keymap.conv_bn(f"{torch_prefix}.cheap_operation", flax_path + ("cheap_operation",),
                           "0", "1", conv_entries=conv))


def _bottleneck(torch_prefix: str, flax_path: tuple[str, ...], params: dict, dynamic: bool,
                routing: str) -> list[Entry]:
  out = _ghost_module(f"{torch_prefix}.ghost1", flax_path + ("ghost1",), dynamic, routing)
  if "conv_dw" in params:
    out += keymap.conv(f"{torch_prefix}.conv_dw", flax_path + ("conv_dw",))
    out += keymap.bn(f"{torch_prefix}.bn_dw", flax_path + ("bn_dw",))
  if "se" in params:
    out += keymap.conv(f"{torch_prefix}.se.conv_reduce", flax_path + ("se", "reduce"), bias=True)
    out += keymap.conv(f"{torch_prefix}.se.conv_expand", flax_path + ("se", "expand"), bias=True)
  out += _ghost_module(f"{torch_prefix}.ghost2", flax_path + ("ghost2",), dynamic, routing)
  if "shortcut_dw" in params:
    conv = functools.partial(_conv_entries, dynamic=dynamic, routing=routing)
    out += keymap.conv_bn(f"{torch_prefix}.shortcut", flax_path + ("shortcut_dw",), "0", "1",
                          conv_entries=conv)
    out += keymap.conv_bn(f"{torch_prefix}.shortcut", flax_path + ("shortcut_pw",), "2", "3",
                          conv_entries=conv)
  return out


def _block_indices(params: dict) -> list[tuple[int, int]]:
  idx = []
  for name in params:
    if name.startswith("blocks_"):
      _, i, j = name.split("_")
      idx.append((int(i), int(j)))
  return sorted(idx)


def ghostnet_entries(model: nn.Module, variables: dict) -> list[Entry]:
  """Entries for any :class:`~mobilevis_jax.models.parameternet.GhostNet` (PyTorch key order)."""
  params = variables["params"]
  dynamic, routing = model.dynamic, model.routing
  out = _conv_entries("conv_stem", ("conv_stem",), dynamic, routing)
  out += keymap.bn("bn1", ("bn1",))
  last_group = len(model.table)
  for i, j in _block_indices(params):
    name = f"blocks_{i}_{j}"
    if i == last_group:  # the final 1x1 ConvBnAct: keys conv / bn1
      out += keymap.conv_bn(f"blocks.{i}.{j}", (name,), "conv", "bn1",
                            conv_entries=functools.partial(_conv_entries, dynamic=dynamic,
                                                           routing=routing))
    else:
      out += _bottleneck(f"blocks.{i}.{j}", (name,), params[name], dynamic, routing)
  if "conv_head" in params:
    out += keymap.conv("conv_head", ("conv_head",), bias=True)
    out += keymap.dense("classifier", ("classifier",))
  return out


@register_torch_layout("official")
def official_layout(model_name: str, model: nn.Module, variables: dict) -> list[Entry]:
  if not model.dynamic:
    raise ValueError(f"{model_name} has static convs: its PyTorch keys are the 'timm' layout")
  return ghostnet_entries(model, variables)


@register_torch_layout("timm")
def timm_layout(model_name: str, model: nn.Module, variables: dict) -> list[Entry]:
  if model.dynamic:
    raise ValueError(f"{model_name} has dynamic convs: timm has no such model; use the "
                     "'official' (ParameterNet) layout")
  return ghostnet_entries(model, variables)
