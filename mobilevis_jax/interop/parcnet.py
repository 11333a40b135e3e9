"""PyTorch key layout of ParC-Net: the official ``edgeformer`` state_dict (hkzhang91/ParC-Net).

The Flax tree mirrors the official module tree with ``_`` for ``.`` in sequence indices
(``layer_3.1`` -> ``layer_3_1``); the only renames are inside the ParC block:

================================  ===========================================
official (under ``spatial_global_rep.i``)  Flax (under ``block_i``)
================================  ===========================================
``meta_kernel_1_H`` (d,1,K,1)     ``parc_1_h/kernel`` (K,1,1,d)
``meta_kernel_1_W`` (d,1,1,K)     ``parc_1_w/kernel`` (1,K,1,d)
``meta_kernel_2_H`` / ``_2_W``    ``parc_2_h/kernel`` / ``parc_2_w/kernel``
``meta_pe_1_H`` (1,d,K,1)         ``pe_1_h`` (1,K,1,d)
``meta_pe_1_W`` (1,d,1,K)         ``pe_1_w`` (1,1,K,d)
``meta_pe_2_H`` / ``_2_W``        ``parc_2_h/pe`` / ``parc_2_w/pe``
``pre_Norm_1`` / ``pre_Norm_2``   ``pre_norm_1`` / ``pre_norm_2``
``ffn.0`` / ``ffn.1`` / ``ffn.4``  ``ffn_norm`` / ``ffn_fc1`` / ``ffn_fc2``
``ca.fc.0`` ``ca.fc.1`` ``ca.fc.3`` ``ca.fc.4``  ``ca/reduce/{conv,bn}``, ``ca/expand/{conv,bn}``
``spatial_global_rep.N`` (BN)     ``global_norm``
================================  ===========================================

Official quirk: ``edgeformer._make_outer_frame_v1`` stores each stage's downsampling block as
``self.residual`` too, so the state_dict has a top-level ``residual.*`` copy of ``layer_5.0.*``
(18 keys). Export writes it; import requires it and checks it equals ``layer_5.0``.
"""
from __future__ import annotations

import flax.linen as nn

from mobilevis_jax.interop.keymap import (
  Entry,
  alias_prefix,
  bn,
  conv,
  conv_bn,
  dense,
  param,
  register_torch_layout,
)

# NHWC-broadcastable PE (1, K, 1, d) / (1, 1, K, d) -> torch NCHW (1, d, K, 1) / (1, d, 1, K).
_PE_TO_NCHW = (0, 3, 1, 2)
# Bare kernel Parameters (not conv modules, so no ``.weight`` suffix): HWIO -> OIHW.
_HWIO_TO_OIHW = (3, 2, 0, 1)
# cvnets ``ConvLayer`` with norm: ``<prefix>.block.conv`` + ``<prefix>.block.norm`` (torch names).
_CONV_LAYER = ("conv", "norm")


def _inverted_residual(prefix: str, path: tuple[str, ...]) -> list[Entry]:
  out = []
  for part in ("exp_1x1", "conv_3x3", "red_1x1"):
    out += conv_bn(f"{prefix}.block.{part}.block", path + (part, "conv_bn"), *_CONV_LAYER)
  return out


def _parc_block(prefix: str, path: tuple[str, ...], use_pe: bool) -> list[Entry]:
  # Parameters first, in the official registration order, then the submodules.
  out = []
  for i, axis in ((1, "H"), (1, "W"), (2, "H"), (2, "W")):
    out += param(f"{prefix}.meta_kernel_{i}_{axis}", path + (f"parc_{i}_{axis.lower()}", "kernel"),
                 transpose=_HWIO_TO_OIHW)
  if use_pe:
    out += param(f"{prefix}.meta_pe_1_H", path + ("pe_1_h",), transpose=_PE_TO_NCHW)
    out += param(f"{prefix}.meta_pe_1_W", path + ("pe_1_w",), transpose=_PE_TO_NCHW)
    out += param(f"{prefix}.meta_pe_2_H", path + ("parc_2_h", "pe"), transpose=_PE_TO_NCHW)
    out += param(f"{prefix}.meta_pe_2_W", path + ("parc_2_w", "pe"), transpose=_PE_TO_NCHW)
  out += bn(f"{prefix}.pre_Norm_1", path + ("pre_norm_1",))
  out += bn(f"{prefix}.pre_Norm_2", path + ("pre_norm_2",))
  out += bn(f"{prefix}.ffn.0", path + ("ffn_norm",))
  out += conv(f"{prefix}.ffn.1", path + ("ffn_fc1",), bias=True)
  out += conv(f"{prefix}.ffn.4", path + ("ffn_fc2",), bias=True)
  out += conv(f"{prefix}.ca.fc.0", path + ("ca", "reduce", "conv"))
  out += bn(f"{prefix}.ca.fc.1", path + ("ca", "reduce", "bn"))
  out += conv(f"{prefix}.ca.fc.3", path + ("ca", "expand", "conv"))
  out += bn(f"{prefix}.ca.fc.4", path + ("ca", "expand", "bn"))
  return out


def _outer_frame(prefix: str, path: tuple[str, ...], num_blocks: int) -> list[Entry]:
  out = conv_bn(f"{prefix}.dim_adaptive.0.block", path + ("dim_adaptive_0", "conv_bn"),
                *_CONV_LAYER)
  out += conv(f"{prefix}.dim_adaptive.1.block.conv", path + ("dim_adaptive_1",))
  for i in range(num_blocks):
    out += _parc_block(f"{prefix}.spatial_global_rep.{i}", path + (f"block_{i}",), use_pe=i == 0)
  out += bn(f"{prefix}.spatial_global_rep.{num_blocks}", path + ("global_norm",))
  out += conv_bn(f"{prefix}.channel_adaptive.block", path + ("channel_adaptive", "conv_bn"),
                 *_CONV_LAYER)
  out += conv_bn(f"{prefix}.local_global_fusion.block", path + ("local_global_fusion", "conv_bn"),
                 *_CONV_LAYER)
  return out


@register_torch_layout("official")
def official_layout(model_name: str, model: nn.Module, variables: dict) -> list[Entry]:
  """Entries in the official state_dict order (``residual.*`` sits between layer_2 and layer_3)."""
  del model_name, variables
  cfg = model.config
  entries = conv_bn("conv_1.block", ("conv_1", "conv_bn"), *_CONV_LAYER)
  entries += _inverted_residual("layer_1.0", ("layer_1_0",))
  for j in range(3):
    entries += _inverted_residual(f"layer_2.{j}", (f"layer_2_{j}",))
  stages = []
  for idx, stage in enumerate(cfg.stages, start=3):
    stages += _inverted_residual(f"layer_{idx}.0", (f"layer_{idx}_0",))
    stages += _outer_frame(f"layer_{idx}.1", (f"layer_{idx}_1",), stage.num_blocks)
  entries += alias_prefix(stages, "layer_5.0.", "residual.")
  entries += stages
  if not model.features_only:
    entries += conv_bn("conv_1x1_exp.block", ("conv_1x1_exp", "conv_bn"), *_CONV_LAYER)
    entries += dense("classifier.fc", ("classifier",))
  return entries
