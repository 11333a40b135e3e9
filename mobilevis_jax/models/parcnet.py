"""ParC-Net (Zhang et al., ECCV 2022; the "EdgeFormer" models of hkzhang91/ParC-Net).

ParC-Net keeps the MobileViT skeleton (MobileNetV2 stem and early stages) and replaces every
MobileViT block of stages 3-5 by an *outer frame* whose global part is a stack of ParC
meta-former blocks: attention is replaced by position-aware circular convolutions (ParC, see
:mod:`mobilevis_jax.layers.parc`) with kernels as large as the feature map.

ParC block (``gcc_ca_mf_block``, width 2d):
  * split the channels in halves x1, x2; in the first block of a stage add the pre-norm position
    embeddings (x1 gets an H-embedding, x2 a W-embedding);
  * x1 -> BN -> ParC-H -> ParC-W, x2 -> BN -> ParC-W -> ParC-H (the second ParC of each branch
    carries the stage's second position embedding, again only in the first block);
  * add the block input back, concatenate: z;
  * channel mixer: z + CA(f) with f = FFN(z) (BN, 1x1, Hardswish, 1x1, dropout) and CA a
    squeeze-excite gate (BN'ed, Hardswish/Hardsigmoid) that scales the FFN output only.

Outer frame (``outer_frame_v1``), after a stride-2 MobileNetV2 block:
  dim_adaptive (grouped 3x3 conv C->Cs + BN + SiLU, plain 1x1 conv) -> N ParC blocks -> BN ->
  channel_adaptive (grouped 1x1 conv Cs->C + BN + SiLU) -> local_global_fusion
  (3x3 conv + BN + SiLU on concat(global, input) for S/H, on global + input for XS).

Resolution: the meta kernels and PEs are stored at the 256-px feature sizes (32/16/8) and are
resampled to the runtime size, so any input size (and non-square inputs) work.

Input convention ``'parc_bgr'``: the official recipe feeds OpenCV images, i.e. **BGR channel
order scaled to [0, 1] with no mean/std normalisation** (validation: resize 288, centre crop 256).
The model itself just consumes what it is given; :func:`preprocess` implements the convention
and ``model_info(name).input_convention`` tells the data pipeline which one to apply.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobilevis_jax.layers import (
  BatchNorm,
  Conv2d,
  ConvBN,
  hard_sigmoid,
  hard_swish,
  kaiming_normal_init,
  make_divisible,
  silu,
  trunc_normal_init,
)
from mobilevis_jax.layers.parc import ParCConv, parc_hw_fused, resample_1d
from mobilevis_jax.models.base import Classifier
from mobilevis_jax.models.registry import register_model, register_profile_hook

# cvnets initialises every conv with kaiming_normal(mode='fan_out') (untruncated) and zero bias.
conv_init = kaiming_normal_init("fan_out")
PARC_METHODS = ("auto", "direct", "conv", "fft", "fft2")


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One ParC stage: ``channels`` C, ParC width ``parc_channels`` Cs, FFN width, depth, meta K."""
  channels: int
  parc_channels: int
  ffn_channels: int
  num_blocks: int
  meta_kernel_size: int


@dataclasses.dataclass(frozen=True)
class ParCNetConfig:
  stem_kernel: int
  widths: tuple[int, int, int]  # stem, layer_1, layer_2
  stages: tuple[StageConfig, StageConfig, StageConfig]
  fusion: str  # 'concat' or 'add'


# Official configurations (cvnets/models/classification/config/edgeformer.py, scale_xs/s/h).
CONFIGS = {
    "parcnet_xs": ParCNetConfig(3, (16, 32, 64), (StageConfig(96, 96, 192, 2, 32),
                                                   StageConfig(128, 128, 256, 3, 16),
                                                   StageConfig(160, 160, 320, 2, 8)), "add"),
    "parcnet_s": ParCNetConfig(3, (16, 32, 64), (StageConfig(96, 192, 384, 2, 32),
                                                  StageConfig(128, 256, 512, 4, 16),
                                                  StageConfig(160, 320, 640, 3, 8)), "concat"),
    "parcnet_h": ParCNetConfig(5, (48, 96, 144), (StageConfig(216, 324, 648, 3, 32),
                                                   StageConfig(288, 432, 864, 9, 16),
                                                   StageConfig(432, 432, 864, 3, 8)), "concat"),
}


