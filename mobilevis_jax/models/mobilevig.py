"""MobileViG (Munir, Avery & Marculescu, CVPRW 2023), faithful to SLDGroup/MobileViG.

A conv stem (two 3x3 stride-2 conv-BN-GELU) feeds three stages of MBConv inverted residuals at
strides 4/8/16 (``local_backbone``), a stride-2 conv-BN transition to stride 32 (the *last entry*
of ``local_backbone`` in the official code), and one stage of SVGA blocks (Grapher + FFN,
``backbone``). The head average-pools *first*, then applies a 1x1 conv-BN-GELU to the embedding
width and two 1x1 classifiers (``head`` and the DeiT-style ``dist_head``): in training both logits
are returned, in evaluation their mean.

Unlike the official factories, ``num_classes`` and ``distillation`` are honoured. With
``features_only=True`` the model returns the four stage outputs at strides 4/8/16/32 (the last
MBConv of each local stage and the last SVGA block) and has no head.

``graph_conv='knn'`` swaps every SVGA graph convolution for the Vision-GNN KNN graph
(:mod:`mobilevis_jax.layers.knn_graph`) with the same parameters, for ablations.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mobilevis_jax.layers import BatchNorm, Conv2d, ConvBN, DropPath, LayerScale, gelu
from mobilevis_jax.layers.knn_graph import KnnGraphConv
from mobilevis_jax.layers.macs import add_macs
from mobilevis_jax.layers.svga import FFN, Grapher, MRConv4d, conv_init
from mobilevis_jax.models.base import Classifier, HeadOutput
from mobilevis_jax.models.registry import register_model, register_profile_hook


@dataclasses.dataclass(frozen=True)
class MobileViGConfig:
  local_depths: tuple[int, int, int]
  local_channels: tuple[int, int, int]
  global_depth: int
  global_channels: int
  emb_dims: int


VARIANTS = {
    "mobilevig_ti": MobileViGConfig((2, 2, 6), (42, 84, 168), 2, 256, 512),
    "mobilevig_s": MobileViGConfig((3, 3, 9), (42, 84, 176), 3, 256, 512),
    "mobilevig_m": MobileViGConfig((3, 3, 9), (42, 84, 224), 3, 400, 768),
    "mobilevig_b": MobileViGConfig((5, 5, 15), (42, 84, 240), 5, 464, 768),
}


def _report_gelu(shape: tuple[int, ...]) -> None:
  """Count a GELU output of ``shape`` the way the official ``util/profile.py`` does: C x H.

  Its hook tests ``len(output[0].size()) > 3`` (the size of the *first sample*, which is 3-D), so
  it always takes the branch for 2-D outputs and adds ``size(1) * size(2)`` = C x H, not C x H x W.
  The paper's GMACs include exactly that, so we reproduce it under a private tag that the
  MobileViG profile hook moves out of the true MACs. ``shape`` is NHWC or a pooled (B, C), which
  the official code holds as (B, C, 1, 1) and counts as C x 1.
  """
  batch, channels = shape[0], shape[-1]
  rows = shape[1] if len(shape) == 4 else 1
  add_macs(batch * channels * rows, _PROFILER_GELU_TAG)


_PROFILER_GELU_TAG = "_official_profiler_gelu"
_PROFILER_PARAMS_TAG = "_official_profiler_params"


class Stem(nn.Module):
  """conv3x3 s2 (3 -> C/2, bias) BN GELU, conv3x3 s2 (C/2 -> C, bias) BN GELU."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i, feats in enumerate((self.features // 2, self.features), start=1):
      x = Conv2d(feats, 3, strides=2, padding=1, kernel_init=conv_init, name=f"conv{i}")(x)
      x = gelu(BatchNorm(name=f"bn{i}")(x, train))
      _report_gelu(x.shape)
    return x


