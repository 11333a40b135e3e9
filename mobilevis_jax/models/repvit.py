"""RepViT (Wang et al., CVPR 2024), faithful to THU-MIG/RepViT.

A MobileNetV3-style network rebuilt with ViT-style macro design:

* **stem**: two 3x3 stride-2 Conv-BN with a GELU between them (output stride 4, no final act);
* **blocks**: a RepVGGDW token mixer ``BN(dw3x3-BN(x) + dw1x1(x) + x)``, squeeze-excite on every
  other block of a stage (starting with the first), then a residual 1x1 FFN
  ``Conv-BN(C->2C) -> GELU -> Conv-BN(2C->C)``. There is no activation between or after them;
* **downsample** (stages 2-4): a block *without* SE (the "pre-block"), a depthwise 3x3 stride-2
  Conv-BN, a 1x1 Conv-BN to the new width and a residual FFN;
* **head**: global average pool -> BatchNorm1d -> Linear, plus an identical distillation head.
  With ``distillation=True``, ``train=True`` returns ``(logits, dist_logits)`` and ``train=False``
  their mean, as the official ``Classfier`` does.

The official code lists one config row per block; a variant is equivalently (and as in timm)
four widths and four block counts: every stage but the last ends in the pre-block of the next
downsample. The last BN of every residual branch starts with gamma = 0, as officially.

The *legacy* models of the first release (``repvit_m1/m2/m3``) differ only in the token mixer:
its 1x1 branch is a Conv-BN and there is no BN after the sum.

``fuse`` (structural re-parameterisation, the official ``replace_batchnorm``) returns a
:class:`FusedRepViT`: one depthwise 3x3 conv with bias per token mixer, every Conv-BN as one conv,
and one Linear head (the two heads averaged).

``features_only=True`` returns the four stage outputs at strides 4/8/16/32, taken *before* the
next stage's pre-block (timm's definition, equal to the official detection ``out_indices``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobilevis_jax.layers import (
  BatchNorm,
  Conv2d,
  ConvBN,
  SqueezeExcite,
  gelu,
  kernels,
  make_divisible,
  reparam,
  torch_default_bias_init,
  trunc_normal_init,
)
from mobilevis_jax.models.base import Classifier, HeadOutput
from mobilevis_jax.models.registry import register_fuse, register_model


@dataclasses.dataclass(frozen=True)
class RepViTConfig:
  widths: tuple[int, int, int, int]
  depths: tuple[int, int, int, int]  # blocks per stage, not counting pre-blocks and downsamples
  legacy: bool = False


VARIANTS = {
    "repvit_m0_6": RepViTConfig((40, 80, 160, 320), (1, 1, 8, 1)),
    "repvit_m0_9": RepViTConfig((48, 96, 192, 384), (2, 2, 14, 2)),
    "repvit_m1_0": RepViTConfig((56, 112, 224, 448), (2, 2, 14, 2)),
    "repvit_m1_1": RepViTConfig((64, 128, 256, 512), (2, 2, 12, 2)),
    "repvit_m1_5": RepViTConfig((64, 128, 256, 512), (4, 4, 24, 4)),
    "repvit_m2_3": RepViTConfig((80, 160, 320, 640), (6, 6, 34, 2)),
    "repvit_m1": RepViTConfig((48, 96, 192, 384), (2, 2, 14, 2), legacy=True),
    "repvit_m2": RepViTConfig((64, 128, 256, 512), (2, 2, 12, 2), legacy=True),
    "repvit_m3": RepViTConfig((64, 128, 256, 512), (4, 4, 18, 2), legacy=True),
}


def se_channels(channels: int) -> int:
  """Squeeze width of timm's ``SqueezeExcite(C, 0.25)``: C/4 rounded to a multiple of 8 (>= 8)."""
  return make_divisible(channels * 0.25, 8, round_limit=0.0)


def _conv_norm(features: int, kernel_size: int = 1, strides: int = 1, groups: int = 1,
               zero_init: bool = False, *, fused: bool,
               name: str) -> Callable[[jax.Array, bool], Any]:
  """A Conv-BN (``layers.ConvBN``), or after fusion a single conv with bias; call ``(x, train)``.

  ``zero_init`` starts the BN gamma at 0, which the official code does for the last Conv-BN of
  every residual branch so that each block starts as the identity.
  """
  if fused:
    conv = Conv2d(features, kernel_size, strides, groups=groups, use_bias=True, name=name)
    return lambda x, train: conv(x)
  return ConvBN(features, kernel_size, strides, groups=groups, name=name,
                bn_scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones)


