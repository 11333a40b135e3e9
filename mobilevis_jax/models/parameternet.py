"""GhostNet (CVPR 2020) and ParameterNet (CVPR 2024), which is GhostNet with dynamic convolutions.

A Ghost module makes half of its output channels with an ordinary ("primary") 1x1 conv and the
other half cheaply, with a depthwise 3x3 conv applied to the first half. A Ghost bottleneck is
ghost1 (expand, with activation) -> [stride-2 depthwise conv] -> [squeeze-excite] -> ghost2
(project, no activation), plus a shortcut (identity, or depthwise + 1x1 conv when the shape
changes).

ParameterNet keeps that network and swaps convolutions for
:class:`~mobilevis_jax.layers.dynamic_conv.DynamicConv` (M expert kernels mixed per sample), so
that the network gains parameters but hardly any FLOPs. The official ``parameternet_600m``
changes four things relative to GhostNet 1.0x (besides ``width=1.9``), all reproduced here:
its layer table (3x3 kernels and extra blocks in stages 3-5, SE on every stage-5 block), the
activation (Hardswish everywhere, squeeze-excite included), which convolutions are dynamic
(88 of them: stem, both convs of every Ghost module, both shortcut convs, the final 1x1; the
stride-2 depthwise conv, SE, head and classifier stay static), and stochastic depth support.

Variants (params / MACs at 224 as :func:`mobilevis_jax.profiling.profile` counts them; the
dynamic ones include expert mixing M*P and the routing, the way fvcore counts the official code):

=====================  ============  =========  =============================================
name                   params        MACs       what it is
=====================  ============  =========  =============================================
ghostnet_050           2,587,292     42.3M      timm ``ghostnet_050``
ghostnet_100           5,182,508     141.2M     timm ``ghostnet_100`` (paper: 5.2M, 141M)
ghostnet_130           7,358,820     227.0M     timm ``ghostnet_130`` (paper: 7.3M, 226M)
ghostnet_600m          19,822,198    570.1M     the 600M table with static convs
parameternet_600m      34,504,504    598.3M     the official file (paper: 0.6G FLOPs)
ghostnet_300m          8,633,106     282.8M     derived, see :func:`parameternet_300m`
parameternet_300m      15,737,100    298.2M     derived, see :func:`parameternet_300m`
=====================  ============  =========  =============================================

``features_only=True`` returns the outputs of the last block at each stride (4, 8, 16, 32):
``blocks.2``, ``blocks.4``, ``blocks.6`` and ``blocks.8``, and builds neither the final 1x1
expansion (``blocks.9``) nor the head.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobilevis_jax.layers import (
  BatchNorm,
  Conv2d,
  ConvBN,
  DropPath,
  Linear,
  SqueezeExcite,
  hard_sigmoid,
  hard_swish,
  make_divisible,
  relu,
  torch_default_bias_init,
)
from mobilevis_jax.layers.dynamic_conv import DynamicConv
from mobilevis_jax.models.base import Classifier
from mobilevis_jax.models.registry import register_model

# Rows are (kernel, expansion width, output width, SE ratio, stride); each inner tuple is one of
# the official config groups, which become ``blocks.<i>`` in PyTorch.
Row = tuple[int, int, int, float, int]

GHOSTNET_V1_TABLE: tuple[tuple[Row, ...], ...] = (
    ((3, 16, 16, 0, 1),),
    ((3, 48, 24, 0, 2),),
    ((3, 72, 24, 0, 1),),
    ((5, 72, 40, 0.25, 2),),
    ((5, 120, 40, 0.25, 1),),
    ((3, 240, 80, 0, 2),),
    ((3, 200, 80, 0, 1), (3, 184, 80, 0, 1), (3, 184, 80, 0, 1), (3, 480, 112, 0.25, 1),
     (3, 672, 112, 0.25, 1)),
    ((5, 672, 160, 0.25, 2),),
    ((5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1), (5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1)),
)

# The official ParameterNet table: stage 3 gets a second 3x3 block, stage 4 a third 200-wide
# block and a second 672-wide block, stage 5 five 3x3 blocks all with SE.
PARAMETERNET_TABLE: tuple[tuple[Row, ...], ...] = (
    ((3, 16, 16, 0, 1),),
    ((3, 48, 24, 0, 2),),
    ((3, 72, 24, 0, 1),),
    ((5, 72, 40, 0.25, 2),),
    ((3, 120, 40, 0.25, 1),) * 2,
    ((3, 240, 80, 0, 2),),
    ((3, 200, 80, 0, 1),) * 3 + ((3, 480, 112, 0.25, 1),) + ((3, 672, 112, 0.25, 1),) * 2,
    ((5, 672, 160, 0.25, 2),),
    ((3, 960, 160, 0.25, 1),) * 5,
)

# ``blocks.<i>`` whose output is the last one at strides 4, 8, 16, 32 (same in both tables).
FEATURE_GROUPS = (2, 4, 6, 8)

ACTIVATIONS: dict[str, Callable] = {"relu": relu, "hard_swish": hard_swish}


def _dynamic_conv(dynamic: bool, dynamic_kwargs: Any = None) -> Callable[..., nn.Module] | None:
  """The ``conv`` of a ``layers.ConvBN`` (PyTorch's ``Sequential(conv, bn, act)``) at one of
  ParameterNet's dynamic positions: a DynamicConv with the model's ``dynamic_kwargs``; None (the
  static bias-free conv) in GhostNet."""
  return functools.partial(DynamicConv, **(dynamic_kwargs or {})) if dynamic else None


class GhostModule(nn.Module):
  """``features`` outputs: ``ceil(features/2)`` from a 1x1 conv, the rest from a depthwise 3x3
  conv of those (ratio 2, as in every released GhostNet/ParameterNet model)."""
  features: int
  act: Callable | None
  dynamic: bool = False
  dynamic_kwargs: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    init = math.ceil(self.features / 2)
    kw = dict(act=self.act, conv=_dynamic_conv(self.dynamic, self.dynamic_kwargs))
    primary = ConvBN(init, 1, **kw, name="primary_conv")(x, train)
    cheap = ConvBN(init, 3, groups=init, **kw, name="cheap_operation")(primary, train)
    return jnp.concatenate([primary, cheap], axis=-1)[..., :self.features]


class GhostBottleneck(nn.Module):
  """ghost1 -> [stride-s depthwise conv + BN] -> [SE] -> ghost2, plus the shortcut."""
  mid_features: int
  out_features: int
  kernel_size: int = 3
  strides: int = 1
  se_ratio: float = 0.0
  act: Callable = relu
  dynamic: bool = False
  dynamic_kwargs: Any = None
  drop_path_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    cin = x.shape[-1]
    dyn = dict(dynamic=self.dynamic, dynamic_kwargs=self.dynamic_kwargs)
    y = GhostModule(self.mid_features, self.act, **dyn, name="ghost1")(x, train)
    if self.strides > 1:
      # Static even in ParameterNet: the official code keeps conv_dw a plain nn.Conv2d.
      y = Conv2d(self.mid_features, self.kernel_size, self.strides, groups=self.mid_features,
                 use_bias=False, name="conv_dw")(y)
      y = BatchNorm(name="bn_dw")(y, train)
    if self.se_ratio > 0:
      y = SqueezeExcite(make_divisible(self.mid_features * self.se_ratio, 4), act=self.act,
                        gate=hard_sigmoid, name="se")(y)
    y = GhostModule(self.out_features, None, **dyn, name="ghost2")(y, train)
    if cin == self.out_features and self.strides == 1:
      shortcut = x
    else:
      conv = _dynamic_conv(self.dynamic, self.dynamic_kwargs)
      shortcut = ConvBN(cin, self.kernel_size, self.strides, groups=cin, conv=conv,
                        name="shortcut_dw")(x, train)
      shortcut = ConvBN(self.out_features, 1, conv=conv, name="shortcut_pw")(shortcut, train)
    return shortcut + DropPath(self.drop_path_rate)(y, train)


class GhostNet(Classifier):
  """GhostNet / ParameterNet classifier (NHWC input, ImageNet normalisation).

  Submodule names follow the PyTorch keys: ``conv_stem``, ``bn1``, ``blocks_<i>_<j>`` (torch
  ``blocks.i.j``), ``blocks_9_0`` (the final 1x1 ConvBnAct), ``conv_head``, ``classifier``.
  """
  table: Sequence[Sequence[Row]] = GHOSTNET_V1_TABLE
  width: float = 1.0
  act: str = "relu"
  dynamic: bool = False
  num_experts: int = 4
  routing: str = "sigmoid"
  strategy: str = "auto"  # DynamicConv path: layers/kernels.py KERNEL_TABLE
  num_classes: int = 1000
  drop_rate: float = 0.2
  drop_path_rate: float = 0.0
  features_only: bool = False

  @property
  def dynamic_kwargs(self) -> dict:
    return dict(num_experts=self.num_experts, routing=self.routing, strategy=self.strategy)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | list[jax.Array]:
    if self.act not in ACTIVATIONS:
      raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}")
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected NHWC images with 3 channels, got shape {x.shape}")
    act = ACTIVATIONS[self.act]
    dyn = dict(dynamic=self.dynamic, dynamic_kwargs=self.dynamic_kwargs)

    stem = make_divisible(16 * self.width, 4)
    if self.dynamic:
      x = DynamicConv(stem, 3, 2, **self.dynamic_kwargs, name="conv_stem")(x)
    else:
      x = Conv2d(stem, 3, 2, use_bias=False, name="conv_stem")(x)
    x = act(BatchNorm(name="bn1")(x, train))

    # Stochastic depth as the official ParameterNet code: one rate per config group, linear in
    # the group index (0 for the first group).
    n = len(self.table)
    rates = [self.drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
    features = []
    for i, group in enumerate(self.table):
      for j, (k, exp, c, se, s) in enumerate(group):
        x = GhostBottleneck(make_divisible(exp * self.width, 4), make_divisible(c * self.width, 4),
                            k, s, se, act, **dyn, drop_path_rate=rates[i],
                            name=f"blocks_{i}_{j}")(x, train)
      features.append(x)
    if self.features_only:
      return [features[i] for i in FEATURE_GROUPS]

    return self._head(x, train)

  def _head(self, x: jax.Array, train: bool, pre_logits: bool = False) -> jax.Array:
    act = ACTIVATIONS[self.act]
    last = make_divisible(self.table[-1][-1][1] * self.width, 4)
    x = ConvBN(last, 1, act=act, conv=_dynamic_conv(self.dynamic, self.dynamic_kwargs),
               name=f"blocks_{len(self.table)}_0")(x, train)
    x = jnp.mean(x, axis=(1, 2), keepdims=True)
    # conv_head and the classifier keep PyTorch's default init, biases included (no init pass).
    x = act(Conv2d(1280, 1, use_bias=True, bias_init=torch_default_bias_init, name="conv_head")(x))
    x = x.reshape(x.shape[0], -1)
    if pre_logits:
      return x
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    return Linear(self.num_classes, name="classifier")(x)


# --- variants ----------------------------------------------------------------------------------

def _ghostnet_v1(width: float, **kw) -> GhostNet:
  return GhostNet(table=GHOSTNET_V1_TABLE, width=width, act="relu", dynamic=False, **kw)


@register_model(layouts=("timm",))
def ghostnet_050(num_classes: int = 1000, **kw: Any) -> GhostNet:
  """GhostNet 0.5x (timm ``ghostnet_050``)."""
  return _ghostnet_v1(0.5, num_classes=num_classes, **kw)


@register_model(layouts=("timm",))
def ghostnet_100(num_classes: int = 1000, **kw: Any) -> GhostNet:
  """GhostNet 1.0x (timm ``ghostnet_100``; paper 5.2M params, 141M FLOPs, 73.9% top-1)."""
  return _ghostnet_v1(1.0, num_classes=num_classes, **kw)


@register_model(layouts=("timm",))
def ghostnet_130(num_classes: int = 1000, **kw: Any) -> GhostNet:
  """GhostNet 1.3x (timm ``ghostnet_130``; paper 7.3M params, 226M FLOPs, 75.7% top-1)."""
  return _ghostnet_v1(1.3, num_classes=num_classes, **kw)


def _parameternet_table(width: float, dynamic: bool, num_experts: int = 4, **kw) -> GhostNet:
  return GhostNet(table=PARAMETERNET_TABLE, width=width, act="hard_swish", dynamic=dynamic,
                  num_experts=num_experts, **kw)


@register_model(layouts=("official",))
def parameternet_600m(num_classes: int = 1000, num_experts: int = 4, **kw: Any) -> GhostNet:
  """ParameterNet-600M exactly as the official ``parameternet_600m``: the ParameterNet table at
  width 1.9, Hardswish, 88 dynamic convs with 4 experts (34,504,504 params, ~598M MACs;
  paper: 0.6G FLOPs, 81.6% top-1 with ImageNet-22K pretraining)."""
  return _parameternet_table(1.9, True, num_experts, num_classes=num_classes, **kw)


@register_model(layouts=("timm",))
def ghostnet_600m(num_classes: int = 1000, **kw: Any) -> GhostNet:
  """GhostNet-600M: ``parameternet_600m`` with static convs (19,822,198 params, ~570M MACs;
  paper: 78.6% top-1 on ImageNet-1K, 78.3% with 22K pretraining)."""
  return _parameternet_table(1.9, False, num_classes=num_classes, **kw)


# The derived 300M models (see parameternet_300m): GhostNet's own layer table at this width.
WIDTH_300M = 1.45


def _ghostnet_300m_table(dynamic: bool, num_experts: int = 4, **kw) -> GhostNet:
  return GhostNet(table=GHOSTNET_V1_TABLE, width=WIDTH_300M, act="hard_swish", dynamic=dynamic,
                  num_experts=num_experts, **kw)


@register_model(layouts=("official",))
def parameternet_300m(num_classes: int = 1000, num_experts: int = 4, **kw: Any) -> GhostNet:
  """ParameterNet-300M, derived: the official code releases only the 600M configuration.

  What the paper gives: ParameterNet-300M is its GhostNet-300M (~290M FLOPs in its figure) with
  dynamic convs, at ~300M FLOPs, and its expert ablation (M = 1 -> 8) goes from 8.6M to 25.2M
  parameters for about +19M FLOPs. What is kept from the released 600M model: Hardswish, 4
  experts, and the same dynamic positions (stem, Ghost modules, shortcuts, final 1x1).

  The 600M layer table cannot meet those numbers at any width: where its MACs are ~300M (width
  ~1.3) it already has 10.5M params at M=1 and only +16.2M from M=1 to M=8 (ratio 1.54, paper
  1.93), because its extra SE blocks hold many static parameters. GhostNet's original table does
  fit: sweeping its width, 1.45 gives (``profile``, fvcore convention)

  ========  ===========  ========
  M         params       MACs
  ========  ===========  ========
  static    8,633,106    282.8M   (GhostNet-300M; paper ~290M)
  1         8,652,063    291.1M   (paper ablation: 8.6M)
  4         15,737,100   298.2M   (ParameterNet-300M; paper ~300M)
  8         25,183,816   307.6M   (paper ablation: 25.2M, +19M FLOPs; here +16.5M)
  ========  ===========  ========

  so this is GhostNet's table at width 1.45 with Hardswish and ParameterNet's dynamic convs.
  """
  return _ghostnet_300m_table(True, num_experts, num_classes=num_classes, **kw)


@register_model(layouts=("timm",))
def ghostnet_300m(num_classes: int = 1000, **kw: Any) -> GhostNet:
  """GhostNet-300M: the static-conv twin of :func:`parameternet_300m` (8,633,106 params, ~283M
  MACs; paper: ~290M FLOPs, 76.3% top-1 on ImageNet-1K, 75.7% with 22K pretraining)."""
  return _ghostnet_300m_table(False, num_classes=num_classes, **kw)