class Downsample(nn.Module):
  """conv3x3 s2 p1 (bias) + BN, no activation (submodule ``conv`` holds ``conv``/``bn``)."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return ConvBN(self.features, 3, 2, use_bias=True, kernel_init=conv_init, name="conv")(x, train)


class InvertedResidual(nn.Module):
  """MobileViG's MBConv: ``x + DropPath(layer_scale * mlp(x))``, no SE, no activation after add.

  mlp: fc1 1x1 (C -> 4C) + norm1 + GELU, ``mid`` depthwise 3x3 + mid_norm + GELU, fc2 1x1
  (4C -> C) + norm2; every conv has a bias. Layer scale starts at 1e-5.
  """
  mlp_ratio: int = 4
  drop_path: float = 0.0
  layer_scale_init: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    hidden = self.mlp_ratio * c
    y = Conv2d(hidden, 1, kernel_init=conv_init, name="fc1")(x)
    y = gelu(BatchNorm(name="norm1")(y, train))
    _report_gelu(y.shape)
    y = Conv2d(hidden, 3, groups=hidden, kernel_init=conv_init, name="mid")(y)
    y = gelu(BatchNorm(name="mid_norm")(y, train))
    _report_gelu(y.shape)
    y = Conv2d(c, 1, kernel_init=conv_init, name="fc2")(y)
    y = BatchNorm(name="norm2")(y, train)
    y = LayerScale(self.layer_scale_init, name="layer_scale_2")(y)
    return x + DropPath(self.drop_path, name="drop_path")(y, train)


class SVGABlock(nn.Module):
  """One global block: ``Grapher`` then ``FFN`` (official ``Sequential(Grapher, FFN)``)."""
  drop_path: float = 0.0
  k: int = 2
  graph_conv: str = "svga"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.graph_conv == "svga":
      graph = functools.partial(MRConv4d, k=self.k)
    elif self.graph_conv == "knn":
      graph = KnnGraphConv
    else:
      raise ValueError(f"graph_conv must be 'svga' or 'knn', got {self.graph_conv!r}")
    c = x.shape[-1]
    x = Grapher(self.drop_path, graph_conv=graph, name="grapher")(x, train)
    _report_gelu(x.shape[:3] + (2 * c,))   # graph conv's GELU
    x = FFN(4, self.drop_path, name="ffn")(x, train)
    _report_gelu(x.shape[:3] + (4 * c,))   # FFN's GELU
    return x


class MobileViG(Classifier):
  """MobileViG classifier / backbone. Input NHWC float32; see the module docstring."""
  config: MobileViGConfig
  num_classes: int = 1000
  distillation: bool = True
  drop_path_rate: float = 0.1
  dropout_rate: float = 0.0
  k: int = 2
  graph_conv: str = "svga"
  features_only: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> HeadOutput | list[jax.Array]:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"MobileViG expects NHWC images with 3 channels, got shape {x.shape}")
    cfg = self.config
    n_blocks = sum(cfg.local_depths) + cfg.global_depth
    # Stochastic depth rises linearly over all blocks; a Grapher and its FFN share one rate.
    rates = [float(r) for r in np.linspace(0.0, self.drop_path_rate, n_blocks, dtype=np.float32)]

    x = Stem(cfg.local_channels[0], name="stem")(x, train)
    features = []
    index, block = 0, 0
    for stage, (depth, ch) in enumerate(zip(cfg.local_depths, cfg.local_channels)):
      if stage > 0:
        x = Downsample(ch, name=f"local_backbone_{index}")(x, train)
        index += 1
      for _ in range(depth):
        x = InvertedResidual(drop_path=rates[block], name=f"local_backbone_{index}")(x, train)
        index, block = index + 1, block + 1
      features.append(x)
    # The local -> SVGA transition is the last local_backbone entry in the official code.
    x = Downsample(cfg.global_channels, name=f"local_backbone_{index}")(x, train)
    for j in range(cfg.global_depth):
      x = SVGABlock(rates[block], self.k, self.graph_conv, name=f"backbone_{j}")(x, train)
      block += 1
    features.append(x)
    if self.features_only:
      self._report_profiler_params(x.shape[0])
      return features

    out = self._head(x, train)
    self._report_profiler_params(x.shape[0])  # after the head, whose parameters it counts
    return out

  def _head(self, x: jax.Array, train: bool, pre_logits: bool = False) -> HeadOutput:
    # Pool first, then the 1x1 conv: on a 1x1 map that conv is a Dense layer.
    x = Dense1x1(self.config.emb_dims, name="prediction_conv")(jnp.mean(x, axis=(1, 2)))
    x = gelu(BatchNorm(name="prediction_bn")(x, train))
    _report_gelu(x.shape)
    if pre_logits:
      return x
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = Dense1x1(self.num_classes, name="head")(x)
    if not self.distillation:
      return logits
    dist_logits = Dense1x1(self.num_classes, name="dist_head")(x)
    return (logits, dist_logits) if train else (logits + dist_logits) / 2

  def _report_profiler_params(self, batch: int) -> None:
    """Parameters the official Profiler's way: per conv, weight count + in_channels/groups.

    (It adds ``weight.size(1)`` where a bias would be; BN and layer scale are not counted.) The
    count goes through ``add_macs`` times ``batch`` because ``profile`` reports per image.
    """
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(self.variables.get("params", {}))[0]:
      if getattr(path[-1], "key", None) == "kernel":
        total += math.prod(leaf.shape) + leaf.shape[-2]   # HWIO (I = in/groups) or Dense (in, out)
    add_macs(total * batch, _PROFILER_PARAMS_TAG)


def Dense1x1(features: int, name: str) -> nn.Dense:
  """A 1x1 conv on a pooled map, held as Dense (torch key shape (out, in, 1, 1))."""
  return nn.Dense(features, kernel_init=conv_init, bias_init=nn.initializers.zeros,
                  name=name)


def _create(variant: str, num_classes: int = 1000, **kwargs) -> MobileViG:
  return MobileViG(VARIANTS[variant], num_classes=num_classes, **kwargs)


@register_model()
def mobilevig_ti(num_classes: int = 1000, **kwargs: Any) -> MobileViG:
  """MobileViG-Ti: 5.27M params (two heads), 0.7 GMACs (official profiler), 75.7% top-1."""
  return _create("mobilevig_ti", num_classes, **kwargs)


@register_model()
def mobilevig_s(num_classes: int = 1000, **kwargs: Any) -> MobileViG:
  """MobileViG-S: 7.28M params (two heads), 1.0 GMACs (official profiler), 78.2% top-1."""
  return _create("mobilevig_s", num_classes, **kwargs)


@register_model()
def mobilevig_m(num_classes: int = 1000, **kwargs: Any) -> MobileViG:
  """MobileViG-M: 14.08M params (two heads), 1.5 GMACs (official profiler), 80.6% top-1."""
  return _create("mobilevig_m", num_classes, **kwargs)


@register_model()
def mobilevig_b(num_classes: int = 1000, **kwargs: Any) -> MobileViG:
  """MobileViG-B: 26.87M params (two heads), 2.8 GMACs (official profiler), 82.6% top-1."""
  return _create("mobilevig_b", num_classes, **kwargs)


@register_profile_hook
def _official_profiler_counts(model_name: str, counts: dict, params: int, *,
                              resolution: int | None = None) -> dict:
  """Add the official ``util/profile.py`` numbers and keep the private tags out of true MACs.

  Official MACs = conv MACs (ours: conv + dense, same formula) + the C x H GELU count; official
  params = conv weights + in_channels/groups per conv (no BN, no layer scale, both heads).
  """
  gelu_count = counts.pop(_PROFILER_GELU_TAG, 0)
  official_params = counts.pop(_PROFILER_PARAMS_TAG, 0)
  true_macs = sum(counts.values())
  return {
      "macs": true_macs,
      "macs_by_tag": counts,
      "official_profiler_macs": counts.get("conv", 0) + counts.get("dense", 0) + gelu_count,
      "official_profiler_params": official_params,
  }