class RepVGGDW(nn.Module):
  """Token mixer: ``BN(dw3x3-BN(x) + dw1x1(x) + x)``; legacy: ``dw3x3-BN(x) + dw1x1-BN(x) + x``."""
  legacy: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    # In eval mode the three branches read x through one padded map, materialised on the CPU's
    # shift path: when the 1x1 and identity branches read x itself, XLA recomputes the residual
    # stack before this block in every block (kernels.shared_pad). Train mode's BatchNorm
    # statistics already stop that (the same tap slices with or without the shared map), where
    # the map measured 2-4% slower (experiments/bench/RESULTS.md, "The unfused token mixer").
    # Same parameters and values either way.
    xp, padding = x, None
    if not train:
      xp, x = kernels.shared_pad(x, ((1, 1), (1, 1)))
      padding = 0
    y = ConvBN(c, 3, padding=padding, groups=c, name="conv")(xp, train)
    if self.legacy:
      y = y + ConvBN(c, 1, groups=c, name="conv1")(x, train)
      return y + x
    # The official dw 1x1 is a plain nn.Conv2d: PyTorch's default init, bias included.
    y = y + Conv2d(c, 1, groups=c, use_bias=True, bias_init=torch_default_bias_init,
                   name="conv1")(x)
    return BatchNorm(name="bn")(y + x, train)


class ConvMlp(nn.Module):
  """The channel mixer: 1x1 Conv-BN to ``ratio * C``, GELU, 1x1 Conv-BN back (zero-init gamma)."""
  ratio: int = 2
  fused: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    y = _conv_norm(self.ratio * c, fused=self.fused, name="conv1")(x, train)
    return _conv_norm(c, zero_init=True, fused=self.fused, name="conv2")(gelu(y), train)


class RepViTBlock(nn.Module):
  """Stride-1 block: token mixer, optional SE, residual FFN (no activation outside the FFN)."""
  use_se: bool
  legacy: bool = False
  fused: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    if self.fused:
      x = Conv2d(c, 3, groups=c, use_bias=True, name="token_mixer")(x)
    else:
      x = RepVGGDW(self.legacy, name="token_mixer")(x, train)
    if self.use_se:
      x = SqueezeExcite(se_channels(c), name="se")(x)
    return x + ConvMlp(fused=self.fused, name="channel_mixer")(x, train)


class RepViTDownsample(nn.Module):
  """Pre-block (no SE), depthwise 3x3 stride-2 Conv-BN, 1x1 Conv-BN to ``features``, residual
  FFN."""
  features: int
  legacy: bool = False
  fused: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    x = RepViTBlock(False, self.legacy, self.fused, name="pre_block")(x, train)
    x = _conv_norm(c, 3, 2, groups=c, fused=self.fused, name="spatial_downsample")(x, train)
    x = _conv_norm(self.features, fused=self.fused, name="channel_downsample")(x, train)
    return x + ConvMlp(fused=self.fused, name="ffn")(x, train)


class RepViTStage(nn.Module):
  """Optional downsample, then ``depth`` blocks with SE on the 1st, 3rd, 5th, ..."""
  features: int
  depth: int
  downsample: bool
  legacy: bool = False
  fused: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.downsample:
      x = RepViTDownsample(self.features, self.legacy, self.fused, name="downsample")(x, train)
    elif x.shape[-1] != self.features:
      raise ValueError(f"a stage without downsample keeps its width: got {x.shape[-1]} channels "
                       f"for a {self.features}-wide stage")
    for i in range(self.depth):
      x = RepViTBlock(i % 2 == 0, self.legacy, self.fused, name=f"blocks_{i}")(x, train)
    return x


