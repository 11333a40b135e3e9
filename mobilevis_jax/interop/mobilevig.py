"""MobileViG <-> the official PyTorch state_dict (SLDGroup/MobileViG ``models/mobilevig.py``).

Official key layout (the module tree of the official ``MobileViG``):

* ``stem.stem.{0,3}`` convs (bias) and ``stem.stem.{1,4}`` BNs;
* ``local_backbone.i``: an ``InvertedResidual`` (``layer_scale_2`` of shape (C,1,1) and
  ``mlp.{fc1,norm1,mid,mid_norm,fc2,norm2}``) or a ``Downsample`` (``conv.0`` conv, ``conv.1``
  BN); the last entry is the local -> SVGA transition;
* ``backbone.j.0`` Grapher (``fc1.{0,1}``, ``graph_conv.nn.{0,1}``, ``fc2.{0,1}``) and
  ``backbone.j.1`` FFN (``fc1.{0,1}``, ``fc2.{0,1}``);
* ``prediction.1`` (1x1 conv after the pool), ``prediction.2`` (BN), ``head`` and ``dist_head``
  (1x1 convs, stored here as Dense layers).

Every BN contributes ``num_batches_tracked``, so an exported file passes the official
``--eval`` path, which loads with ``strict=True``.
"""
from __future__ import annotations

import flax.linen as nn

from mobilevis_jax.interop.keymap import (
  Entry,
  bn,
  conv,
  conv_bn,
  dense,
  param,
  register_torch_layout,
)


@register_torch_layout("official")
def official_layout(model_name: str, model: nn.Module, variables: dict) -> list[Entry]:
  cfg = model.config
  entries = (conv("stem.stem.0", ("stem", "conv1"), bias=True) + bn("stem.stem.1", ("stem", "bn1"))
             + conv("stem.stem.3", ("stem", "conv2"), bias=True)
             + bn("stem.stem.4", ("stem", "bn2")))

  index = 0
  for stage, depth in enumerate(cfg.local_depths):
    if stage > 0:
      entries += conv_bn(f"local_backbone.{index}.conv", (f"local_backbone_{index}", "conv"),
                         "0", "1", bias=True)
      index += 1
    for _ in range(depth):
      t, f = f"local_backbone.{index}", f"local_backbone_{index}"
      channels = cfg.local_channels[stage]
      entries += param(f"{t}.layer_scale_2", (f, "layer_scale_2", "scale"),
                       torch_shape=(channels, 1, 1))
      # Official key order: the convs fc1, fc2, mid, then the BNs mid_norm, norm1, norm2.
      for name in ("fc1", "fc2", "mid"):
        entries += conv(f"{t}.mlp.{name}", (f, name), bias=True)
      for name in ("mid_norm", "norm1", "norm2"):
        entries += bn(f"{t}.mlp.{name}", (f, name))
      index += 1
  entries += conv_bn(f"local_backbone.{index}.conv", (f"local_backbone_{index}", "conv"),
                     "0", "1", bias=True)

  for j in range(cfg.global_depth):
    t, f = f"backbone.{j}", f"backbone_{j}"
    entries += conv_bn(f"{t}.0.fc1", (f, "grapher", "fc1"), "0", "1", bias=True)
    entries += (conv(f"{t}.0.graph_conv.nn.0", (f, "grapher", "graph_conv", "conv"), bias=True)
                + bn(f"{t}.0.graph_conv.nn.1", (f, "grapher", "graph_conv", "bn")))
    entries += conv_bn(f"{t}.0.fc2", (f, "grapher", "fc2"), "0", "1", bias=True)
    entries += conv_bn(f"{t}.1.fc1", (f, "ffn", "fc1"), "0", "1", bias=True)
    entries += conv_bn(f"{t}.1.fc2", (f, "ffn", "fc2"), "0", "1", bias=True)

  if model.features_only:
    return entries
  entries += dense("prediction.1", ("prediction_conv",),
                   torch_shape=(cfg.emb_dims, cfg.global_channels, 1, 1))
  entries += bn("prediction.2", ("prediction_bn",))
  heads = ("head", "dist_head") if model.distillation else ("head",)
  for head in heads:
    entries += dense(head, (head,), torch_shape=(model.num_classes, cfg.emb_dims, 1, 1))
  return entries
