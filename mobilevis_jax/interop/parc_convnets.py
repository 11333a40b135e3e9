"""PyTorch key layout of the official ParC-ConvNets (hkzhang91/ParC-Net, ``ParC_ConvNets/``).

One ``official`` layout per model, in the official ``state_dict()`` order:

* ParC-ConvNeXt-XT: ``downsample_layers.{i}.{0,1}``, ``stages.{i}.{j}.{gamma, dwconv | gcc_H/gcc_W,
  norm, pwconv1, pwconv2}``, ``norm``, ``head`` (torchvision-free ConvNeXt naming);
* ParC-ResNet50: torchvision ResNet naming, with ``parc_H``/``parc_W`` in place of ``conv2`` in
  the ParC bottlenecks;
* ParC-MobileNetV2: torchvision MobileNetV2 naming (``features.{i}.conv.{...}``), with
  ``pw_expand``, ``gcc_H``/``gcc_W``, ``bn``, ``pw_linear`` in the ParC blocks.

A ParC operator is stored as ``<prefix>.pe`` (1, C, K, 1) / (1, C, 1, K) and
``<prefix>.gcc_conv.{weight,bias}``: weight (C, 1, K, 1) depthwise or (C, C, K, 1) dense for
ParC-H, with the K axis last for ParC-W.
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
from mobilevis_jax.models import parc_convnets as pcn


def _parc(torch_prefix: str, flax_path: tuple[str, ...], use_pe: bool) -> list[Entry]:
  """Entries of one official ``ParC_operator`` (``pe`` first: torch lists own params first).

  ``layers.parc.ParCConv`` keeps its kernel in HWIO ((K, 1, I, O) for ParC-H, (1, K, I, O) for
  ParC-W), so the weight converts like any conv kernel, and its embedding as (1, K, 1, C) /
  (1, 1, K, C), which is the torch (1, C, K, 1) / (1, C, 1, K) in NHWC order.
  """
  out = param(f"{torch_prefix}.pe", flax_path + ("pe",), transpose=(0, 3, 1, 2)) if use_pe else []
  return out + conv(f"{torch_prefix}.gcc_conv", flax_path, bias=True)


def _layer_norm(torch_prefix: str, flax_path: tuple[str, ...]) -> list[Entry]:
  return (param(f"{torch_prefix}.weight", flax_path + ("scale",))
          + param(f"{torch_prefix}.bias", flax_path + ("bias",)))


# ----------------------------------------------------------------------------------------------
def _convnext(model: pcn.ParCConvNeXt) -> list[Entry]:
  out: list[Entry] = []
  for i in range(len(model.depths)):
    if i == 0:
      out += conv("downsample_layers.0.0", ("stem_conv",), bias=True)
      out += _layer_norm("downsample_layers.0.1", ("stem_norm",))
    else:
      out += _layer_norm(f"downsample_layers.{i}.0", (f"downsample{i}_norm",))
      out += conv(f"downsample_layers.{i}.1", (f"downsample{i}_conv",), bias=True)
  for i, depth in enumerate(model.depths):
    for j in range(depth):
      t, f = f"stages.{i}.{j}", (f"stages_{i}_{j}",)
      out += param(f"{t}.gamma", f + ("gamma", "scale"))
      if j >= model.parc_start[i]:
        for axis in "HW":
          out += _parc(f"{t}.gcc_{axis}", f + ("parc", f"gcc_{axis}"), use_pe=True)
      else:
        out += conv(f"{t}.dwconv", f + ("dwconv",), bias=True)
      out += _layer_norm(f"{t}.norm", f + ("norm",))
      out += dense(f"{t}.pwconv1", f + ("pwconv1",))
      out += dense(f"{t}.pwconv2", f + ("pwconv2",))
  if not model.features_only:
    out += _layer_norm("norm", ("norm",)) + dense("head", ("head",))
  return out


def _resnet(model: pcn.ParCResNet) -> list[Entry]:
  out = conv("conv1", ("conv1",)) + bn("bn1", ("bn1",))
  for i, depth in enumerate(model.layers):
    for j in range(depth):
      t, f = f"layer{i + 1}.{j}", (f"layer{i + 1}_{j}",)
      out += conv(f"{t}.conv1", f + ("conv1",)) + bn(f"{t}.bn1", f + ("bn1",))
      if j > 0 and j >= model.parc_start[i]:
        for axis in "HW":
          out += _parc(f"{t}.parc_{axis}", f + ("parc", f"parc_{axis}"), use_pe=True)
      else:
        out += conv(f"{t}.conv2", f + ("conv2",))
      out += bn(f"{t}.bn2", f + ("bn2",))
      out += conv(f"{t}.conv3", f + ("conv3",)) + bn(f"{t}.bn3", f + ("bn3",))
      if j == 0:
        out += conv(f"{t}.downsample.0", f + ("downsample_conv",))
        out += bn(f"{t}.downsample.1", f + ("downsample_bn",))
  if not model.features_only:
    out += dense("fc", ("fc",))
  return out


def _mobilenetv2(model: pcn.ParCMobileNetV2) -> list[Entry]:
  out = conv_bn("features.0", ("features_0",), "0", "1")
  idx = 1
  for st in model.stages:
    for i in range(st.blocks):
      t, f = f"features.{idx}", (f"features_{idx}",)
      if i < st.plain_blocks:
        # torchvision numbering: conv.{0: [expand], next: dw, then project conv, project BN}
        n = 0
        if st.expansion != 1:
          out += conv_bn(f"{t}.conv.0", f + ("expand",), "0", "1")
          n = 1
        out += conv_bn(f"{t}.conv.{n}", f + ("dw",), "0", "1")
        out += conv_bn(f"{t}.conv", f + ("project",), str(n + 1), str(n + 2))
      else:
        out += conv_bn(f"{t}.pw_expand", f + ("pw_expand",), "0", "1")
        for axis in "HW":
          out += _parc(f"{t}.gcc_{axis}", f + ("parc", f"gcc_{axis}"),
                       use_pe=(i == st.plain_blocks))
        out += bn(f"{t}.bn", f + ("bn",))
        out += conv_bn(f"{t}.pw_linear", f + ("pw_linear",), "0", "1")
      idx += 1
  if not model.features_only:
    out += conv_bn(f"features.{idx}", (f"features_{idx}",), "0", "1")
    out += dense("classifier.1", ("classifier",))
  return out


_BUILDERS = {
    pcn.ParCConvNeXt: _convnext,
    pcn.ParCResNet: _resnet,
    pcn.ParCMobileNetV2: _mobilenetv2,
}


@register_torch_layout("official")
def official_layout(model_name: str, model: nn.Module, variables: dict) -> list[Entry]:
  """Entries of the official state_dict of ``model`` (any of the three ParC-ConvNets)."""
  builder = _BUILDERS.get(type(model))
  if builder is None:
    raise ValueError(f"{model_name}: no official ParC-ConvNets layout for {type(model).__name__}")
  del variables  # the layout depends on the architecture only
  return builder(model)