def preprocess(images_rgb_uint8: jax.Array) -> jax.Array:
  """The official ParC-Net input convention: RGB uint8 NHWC -> BGR float in [0, 1], no mean/std."""
  return images_rgb_uint8[..., ::-1].astype(jnp.float32) / 255.0


class ConvBNAct(nn.Module):
  """cvnets ``ConvLayer``: bias-free conv + BN (+ SiLU), a ``layers.ConvBN`` held one level down
  as ``<name>/conv_bn`` (the path the interop layout maps)."""
  features: int
  kernel_size: int = 1
  strides: int = 1
  groups: int = 1
  act: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return ConvBN(self.features, self.kernel_size, self.strides, groups=self.groups,
                  act=silu if self.act else None, kernel_init=conv_init, name="conv_bn")(x, train)


class InvertedResidual(nn.Module):
  """MobileNetV2 block: 1x1 expand + SiLU, 3x3 depthwise + SiLU, 1x1 project (+ residual)."""
  features: int
  strides: int = 1
  expand_ratio: float = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    hidden = make_divisible(int(round(x.shape[-1] * self.expand_ratio)))
    y = ConvBNAct(hidden, 1, name="exp_1x1")(x, train)
    y = ConvBNAct(hidden, 3, self.strides, groups=hidden, name="conv_3x3")(y, train)
    y = ConvBNAct(self.features, 1, act=False, name="red_1x1")(y, train)
    return x + y if self.strides == 1 and x.shape[-1] == self.features else y


