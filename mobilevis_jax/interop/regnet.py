"""PyTorch key layout of RegNetY: timm's ``timm.models.regnet`` keys (``timm`` layout).

The Flax module tree mirrors timm's module for module (``stem``, ``s<i>.b<j>.{conv1,conv2,se,
conv3,downsample}``, ``head.fc``), so each torch key is its Flax path joined with dots, except the
classifier (Flax ``head`` is timm's ``head.fc``). This is also the layout of DeiT's
``regnety_160`` teacher as timm serves it (``regnety_160.deit_in1k``).
"""
from __future__ import annotations

import flax.linen as nn

from mobilevis_jax.interop import keymap
from mobilevis_jax.interop.keymap import Entry, register_torch_layout


def _conv_bn(torch_prefix: str, flax_path: tuple[str, ...]) -> list[Entry]:
  """timm ``ConvNormAct``: ``<prefix>.conv`` and ``<prefix>.bn`` (a BatchNormAct2d, BN keys)."""
  return keymap.conv_bn(torch_prefix, flax_path, conv_name="conv", bn_name="bn")


def _block(prefix: str, path: tuple[str, ...], block_params: dict) -> list[Entry]:
  # timm registers conv1, conv2, se, conv3, downsample in this order: the state_dict order.
  out = (_conv_bn(f"{prefix}.conv1", path + ("conv1",))
         + _conv_bn(f"{prefix}.conv2", path + ("conv2",)))
  if "se" in block_params:
    out += keymap.conv(f"{prefix}.se.fc1", path + ("se", "fc1"), bias=True)
    out += keymap.conv(f"{prefix}.se.fc2", path + ("se", "fc2"), bias=True)
  out += _conv_bn(f"{prefix}.conv3", path + ("conv3",))
  if "downsample" in block_params:
    out += _conv_bn(f"{prefix}.downsample", path + ("downsample",))
  return out


def regnet_entries(model: nn.Module, variables: dict) -> list[Entry]:
  """Entries of any :class:`~mobilevis_jax.models.regnet.RegNet`, in timm's state_dict order."""
  params = variables["params"]
  out = _conv_bn("stem", ("stem",))
  for i, (_, depth) in enumerate(model.stages):
    stage = f"s{i + 1}"
    for j in range(depth):
      block = f"b{j + 1}"
      out += _block(f"{stage}.{block}", (stage, block), params[stage][block])
  if not model.features_only:
    out += keymap.dense("head.fc", ("head",))
  return out


@register_torch_layout("timm")
def timm_layout(model_name: str, model: nn.Module, variables: dict) -> list[Entry]:
  return regnet_entries(model, variables)