class BNLinear(nn.Module):
  """The official ``BN_Linear``: BatchNorm1d then Linear (weights trunc_normal(0.02), bias 0)."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = BatchNorm(name="bn")(x, train)
    return nn.Dense(self.features, kernel_init=trunc_normal_init(0.02), name="linear")(x)


class RepViT(Classifier):
  """RepViT classifier (NHWC input). See the module docstring for the structure.

  Attributes:
    widths, depths: per-stage channels and block counts (``VARIANTS``).
    legacy: token mixer of the first release (Conv-BN 1x1 branch, no BN after the sum).
    num_classes: classifier width; 0 returns the pooled features.
    distillation: add the DeiT-style ``head_dist``.
    features_only: return the four stage outputs and create no head.
  """
  widths: tuple[int, ...]
  depths: tuple[int, ...]
  legacy: bool = False
  num_classes: int = 1000
  distillation: bool = False
  features_only: bool = False

  fused = False  # class constant: FusedRepViT flips it

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> HeadOutput | list[jax.Array]:
    if len(self.widths) != len(self.depths):
      raise ValueError(f"widths {self.widths} and depths {self.depths} differ in length")
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"RepViT expects NHWC images with 3 channels, got shape {x.shape}")
    stem = self.widths[0]
    x = _conv_norm(stem // 2, 3, 2, fused=self.fused, name="stem_conv1")(x, train)
    x = _conv_norm(stem, 3, 2, fused=self.fused, name="stem_conv2")(gelu(x), train)
    features = []
    for i, (width, depth) in enumerate(zip(self.widths, self.depths)):
      x = RepViTStage(width, depth, downsample=i > 0, legacy=self.legacy, fused=self.fused,
                      name=f"stages_{i}")(x, train)
      features.append(x)
    if self.features_only:
      return features
    return self._head(x, train)

  def _head(self, x: jax.Array, train: bool, pre_logits: bool = False) -> HeadOutput:
    x = jnp.mean(x, axis=(1, 2))
    return x if pre_logits or self.num_classes == 0 else self._classifier(x, train)

  def _classifier(self, x: jax.Array, train: bool) -> HeadOutput:
    logits = BNLinear(self.num_classes, name="head")(x, train)
    if not self.distillation:
      return logits
    dist = BNLinear(self.num_classes, name="head_dist")(x, train)
    return (logits, dist) if train else (logits + dist) / 2


class FusedRepViT(RepViT):
  """Inference form of :class:`RepViT` produced by :func:`fuse_repvit`.

  Every Conv-BN is one conv with bias, every token mixer one depthwise 3x3 conv with bias, and
  the head one Linear layer (``head``; with distillation, the average of the two heads, so the
  output is the same in train and eval mode).
  """
  fused = True

  def _classifier(self, x: jax.Array, train: bool) -> jax.Array:
    return nn.Dense(self.num_classes, name="head")(x)


def _create(name: str, num_classes: int = 1000, distillation: bool = False,
            features_only: bool = False, fused: bool = False) -> RepViT:
  cfg = VARIANTS[name]
  cls = FusedRepViT if fused else RepViT
  return cls(widths=cfg.widths, depths=cfg.depths, legacy=cfg.legacy, num_classes=num_classes,
             distillation=distillation, features_only=features_only)


# One registered factory per variant. ``fused=True`` builds the inference architecture directly
# (what ``fuse`` returns), e.g. to load a fused official checkpoint.
_register = register_model(default_resolution=224, layouts=("official", "timm"))


@_register
def repvit_m0_6(num_classes: int = 1000, distillation: bool = False, features_only: bool = False,
                fused: bool = False) -> RepViT:
  """RepViT-M0.6 (2.5M params; not released with weights)."""
  return _create("repvit_m0_6", num_classes, distillation, features_only, fused)


@_register
def repvit_m0_9(num_classes: int = 1000, distillation: bool = False, features_only: bool = False,
                fused: bool = False) -> RepViT:
  """RepViT-M0.9 (5.1M params, 0.8 GMACs fused)."""
  return _create("repvit_m0_9", num_classes, distillation, features_only, fused)


@_register
def repvit_m1_0(num_classes: int = 1000, distillation: bool = False, features_only: bool = False,
                fused: bool = False) -> RepViT:
  """RepViT-M1.0 (6.8M params, 1.1 GMACs fused)."""
  return _create("repvit_m1_0", num_classes, distillation, features_only, fused)


@_register
def repvit_m1_1(num_classes: int = 1000, distillation: bool = False, features_only: bool = False,
                fused: bool = False) -> RepViT:
  """RepViT-M1.1 (8.2M params, 1.3 GMACs fused)."""
  return _create("repvit_m1_1", num_classes, distillation, features_only, fused)


@_register
def repvit_m1_5(num_classes: int = 1000, distillation: bool = False, features_only: bool = False,
                fused: bool = False) -> RepViT:
  """RepViT-M1.5 (14.0M params, 2.3 GMACs fused)."""
  return _create("repvit_m1_5", num_classes, distillation, features_only, fused)


@_register
def repvit_m2_3(num_classes: int = 1000, distillation: bool = False, features_only: bool = False,
                fused: bool = False) -> RepViT:
  """RepViT-M2.3 (22.9M params, 4.5 GMACs fused)."""
  return _create("repvit_m2_3", num_classes, distillation, features_only, fused)


@_register
def repvit_m1(num_classes: int = 1000, distillation: bool = False, features_only: bool = False,
              fused: bool = False) -> RepViT:
  """Legacy RepViT-M1 (first release; the M0.9 shape with the legacy token mixer)."""
  return _create("repvit_m1", num_classes, distillation, features_only, fused)


@_register
def repvit_m2(num_classes: int = 1000, distillation: bool = False, features_only: bool = False,
              fused: bool = False) -> RepViT:
  """Legacy RepViT-M2 (first release; the M1.1 shape with the legacy token mixer)."""
  return _create("repvit_m2", num_classes, distillation, features_only, fused)


@_register
def repvit_m3(num_classes: int = 1000, distillation: bool = False, features_only: bool = False,
              fused: bool = False) -> RepViT:
  """Legacy RepViT-M3 (first release; 64..512 wide, depths 4/4/18/2, legacy token mixer)."""
  return _create("repvit_m3", num_classes, distillation, features_only, fused)


# --- structural re-parameterisation ------------------------------------------------------------

def _fuse_conv_bn(p: dict, s: dict) -> dict:
  kernel, bias = reparam.fuse_conv_bn(p["conv"]["kernel"], None, p["bn"], s["bn"])
  return {"kernel": kernel, "bias": bias}


def _fuse_token_mixer(p: dict, s: dict, legacy: bool) -> dict:
  """RepVGGDW -> one depthwise 3x3 conv: W = W3 + pad(W1) + I (then fold the outer BN)."""
  conv3 = _fuse_conv_bn(p["conv"], s["conv"])
  conv1 = _fuse_conv_bn(p["conv1"], s["conv1"]) if legacy else p["conv1"]
  channels = conv3["kernel"].shape[-1]
  kernel = (conv3["kernel"] + reparam.pad_kernel(conv1["kernel"], 3)
            + reparam.identity_kernel(channels, 3, depthwise=True, dtype=conv3["kernel"].dtype))
  bias = conv3["bias"] + conv1["bias"]
  if not legacy:
    kernel, bias = reparam.fuse_conv_bn(kernel, bias, p["bn"], s["bn"])
  return {"kernel": kernel, "bias": bias}


def _fuse_tree(p: dict, s: dict, legacy: bool) -> dict:
  """Walk a params subtree; fold every Conv-BN and token mixer, copy everything else (SE)."""
  out = {}
  for key, sub in p.items():
    if not isinstance(sub, dict):
      out[key] = sub
    elif key == "token_mixer":
      out[key] = _fuse_token_mixer(sub, s[key], legacy)
    elif set(sub) == {"conv", "bn"}:
      out[key] = _fuse_conv_bn(sub, s[key])
    else:
      out[key] = _fuse_tree(sub, s.get(key, {}), legacy)
  return out


@register_fuse(RepViT)
def fuse_repvit(model: RepViT, variables: dict) -> tuple[FusedRepViT, dict]:
  """``fused_model, fused_variables = fuse_repvit(model, variables)`` (official
  replace_batchnorm)."""
  params, stats = variables["params"], variables.get("batch_stats", {})
  backbone = {k: v for k, v in params.items() if k not in ("head", "head_dist")}
  fused = _fuse_tree(backbone, stats, model.legacy)
  if "head" in params:
    def linear(name):
      lin = params[name]["linear"]
      return reparam.fuse_bn_linear(params[name]["bn"], stats[name]["bn"], lin["kernel"],
                                    lin["bias"])
    kernel, bias = linear("head")
    if model.distillation:
      kernel, bias = reparam.average_heads(kernel, bias, *linear("head_dist"))
    fused["head"] = {"kernel": kernel, "bias": bias}
  fused_model = FusedRepViT(widths=model.widths, depths=model.depths, legacy=model.legacy,
                            num_classes=model.num_classes, distillation=model.distillation,
                            features_only=model.features_only)
  return fused_model, {"params": fused}