class ChannelAttention(nn.Module):
  """CA gate: mean -> 1x1 (C/16, no bias) -> BN -> Hardswish -> 1x1 (C) -> BN -> Hardsigmoid."""
  reduction: int = 16

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = ConvBN(c // self.reduction, 1, kernel_init=conv_init, name="reduce")(s, train)
    s = ConvBN(c, 1, kernel_init=conv_init, name="expand")(hard_swish(s), train)
    return x * hard_sigmoid(s)


class ParCBlock(nn.Module):
  """The ParC meta-former block (official ``gcc_ca_mf_block``) on a map with 2*d channels.

  ``parc_method``: 'direct', 'conv', 'fft', 'auto' (per ParC, see ``layers.parc``) or 'fft2'
  (each branch's ParC pair fused into one rfft2).
  """
  meta_kernel_size: int
  ffn_channels: int
  use_pe: bool
  dropout: float = 0.1
  parc_method: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.parc_method not in PARC_METHODS:
      raise ValueError(f"parc_method must be one of {PARC_METHODS}, got {self.parc_method!r}")
    if x.shape[-1] % 2:
      raise ValueError(f"a ParC block needs an even channel count, got {x.shape[-1]}")
    k = self.meta_kernel_size
    d = x.shape[-1] // 2
    x1_in, x2_in = x[..., :d], x[..., d:]
    x1, x2 = x1_in, x2_in
    if self.use_pe:
      # Pre-norm position embeddings (official meta_pe_1_H / meta_pe_1_W).
      pe_init = nn.initializers.normal(1.0)
      pe_h = self.param("pe_1_h", pe_init, (1, k, 1, d), jnp.float32)
      pe_w = self.param("pe_1_w", pe_init, (1, 1, k, d), jnp.float32)
      x1 = x1 + resample_1d(pe_h, x.shape[1], axis=1)
      x2 = x2 + resample_1d(pe_w, x.shape[2], axis=2)
    x1 = BatchNorm(name="pre_norm_1")(x1, train)
    x2 = BatchNorm(name="pre_norm_2")(x2, train)

    method = "fft" if self.parc_method == "fft2" else self.parc_method
    parc = lambda axis, pe, name: ParCConv(axis, k, use_pe=pe, method=method, name=name)
    h1, w1 = parc("H", False, "parc_1_h"), parc("W", False, "parc_1_w")
    # The second ParC of each branch carries the official meta_pe_2_W / meta_pe_2_H.
    w2, h2 = parc("W", self.use_pe, "parc_2_w"), parc("H", self.use_pe, "parc_2_h")
    if self.parc_method == "fft2":
      y1, y2 = parc_hw_fused(x1, h1, w2), parc_hw_fused(x2, w1, h2)
    else:
      y1, y2 = w2(h1(x1)), h2(w1(x2))

    z = jnp.concatenate([x1_in + y1, x2_in + y2], axis=-1)
    f = BatchNorm(name="ffn_norm")(z, train)
    f = Conv2d(self.ffn_channels, 1, kernel_init=conv_init, name="ffn_fc1")(f)
    f = hard_swish(f)  # (the official Dropout(0.0) here is a no-op)
    f = Conv2d(2 * d, 1, kernel_init=conv_init, name="ffn_fc2")(f)
    f = nn.Dropout(self.dropout)(f, deterministic=not train)
    return z + ChannelAttention(name="ca")(f, train)


class OuterFrame(nn.Module):
  """``outer_frame_v1``: local->global adapter, N ParC blocks + BN, fusion with the input."""
  stage: StageConfig
  fusion: str
  dropout: float = 0.1
  parc_method: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c, cs = self.stage.channels, self.stage.parc_channels
    if x.shape[-1] != c:
      raise ValueError(f"outer frame expects {c} channels, got {x.shape[-1]}")
    groups = math.gcd(cs, c)
    y = ConvBNAct(cs, 3, groups=groups, name="dim_adaptive_0")(x, train)
    y = Conv2d(cs, 1, use_bias=False, kernel_init=conv_init, name="dim_adaptive_1")(y)
    for i in range(self.stage.num_blocks):
      # Position embeddings only in the first block of a stage, as in the official code.
      y = ParCBlock(self.stage.meta_kernel_size, self.stage.ffn_channels, use_pe=i == 0,
                    dropout=self.dropout, parc_method=self.parc_method, name=f"block_{i}")(y, train)
    y = BatchNorm(name="global_norm")(y, train)
    y = ConvBNAct(c, 1, groups=groups, name="channel_adaptive")(y, train)
    if self.fusion == "add":
      fused_in = x + y
    elif self.fusion == "concat":
      fused_in = jnp.concatenate([y, x], axis=-1)
    else:
      raise ValueError(f"fusion must be 'add' or 'concat', got {self.fusion!r}")
    return ConvBNAct(c, 3, name="local_global_fusion")(fused_in, train)


class ParCNet(Classifier):
  """ParC-Net classifier (or, with ``features_only``, a 4-level feature pyramid).

  ``features_only=True`` returns the outputs of layer_2..layer_5 (strides 4, 8, 16, 32) and
  creates neither the 1x1 expansion nor the classifier.
  """
  config: ParCNetConfig
  num_classes: int = 1000
  drop_rate: float = 0.2
  ffn_dropout: float = 0.1
  features_only: bool = False
  parc_method: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | list[jax.Array]:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"ParCNet expects NHWC images with 3 channels, got shape {x.shape}")
    cfg = self.config
    w0, w1, w2 = cfg.widths
    x = ConvBNAct(w0, cfg.stem_kernel, 2, name="conv_1")(x, train)
    x = InvertedResidual(w1, 1, name="layer_1_0")(x, train)
    feats = []
    for j in range(3):
      x = InvertedResidual(w2, 2 if j == 0 else 1, name=f"layer_2_{j}")(x, train)
    feats.append(x)
    for idx, stage in enumerate(cfg.stages, start=3):
      x = InvertedResidual(stage.channels, 2, name=f"layer_{idx}_0")(x, train)
      x = OuterFrame(stage, cfg.fusion, self.ffn_dropout, self.parc_method,
                     name=f"layer_{idx}_1")(x, train)
      feats.append(x)
    if self.features_only:
      return feats
    return self._head(x, train)

  def _head(self, x: jax.Array, train: bool, pre_logits: bool = False) -> jax.Array:
    x = ConvBNAct(min(4 * x.shape[-1], 960), 1, name="conv_1x1_exp")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    if pre_logits:
      return x
    x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
    return nn.Dense(self.num_classes, kernel_init=trunc_normal_init(0.02), name="classifier")(x)


