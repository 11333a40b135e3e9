"""RegNetY (Radosavovic et al., "Designing Network Design Spaces", CVPR 2020) as timm builds it.

Here as the distillation teacher of the RepViT and MobileViG recipes: both distil from DeiT's
``regnety_160`` (RegNetY-16GF) weights (../shared/reference/training.md), which timm serves as
``regnety_160.deit_in1k``. The module tree, its names and the initialisation follow
``timm.models.regnet`` (timm 1.0), so timm state_dicts load key for key (``interop/regnet.py``).

Network: stem (3x3 stride-2 conv, BN, ReLU, 32 channels) -> four stages, each at stride 2 ->
global average pool -> Linear. A stage is ``depth`` Y blocks of width ``w``:

    conv1 1x1 (BN, ReLU) -> conv2 3x3 grouped, stride s on the first block (BN, ReLU)
    -> SE -> conv3 1x1 (BN) -> + shortcut -> ReLU

with bottleneck ratio 1 (the inner width is ``w``), group width ``g`` (``w // g`` groups), the SE
reduction width ``round(0.25 * block input width)`` (relative to the *block input*, so it differs
between the first block of a stage and the others), and a 1x1 stride-s conv + BN shortcut wherever
the width or the stride changes (otherwise identity). There is no final conv: the pooled stage-4
map feeds the classifier.

Variants: timm generates per-block widths from the RegNet parameters (w0, wa, wm, depth), merges
equal widths into stages and rounds them to multiples of the group width. The resulting tables are
written out below (``STAGES``); ``tests/models/test_regnet.py`` checks them against timm.

==============  ==========  ===========================================  =====  ==========
name            params      stages (width x depth)                       group  GMACs @224
==============  ==========  ===========================================  =====  ==========
regnety_002     3,162,996   24x1, 56x1, 152x4, 368x7                     8      0.1995
regnety_004     4,344,144   48x1, 104x3, 208x6, 440x6                    8      0.4018
regnety_160     83,590,140  224x2, 448x4, 1232x11, 3024x1                112    15.91
==============  ==========  ===========================================  =====  ==========

Parameters equal timm's; MACs are :func:`mobilevis_jax.profiling.profile`'s (convolutions and the
Linear), the "16GF" of RegNetY-16GF.

``features_only=True`` returns the outputs of the four stages (strides 4/8/16/32) and builds no
head.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobilevis_jax.layers import Conv2d, ConvBN, DropPath, fan_out_normal_init, relu
from mobilevis_jax.models.base import Classifier
from mobilevis_jax.models.registry import register_model

# (width, depth) per stage and the group width, as timm's ``RegNet._get_stage_args`` derives them
# from ``model_cfgs`` (RegNet parameters in the comments). Every Y model has SE ratio 0.25 and
# bottleneck ratio 1.
STAGES: dict[str, tuple[tuple[tuple[int, int], ...], int]] = {
    # w0=24, wa=36.44, wm=2.49, depth=13, group_size=8
    "regnety_002": (((24, 1), (56, 1), (152, 4), (368, 7)), 8),
    # w0=48, wa=27.89, wm=2.09, depth=16, group_size=8
    "regnety_004": (((48, 1), (104, 3), (208, 6), (440, 6)), 8),
    # w0=200, wa=106.23, wm=2.48, depth=18, group_size=112
    "regnety_160": (((224, 2), (448, 4), (1232, 11), (3024, 1)), 112),
}


# timm ``_init_weights``: nn.Linear weights N(0, 0.01), biases zero.
linear_init = nn.initializers.normal(stddev=0.01)


class SqueezeExcite(nn.Module):
  """timm's ``SEModule`` as RegNet uses it: mean-pool -> fc1 1x1 conv -> ReLU -> fc2 -> sigmoid.

  The computation is that of ``layers.SqueezeExcite``; this local twin exists because RegNet
  initialises the two 1x1 convs with its fan-out normal (the shared one uses PyTorch's default
  init and takes no ``kernel_init``), and its submodules carry timm's names ``fc1``/``fc2``.
  """
  rd_channels: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = relu(Conv2d(self.rd_channels, 1, kernel_init=fan_out_normal_init(), name="fc1")(s))
    s = Conv2d(x.shape[-1], 1, kernel_init=fan_out_normal_init(), name="fc2")(s)
    return x * jax.nn.sigmoid(s)


class Bottleneck(nn.Module):
  """RegNetY block (timm ``Bottleneck``, bottleneck ratio 1): submodules ``conv1``, ``conv2``,
  ``se``, ``conv3`` (``ConvBN`` each, SE excepted) and, when the shape changes, ``downsample``."""
  features: int
  strides: int = 1
  group_size: int = 1
  se_channels: int = 0
  drop_path_rate: float = 0.0
  zero_init_last: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    width = self.features
    if width % self.group_size:
      raise ValueError(f"block width {width} is not a multiple of the group width "
                       f"{self.group_size}")
    groups = width // self.group_size
    y = relu(ConvBN(width, 1, kernel_init=fan_out_normal_init(), name="conv1")(x, train))
    y = relu(ConvBN(width, 3, self.strides, groups=groups, kernel_init=fan_out_normal_init(groups),
                    name="conv2")(y, train))
    if self.se_channels:
      y = SqueezeExcite(self.se_channels, name="se")(y)
    # timm zero-initialises the last BN's weight (``zero_init_last``): every block starts as its
    # shortcut.
    last_scale = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
    y = ConvBN(self.features, 1, kernel_init=fan_out_normal_init(), bn_scale_init=last_scale,
               name="conv3")(y, train)
    if x.shape[-1] != self.features or self.strides != 1:
      shortcut = ConvBN(self.features, 1, self.strides, kernel_init=fan_out_normal_init(),
                        name="downsample")(x, train)
    else:
      shortcut = x
    return relu(DropPath(self.drop_path_rate)(y, train) + shortcut)


class RegStage(nn.Module):
  """``depth`` blocks ``b1 .. b<depth>``; the first one strides and changes the width."""
  features: int
  depth: int
  group_size: int
  se_ratio: float
  drop_path_rates: Sequence[float]
  zero_init_last: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(self.depth):
      # SE width relative to the block input (timm: ``int(round(in_chs * se_ratio))``).
      se = int(round(x.shape[-1] * self.se_ratio))
      x = Bottleneck(self.features, 2 if i == 0 else 1, self.group_size, se,
                     self.drop_path_rates[i], self.zero_init_last, name=f"b{i + 1}")(x, train)
    return x


def drop_path_rates(depths: Sequence[int], rate: float) -> list[tuple[float, ...]]:
  """Per-stage tuples of per-block stochastic depth rates, as timm's regnet: linear from 0 (first
  block) to ``rate`` (last block) over all blocks of the network."""
  total = sum(depths)
  flat = [rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
  out, start = [], 0
  for d in depths:
    out.append(tuple(flat[start:start + d]))
    start += d
  return out


class RegNet(Classifier):
  """RegNetY classifier (NHWC input, ImageNet normalisation).

  Submodule names follow the timm keys: ``stem`` (``stem.conv``/``stem.bn``), ``s1 .. s4`` with
  blocks ``b1 ..``, and ``head`` (timm ``head.fc``).
  """
  stages: Sequence[tuple[int, int]]
  group_size: int
  se_ratio: float = 0.25
  stem_width: int = 32
  num_classes: int = 1000
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  zero_init_last: bool = True
  features_only: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | list[jax.Array]:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected NHWC images with 3 channels, got shape {x.shape}")
    if not self.features_only and self.num_classes < 1:
      raise ValueError("num_classes must be >= 1 (or use features_only=True), got "
                       f"{self.num_classes}")
    x = ConvBN(self.stem_width, 3, 2, kernel_init=fan_out_normal_init(), name="stem")(x, train)
    x = relu(x)

    rates = drop_path_rates([d for _, d in self.stages], self.drop_path_rate)
    features = []
    for i, (width, depth) in enumerate(self.stages):
      x = RegStage(width, depth, self.group_size, self.se_ratio, rates[i], self.zero_init_last,
                   name=f"s{i + 1}")(x, train)
      features.append(x)
    if self.features_only:
      return features
    return self._head(x, train)

  def _head(self, x: jax.Array, train: bool, pre_logits: bool = False) -> jax.Array:
    x = jnp.mean(x, axis=(1, 2))
    if pre_logits:
      return x
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=linear_init, bias_init=nn.initializers.zeros,
                    name="head")(x)


# --- variants ----------------------------------------------------------------------------------

def _regnety(name: str, **kw) -> RegNet:
  stages, group_size = STAGES[name]
  return RegNet(stages=stages, group_size=group_size, se_ratio=0.25, **kw)


@register_model(layouts=("timm",))
def regnety_002(num_classes: int = 1000, **kw: Any) -> RegNet:
  """RegNetY-200MF (timm ``regnety_002``; 3,162,996 params): small enough for tests and smoke
  runs."""
  return _regnety("regnety_002", num_classes=num_classes, **kw)


@register_model(layouts=("timm",))
def regnety_004(num_classes: int = 1000, **kw: Any) -> RegNet:
  """RegNetY-400MF (timm ``regnety_004``; 4,344,144 params)."""
  return _regnety("regnety_004", num_classes=num_classes, **kw)


@register_model(layouts=("timm",))
def regnety_160(num_classes: int = 1000, **kw: Any) -> RegNet:
  """RegNetY-16GF (timm ``regnety_160``; 83,590,140 params, 15.91 GMACs at 224): the teacher of the
  RepViT and MobileViG recipes, with DeiT's weights (timm ``regnety_160.deit_in1k``)."""
  return _regnety("regnety_160", num_classes=num_classes, **kw)
