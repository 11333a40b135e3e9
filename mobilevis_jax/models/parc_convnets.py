"""ParC-ConvNets: ConvNeXt, ResNet50 and MobileNetV2 with ParC in their deep stages.

The ParC-Net paper (ECCV'22) also plugs its position-aware circular convolution into three
classic ConvNets (official code: hkzhang91/ParC-Net, ``ParC_ConvNets/``). In each, the spatial
convolution of the last blocks of the stride-16 and stride-32 stages is replaced by a *ParC pair*:
the channels are split in two halves, the first half goes through a global ParC-H and the second
through a global ParC-W (one ParC each, no channel attention), then the halves are concatenated.

================  =====================================  ==============================  ========
model             replaced op                            where (224 px feature size K)   ParC
================  =====================================  ==============================  ========
parc_convnext_xt  7x7 depthwise conv of a ConvNeXt block stage 3 blocks 6-8 (K=14),       depthwise
                                                         stage 4 block 2 (K=7)
parc_resnet50     3x3 conv of a bottleneck               layer3 blocks 3-5 (K=14),       dense
                                                         layer4 block 2 (K=7)
parc_mobilenetv2  3x3 depthwise conv of an inverted      features 9, 10, 13 (K=14),      depthwise
                  residual (the ParC block has no dw)    features 16 (K=7)
================  =====================================  ==============================  ========

Every ParC carries a conv bias and a position embedding (trunc-normal 0.02) added before the
convolution; in ParC-MobileNetV2 only the first ParC block of a stage has the embedding
(features 10 has none). ParC-ResNet50's ParC mixes all channels of its half (``groups=1`` in the
official file: a (128, 128, 14, 1) kernel), the others are depthwise.

Resolution: the official operators are fixed to the 224 px feature sizes (the embedding is
expanded to K x K). Here, by default (``resample=True``), the stored kernels and embeddings are
stretched to the runtime feature length with align_corners=True linear interpolation, as ParC-Net
itself does, so any input size (also non-square) works; at 224 px this is the identity and the
models compute exactly what the official ones do. ``resample=False`` restores the official
fixed-size behaviour (other sizes raise).

Parameter counts equal the official modules': 7,412,824 / 23,737,640 / 3,532,136.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mobilevis_jax.layers import (
  BatchNorm,
  Conv2d,
  ConvBN,
  DropPath,
  LayerScale,
  Linear,
  gelu,
  kaiming_normal_init,
  relu,
  relu6,
  trunc_normal_init,
)
from mobilevis_jax.layers.parc import ParCConv
from mobilevis_jax.models.base import Classifier
from mobilevis_jax.models.registry import register_model

# torch's kaiming_normal_(mode='fan_out') with a ReLU gain, as the official ResNet/MobileNetV2
# initialise their convolutions, ParC kernels included. ParC kernels are HWIO like any conv here,
# so fan_out = K * Cout as in torch.
_kaiming_fan_out = kaiming_normal_init("fan_out")


class ParCPair(nn.Module):
  """Split the channels in halves: ParC-H on the first, ParC-W on the second, concatenate.

  Submodules are named ``{prefix}_H`` and ``{prefix}_W`` after the official attributes
  (``gcc_H``/``gcc_W``, or ``parc_H``/``parc_W`` in ParC-ResNet50).
  """
  kernel_size: int
  use_pe: bool = True
  dense: bool = False
  prefix: str = "gcc"
  resample: bool = True
  method: str = "auto"
  kernel_init: Callable | None = None
  bias_init: Callable | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] % 2:
      raise ValueError(f"a ParC pair splits the channels in two; got {x.shape[-1]} channels")
    x_h, x_w = jnp.split(x, 2, axis=-1)
    common = dict(meta_kernel_size=self.kernel_size, dense=self.dense, use_bias=True,
                  use_pe=self.use_pe, resample=self.resample, method=self.method,
                  kernel_init=self.kernel_init or _kaiming_fan_out,
                  pe_init=trunc_normal_init(0.02), bias_init=self.bias_init)
    y_h = ParCConv(axis="H", name=f"{self.prefix}_H", **common)(x_h)
    y_w = ParCConv(axis="W", name=f"{self.prefix}_W", **common)(x_w)
    return jnp.concatenate([y_h, y_w], axis=-1)


def _check_input(x: jax.Array, min_size: int, name: str) -> None:
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"{name} expects NHWC RGB images of shape (B, H, W, 3), got {x.shape}")
  if min(x.shape[1:3]) < min_size:
    raise ValueError(f"{name} needs an input of at least {min_size}x{min_size}, got "
                     f"{x.shape[1]}x{x.shape[2]}")


# ==============================================================================================
# ParC-ConvNeXt
# ==============================================================================================
def _layer_norm(name: str) -> nn.LayerNorm:
  # Two-pass variance, like torch's layer_norm (Flax's fast E[x^2]-E[x]^2 loses ~1e-6).
  return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, name=name)


class ConvNeXtBlock(nn.Module):
  """ConvNeXt block; with ``parc_kernel`` set its 7x7 depthwise conv becomes a ParC pair."""
  dim: int
  parc_kernel: int | None = None
  drop_path: float = 0.0
  layer_scale_init: float = 1e-6
  resample: bool = True
  parc_method: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dense_init = dict(kernel_init=trunc_normal_init(0.02), bias_init=nn.initializers.zeros)
    shortcut = x
    if self.parc_kernel is None:
      x = Conv2d(self.dim, 7, groups=self.dim, name="dwconv", **dense_init)(x)
    else:
      x = ParCPair(self.parc_kernel, use_pe=True, prefix="gcc", resample=self.resample,
                   method=self.parc_method, kernel_init=trunc_normal_init(0.02),
                   bias_init=nn.initializers.zeros, name="parc")(x)
    x = _layer_norm("norm")(x)
    x = nn.Dense(4 * self.dim, name="pwconv1", **dense_init)(x)
    x = gelu(x)
    x = nn.Dense(self.dim, name="pwconv2", **dense_init)(x)
    x = LayerScale(self.layer_scale_init, name="gamma")(x)
    return shortcut + DropPath(self.drop_path, name="drop_path")(x, train)


class ParCConvNeXt(Classifier):
  """ConvNeXt whose blocks ``j >= parc_start[i]`` of stage ``i`` use a ParC pair of length K_i."""
  depths: Sequence[int] = (3, 3, 9, 3)
  dims: Sequence[int] = (48, 96, 192, 384)
  parc_start: Sequence[int] = (3, 3, 6, 2)
  kernel_sizes: Sequence[int] = (56, 28, 14, 7)
  num_classes: int = 1000
  drop_path_rate: float = 0.0
  layer_scale_init: float = 1e-6
  head_init_scale: float = 1.0
  features_only: bool = False
  resample: bool = True
  parc_method: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | list[jax.Array]:
    _check_input(x, 32, type(self).__name__)
    dense_init = dict(kernel_init=trunc_normal_init(0.02), bias_init=nn.initializers.zeros)
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    features, cur = [], 0
    for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      if i == 0:  # stem: 4x4 patchify conv, then LN
        x = Conv2d(dim, 4, strides=4, padding=0, name="stem_conv", **dense_init)(x)
        x = _layer_norm("stem_norm")(x)
      else:  # LN, then 2x2 stride-2 conv
        x = _layer_norm(f"downsample{i}_norm")(x)
        x = Conv2d(dim, 2, strides=2, padding=0, name=f"downsample{i}_conv", **dense_init)(x)
      for j in range(depth):
        x = ConvNeXtBlock(dim, self.kernel_sizes[i] if j >= self.parc_start[i] else None,
                          rates[cur + j], self.layer_scale_init, self.resample, self.parc_method,
                          name=f"stages_{i}_{j}")(x, train)
      cur += depth
      features.append(x)
    if self.features_only:
      return features
    return self._head(x, train)

  def _head(self, x: jax.Array, train: bool, pre_logits: bool = False) -> jax.Array:
    x = _layer_norm("norm")(jnp.mean(x, axis=(1, 2)))
    if pre_logits:
      return x
    scaled = trunc_normal_init(0.02 * self.head_init_scale)
    return nn.Dense(self.num_classes, kernel_init=scaled, name="head")(x)


# ==============================================================================================
# ParC-ResNet50
# ==============================================================================================
class Bottleneck(nn.Module):
  """torchvision ResNet v1.5 bottleneck (stride on the 3x3); ``parc_kernel`` swaps the 3x3 for a
  dense ParC pair (official ``ParC_block``, which is never strided or downsampling)."""
  planes: int
  strides: int = 1
  downsample: bool = False
  parc_kernel: int | None = None
  resample: bool = True
  parc_method: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = lambda f, k, s, name: Conv2d(f, k, s, use_bias=False, kernel_init=_kaiming_fan_out,
                                        name=name)
    out = relu(BatchNorm(name="bn1")(conv(self.planes, 1, 1, "conv1")(x), train))
    if self.parc_kernel is None:
      out = conv(self.planes, 3, self.strides, "conv2")(out)
    else:
      if self.strides != 1 or self.downsample:
        raise ValueError("a ParC bottleneck keeps the resolution and the width")
      out = ParCPair(self.parc_kernel, use_pe=True, dense=True, prefix="parc",
                     resample=self.resample, method=self.parc_method, name="parc")(out)
    out = relu(BatchNorm(name="bn2")(out, train))
    out = BatchNorm(name="bn3")(conv(4 * self.planes, 1, 1, "conv3")(out), train)
    if self.downsample:
      x = BatchNorm(name="downsample_bn")(conv(4 * self.planes, 1, self.strides,
                                                "downsample_conv")(x), train)
    return relu(out + x)


class ParCResNet(Classifier):
  """ResNet50 whose bottlenecks ``j >= parc_start[i]`` of layer ``i + 1`` use a dense ParC pair."""
  layers: Sequence[int] = (3, 4, 6, 3)
  parc_start: Sequence[int] = (3, 4, 3, 2)
  kernel_sizes: Sequence[int] = (56, 28, 14, 7)
  num_classes: int = 1000
  features_only: bool = False
  resample: bool = True
  parc_method: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | list[jax.Array]:
    _check_input(x, 32, type(self).__name__)
    x = Conv2d(64, 7, 2, padding=3, use_bias=False, kernel_init=_kaiming_fan_out, name="conv1")(x)
    x = relu(BatchNorm(name="bn1")(x, train))
    # torch pads max-pooling with -inf. The padding is explicit, not max_pool's own: jax2onnx's
    # ONNX export replaces nn.max_pool with a MaxPool of auto_pad VALID whatever the padding
    # asked for (7x7 instead of 8x8 maps at 32 px, logits 59% off), and takes only the input
    # positionally, hence the keywords.
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")
    features = []
    for i, depth in enumerate(self.layers):
      planes = 64 * 2 ** i
      for j in range(depth):
        parc = self.kernel_sizes[i] if j >= self.parc_start[i] and j > 0 else None
        x = Bottleneck(planes, strides=(2 if i > 0 and j == 0 else 1), downsample=(j == 0),
                       parc_kernel=parc, resample=self.resample, parc_method=self.parc_method,
                       name=f"layer{i + 1}_{j}")(x, train)
      features.append(x)
    if self.features_only:
      return features
    return self._head(x, train)

  def _head(self, x: jax.Array, train: bool, pre_logits: bool = False) -> jax.Array:
    x = jnp.mean(x, axis=(1, 2))
    # torchvision's init pass skips nn.Linear: fc keeps PyTorch's default, bias included.
    return x if pre_logits else Linear(self.num_classes, name="fc")(x)


# ==============================================================================================
# ParC-MobileNetV2
# ==============================================================================================
@dataclasses.dataclass(frozen=True)
class MobileNetV2Stage:
  expansion: int
  channels: int
  blocks: int
  stride: int
  plain_blocks: int  # blocks before the first ParC block (== blocks: no ParC in this stage)
  parc_kernel: int   # feature size at 224 px


MOBILENETV2_STAGES = (
    MobileNetV2Stage(1, 16, 1, 1, 1, 112),
    MobileNetV2Stage(6, 24, 2, 2, 2, 56),
    MobileNetV2Stage(6, 32, 3, 2, 3, 28),
    MobileNetV2Stage(6, 64, 4, 2, 2, 14),
    MobileNetV2Stage(6, 96, 3, 1, 2, 14),
    MobileNetV2Stage(6, 160, 3, 2, 2, 7),
    MobileNetV2Stage(6, 320, 1, 1, 1, 7),
)
# Index (into ``features``) of the last block at strides 4, 8, 16 and 32.
MOBILENETV2_FEATURE_INDICES = (3, 6, 13, 17)


class InvertedResidual(nn.Module):
  """MobileNetV2 block: [1x1 expand] -> 3x3 depthwise -> 1x1 linear projection, ReLU6."""
  features: int
  strides: int
  expansion: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    cin = x.shape[-1]
    hidden = int(round(cin * self.expansion))
    cbn = lambda f, k, s, g, name: ConvBN(f, k, s, groups=g, kernel_init=_kaiming_fan_out,
                                          name=name)
    out = x
    if self.expansion != 1:
      out = relu6(cbn(hidden, 1, 1, 1, "expand")(out, train))
    out = relu6(cbn(hidden, 3, self.strides, hidden, "dw")(out, train))
    out = cbn(self.features, 1, 1, 1, "project")(out, train)
    return x + out if self.strides == 1 and cin == self.features else out


class ParCInvertedResidual(nn.Module):
  """Official ``InvertedResidual_parc``: 1x1 expand -> ParC pair -> BN -> ReLU6 -> 1x1 project.

  It replaces the depthwise conv outright (no stride; used only for non-first blocks).
  """
  features: int
  expansion: int
  parc_kernel: int
  use_pe: bool
  resample: bool = True
  parc_method: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    cin = x.shape[-1]
    hidden = int(round(cin * self.expansion))
    out = relu6(ConvBN(hidden, 1, kernel_init=_kaiming_fan_out, name="pw_expand")(x, train))
    out = ParCPair(self.parc_kernel, use_pe=self.use_pe, prefix="gcc", resample=self.resample,
                   method=self.parc_method, bias_init=nn.initializers.zeros, name="parc")(out)
    out = relu6(BatchNorm(name="bn")(out, train))
    out = ConvBN(self.features, 1, kernel_init=_kaiming_fan_out, name="pw_linear")(out, train)
    return x + out if cin == self.features else out


class ParCMobileNetV2(Classifier):
  """MobileNetV2 (width 1.0) with ParC inverted residuals where ``MOBILENETV2_STAGES`` says."""
  stages: Sequence[MobileNetV2Stage] = MOBILENETV2_STAGES
  num_classes: int = 1000
  last_channels: int = 1280
  dropout: float = 0.2
  features_only: bool = False
  resample: bool = True
  parc_method: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | list[jax.Array]:
    _check_input(x, 32, type(self).__name__)
    x = relu6(ConvBN(32, 3, 2, kernel_init=_kaiming_fan_out, name="features_0")(x, train))
    idx, features = 1, []
    for st in self.stages:
      for i in range(st.blocks):
        if i < st.plain_blocks:
          block = InvertedResidual(st.channels, st.stride if i == 0 else 1, st.expansion,
                                   name=f"features_{idx}")
        else:
          block = ParCInvertedResidual(st.channels, st.expansion, st.parc_kernel,
                                       use_pe=(i == st.plain_blocks), resample=self.resample,
                                       parc_method=self.parc_method, name=f"features_{idx}")
        x = block(x, train)
        if idx in MOBILENETV2_FEATURE_INDICES:
          features.append(x)
        idx += 1
    if self.features_only:
      return features
    return self._head(x, train)

  def _head(self, x: jax.Array, train: bool, pre_logits: bool = False) -> jax.Array:
    idx = 1 + sum(st.blocks for st in self.stages)
    x = relu6(ConvBN(self.last_channels, 1, kernel_init=_kaiming_fan_out,
                     name=f"features_{idx}")(x, train))
    x = jnp.mean(x, axis=(1, 2))
    if pre_logits:
      return x
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                    name="classifier")(x)


# ==============================================================================================
# Registered variants
# ==============================================================================================
@register_model(default_resolution=224)
def parc_convnext_xt(num_classes: int = 1000, **kw: Any) -> ParCConvNeXt:
  """ParC-ConvNeXt-XT: dims 48/96/192/384, depths 3/3/9/3 (7.41M params, 1.14 GMACs)."""
  return ParCConvNeXt(num_classes=num_classes, **kw)


@register_model(default_resolution=224)
def parc_resnet50(num_classes: int = 1000, **kw: Any) -> ParCResNet:
  """ParC-ResNet50 with dense ParC (23.74M params, 3.94 GMACs)."""
  return ParCResNet(num_classes=num_classes, **kw)


@register_model(default_resolution=224)
def parc_mobilenetv2(num_classes: int = 1000, **kw: Any) -> ParCMobileNetV2:
  """ParC-MobileNetV2 (official ``parc_mv2``; 3.53M params, 0.30 GMACs)."""
  return ParCMobileNetV2(num_classes=num_classes, **kw)