def _create(name: str, num_classes: int, **kw) -> ParCNet:
  return ParCNet(CONFIGS[name], num_classes=num_classes, **kw)


@register_model(default_resolution=256, input_convention="parc_bgr")
def parcnet_xs(num_classes: int = 1000, **kw: Any) -> ParCNet:
  """ParC-Net-XS: 2.19M params ('add' fusion; no official weights were released)."""
  return _create("parcnet_xs", num_classes, **kw)


@register_model(default_resolution=256, input_convention="parc_bgr")
def parcnet_s(num_classes: int = 1000, **kw: Any) -> ParCNet:
  """ParC-Net-S: 5.04M params, 1740.6M MACs at 256 (repo profiler), 78.6% ImageNet top-1."""
  return _create("parcnet_s", num_classes, **kw)


@register_model(default_resolution=256, input_convention="parc_bgr")
def parcnet_h(num_classes: int = 1000, **kw: Any) -> ParCNet:
  """ParC-Net-H: 20.4M params (the wide variant of the official configs)."""
  return _create("parcnet_h", num_classes, **kw)


# ----------------------------------------------------------------------------------------------
# The official repository's profiler convention
# ----------------------------------------------------------------------------------------------
def official_profiler_macs(name: str, resolution: int = 256, num_classes: int = 1000) -> int:
  """MACs as ``model.profile_model`` of the official repo counts them (1740.6M for S at 256).

  Its convention differs from plain conv/matmul counting (``profiling.profile``): conv and FFN
  biases are counted, the Linear layer counts its parameters, each ParC block is charged
  ``2 * n * Cs * h * w`` for its four global convs, and the channel-attention gate is charged
  ``F * (F // 16) * h * w * 2`` (with the FFN width F, at full resolution, as written there).
  Feature sizes follow its ``in // stride`` rule.
  """
  cfg = CONFIGS[name]

  def conv(cin, cout, k, hw, groups=1):
    return k * k * cin * cout * hw // groups

  def mv2(cin, cout, stride, size):
    hidden = make_divisible(int(round(cin * 4)))
    out = size // stride
    return (conv(cin, hidden, 1, size * size) + conv(hidden, hidden, 3, out * out, hidden)
            + conv(hidden, cout, 1, out * out)), out

  w0, w1, w2 = cfg.widths
  size = resolution // 2
  macs = conv(3, w0, cfg.stem_kernel, size * size)
  m, size = mv2(w0, w1, 1, size)
  macs += m
  cin = w1
  for j in range(3):
    m, size = mv2(cin, w2, 2 if j == 0 else 1, size)
    macs += m
    cin = w2
  for st in cfg.stages:
    m, size = mv2(cin, st.channels, 2, size)
    macs += m
    c, cs, f, hw = st.channels, st.parc_channels, st.ffn_channels, size * size
    g = math.gcd(cs, c)
    macs += conv(c, cs, 3, hw, g) + conv(cs, cs, 1, hw)
    block = size * cs * hw * 2 + cs * f * hw * 2 + (cs + f) * hw + f * (f // 16) * hw * 2
    macs += block * st.num_blocks
    macs += cs * c * hw // g
    macs += 9 * (c if cfg.fusion == "add" else 2 * c) * c * hw
    cin = c
  exp = min(4 * cin, 960)
  macs += conv(cin, exp, 1, size * size)
  macs += exp * num_classes + num_classes
  return int(macs)


@register_profile_hook
def official_profile_hook(model_name: str, counts: dict, params: int,
                          resolution: int | None = None) -> dict:
  """``profiling`` hook: adds ``macs_official`` (the repo profiler's count) at ``resolution``.

  The count depends on the input size, so it is only added when ``profile`` passes the
  resolution to the hook.
  """
  del counts, params
  if resolution is None or model_name not in CONFIGS:
    return {}
  return {"macs_official": official_profiler_macs(model_name, resolution)}
