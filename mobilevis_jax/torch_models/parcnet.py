"""PyTorch ParC-Net (the "EdgeFormer" classification models of hkzhang91/ParC-Net).

Written by us from the official module tree (``cvnets/models/classification/edgeformer.py``,
``cvnets/modules/edgeformer_block.py`` with ``gcc_ca_mf_block`` and ``outer_frame_v1``); the
state_dict keys and parameter counts are the official ones, including the top-level ``residual``
attribute that aliases ``layer_5.0``. Only the configuration the released models use is
reproduced: interpolated meta kernels, PE in the first block of a stage, no ParC bias, no channel
shuffle. Unlike the official block, non-square maps are taken (H kernels and PEs are resampled to
the map height, W ones to its width, as ``mobilevis_jax.models.parcnet`` does); on square maps it
is the official computation.

A *baked* model (``bake_(model, (H, W))``) stores every meta kernel and position embedding
already resampled to the map sizes of one input resolution, so that its forward pass does no
interpolation (what a deployment runtime wants) and refuses any other input size.

Independent of the rest of ``mobilevis_jax``: it only depends on torch.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from mobilevis_jax.torch_models.common import input_shapes

# scale -> (stem kernel, stem/layer_1/layer_2 widths, per stage (C, Cs, F, blocks, K), fusion)
CONFIGS = {
    "xs": dict(stem_kernel=3, widths=(16, 32, 64), fusion="add",
               stages=((96, 96, 192, 2, 32), (128, 128, 256, 3, 16), (160, 160, 320, 2, 8))),
    "s": dict(stem_kernel=3, widths=(16, 32, 64), fusion="concat",
              stages=((96, 192, 384, 2, 32), (128, 256, 512, 4, 16), (160, 320, 640, 3, 8))),
    "h": dict(stem_kernel=5, widths=(48, 96, 144), fusion="concat",
              stages=((216, 324, 648, 3, 32), (288, 432, 864, 9, 16), (432, 432, 864, 3, 8))),
}


def make_divisible(v: float, divisor: int = 8) -> int:
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


class ConvLayer(nn.Module):
  """cvnets ConvLayer: ``block.conv`` (+ ``block.norm``, ``block.act``), padding (k-1)//2."""

  def __init__(self, cin, cout, k, stride=1, groups=1, norm=True, act=True) -> None:
    super().__init__()
    parts = [("conv", nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False))]
    if norm:
      parts.append(("norm", nn.BatchNorm2d(cout)))
    if act:
      parts.append(("act", nn.SiLU()))
    self.block = nn.Sequential(OrderedDict(parts))

  def forward(self, x) -> torch.Tensor:
    return self.block(x)


class InvertedResidual(nn.Module):
  def __init__(self, cin, cout, stride, expand_ratio=4) -> None:
    super().__init__()
    hidden = make_divisible(int(round(cin * expand_ratio)), 8)
    self.block = nn.Sequential(OrderedDict([
        ("exp_1x1", ConvLayer(cin, hidden, 1)),
        ("conv_3x3", ConvLayer(hidden, hidden, 3, stride, groups=hidden)),
        ("red_1x1", ConvLayer(hidden, cout, 1, act=False)),
    ]))
    self.use_res = stride == 1 and cin == cout

  def forward(self, x) -> torch.Tensor:
    y = self.block(x)
    return x + y if self.use_res else y


class ChannelAttention(nn.Module):
  """CA_layer: GAP -> 1x1 (C/16) -> BN -> Hardswish -> 1x1 (C) -> BN -> Hardsigmoid -> scale."""

  def __init__(self, c, reduction=16) -> None:
    super().__init__()
    self.gap = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Sequential(
        nn.Conv2d(c, c // reduction, 1, bias=False), nn.BatchNorm2d(c // reduction), nn.Hardswish(),
        nn.Conv2d(c // reduction, c, 1, bias=False), nn.BatchNorm2d(c), nn.Hardsigmoid())

  def forward(self, x) -> torch.Tensor:
    return x * self.fc(self.gap(x))


def circular_conv_nchw(x: torch.Tensor, weight: torch.Tensor, along_h: bool) -> torch.Tensor:
  """Official circular padding trick: append the first n-1 rows/cols, VALID depthwise conv."""
  if along_h:
    x = torch.cat((x, x[:, :, :-1, :]), dim=2)
  else:
    x = torch.cat((x, x[:, :, :, :-1]), dim=3)
  return F.conv2d(x, weight, groups=x.shape[1])


class ParCBlock(nn.Module):
  """gcc_ca_mf_block with interpolated instance kernels (no bias, no mid mix)."""

  def __init__(self, dim, meta_kernel_size, ffn_dim, use_pe, dropout=0.1) -> None:
    super().__init__()
    k = meta_kernel_size
    self.pre_Norm_1 = nn.BatchNorm2d(dim)
    self.pre_Norm_2 = nn.BatchNorm2d(dim)
    bound = 1.0 / math.sqrt(k)  # default Conv2d init of a (k, 1) depthwise kernel
    for name, shape in (("meta_kernel_1_H", (dim, 1, k, 1)), ("meta_kernel_1_W", (dim, 1, 1, k)),
                        ("meta_kernel_2_H", (dim, 1, k, 1)), ("meta_kernel_2_W", (dim, 1, 1, k))):
      setattr(self, name, nn.Parameter(torch.empty(shape).uniform_(-bound, bound)))
    self.use_pe = use_pe
    if use_pe:
      self.meta_pe_1_H = nn.Parameter(torch.randn(1, dim, k, 1))
      self.meta_pe_1_W = nn.Parameter(torch.randn(1, dim, 1, k))
      self.meta_pe_2_H = nn.Parameter(torch.randn(1, dim, k, 1))
      self.meta_pe_2_W = nn.Parameter(torch.randn(1, dim, 1, k))
    self.dim = dim
    self.baked: tuple[int, int] | None = None  # (h, w) once bake_ has resampled the kernels
    self.ffn = nn.Sequential(
        nn.BatchNorm2d(2 * dim), nn.Conv2d(2 * dim, ffn_dim, 1), nn.Hardswish(), nn.Dropout(0.0),
        nn.Conv2d(ffn_dim, 2 * dim, 1), nn.Dropout(dropout))
    self.ca = ChannelAttention(2 * dim)

  @staticmethod
  def _resize(t, n, along_h):
    if t.shape[2 if along_h else 3] == n:
      return t
    size = [n, 1] if along_h else [1, n]
    return F.interpolate(t, size, mode="bilinear", align_corners=True)

  def forward(self, x) -> torch.Tensor:
    x1_in, x2_in = torch.chunk(x, 2, dim=1)
    x1, x2 = x1_in, x2_in
    h, w = x1.shape[2], x1.shape[3]
    if self.baked is not None and (h, w) != self.baked:
      raise ValueError(f"this ParC block is baked for {self.baked[0]}x{self.baked[1]} maps, "
                       f"got {h}x{w} (the input resolution differs from the export's)")
    if self.use_pe:
      x1 = x1 + self._resize(self.meta_pe_1_H, h, True).expand(1, self.dim, h, w)
      x2 = x2 + self._resize(self.meta_pe_1_W, w, False).expand(1, self.dim, h, w)
    y1 = circular_conv_nchw(self.pre_Norm_1(x1), self._resize(self.meta_kernel_1_H, h, True), True)
    y2 = circular_conv_nchw(self.pre_Norm_2(x2), self._resize(self.meta_kernel_1_W, w, False),
                            False)
    if self.use_pe:
      y1 = y1 + self._resize(self.meta_pe_2_W, w, False).expand(1, self.dim, h, w)
      y2 = y2 + self._resize(self.meta_pe_2_H, h, True).expand(1, self.dim, h, w)
    y1 = circular_conv_nchw(y1, self._resize(self.meta_kernel_2_W, w, False), False)
    y2 = circular_conv_nchw(y2, self._resize(self.meta_kernel_2_H, h, True), True)
    # The residual is the block input from before the PE was added.
    z = torch.cat((x1_in + y1, x2_in + y2), dim=1)
    return z + self.ca(self.ffn(z))

  @torch.no_grad()
  def bake_(self, h: int, w: int) -> None:
    """Replace the meta kernels and PEs by their resampled ``h`` x ``w`` instances, in place."""
    for name, p in list(self.named_parameters(recurse=False)):
      along_h = name.endswith("_H")
      setattr(self, name, nn.Parameter(self._resize(p, h if along_h else w, along_h).clone()))
    self.baked = (h, w)


class OuterFrame(nn.Module):
  """outer_frame_v1: dim_adaptive -> N ParC blocks + BN -> channel_adaptive -> fusion."""

  def __init__(self, c, cs, ffn_dim, n_blocks, meta_kernel_size, fusion) -> None:
    super().__init__()
    g = math.gcd(cs, c)
    self.dim_adaptive = nn.Sequential(ConvLayer(c, cs, 3, groups=g),
                                      ConvLayer(cs, cs, 1, norm=False, act=False))
    blocks = [ParCBlock(cs // 2, meta_kernel_size, ffn_dim, use_pe=(i == 0))
              for i in range(n_blocks)]
    self.spatial_global_rep = nn.Sequential(*blocks, nn.BatchNorm2d(cs))
    self.channel_adaptive = ConvLayer(cs, c, 1, groups=g)
    self.local_global_fusion = ConvLayer(c if fusion == "add" else 2 * c, c, 3)
    self.fusion = fusion

  def forward(self, x) -> torch.Tensor:
    y = self.channel_adaptive(self.spatial_global_rep(self.dim_adaptive(x)))
    if self.fusion == "add":
      return self.local_global_fusion(x + y)
    return self.local_global_fusion(torch.cat((y, x), dim=1))


class GlobalPool(nn.Module):
  def forward(self, x) -> torch.Tensor:
    return x.mean(dim=(2, 3))


class ParCNetRef(nn.Module):
  def __init__(self, scale="s", num_classes=1000) -> None:
    super().__init__()
    cfg = CONFIGS[scale]
    w0, w1, w2 = cfg["widths"]
    self.conv_1 = ConvLayer(3, w0, cfg["stem_kernel"], stride=2)
    self.layer_1 = nn.Sequential(InvertedResidual(w0, w1, 1))
    self.layer_2 = nn.Sequential(InvertedResidual(w1, w2, 2), InvertedResidual(w2, w2, 1),
                                 InvertedResidual(w2, w2, 1))
    cin = w2
    for idx, (c, cs, ffn, nb, k) in enumerate(cfg["stages"], start=3):
      # Official quirk: each stage's downsampling block is also stored as ``self.residual``; the
      # last assignment (layer_5.0) wins and its parameters appear twice in the state_dict.
      self.residual = InvertedResidual(cin, c, 2)
      setattr(self, f"layer_{idx}",
              nn.Sequential(self.residual, OuterFrame(c, cs, ffn, nb, k, cfg["fusion"])))
      cin = c
    exp = min(4 * cin, 960)
    self.conv_1x1_exp = ConvLayer(cin, exp, 1)
    self.classifier = nn.Sequential(OrderedDict([
        ("global_pool", GlobalPool()), ("dropout", nn.Dropout(0.2)),
        ("fc", nn.Linear(exp, num_classes))]))

  def forward_features(self, x) -> torch.Tensor:
    feats = []
    x = self.layer_1(self.conv_1(x))
    for layer in (self.layer_2, self.layer_3, self.layer_4, self.layer_5):
      x = layer(x)
      feats.append(x)
    return feats

  def forward(self, x) -> torch.Tensor:
    return self.classifier(self.conv_1x1_exp(self.forward_features(x)[-1]))


def bake_(model: nn.Module, resolution: tuple[int, int]) -> nn.Module:
  """Bake every :class:`ParCBlock` of ``model`` for ``(H, W)`` inputs, in place; returns it.

  The map size each block sees is its input shape (`common.input_shapes`);
  the kernels and PEs are then resampled exactly as the unbaked forward would resample them.
  """
  for block, shape in input_shapes(model, resolution, ParCBlock).items():
    block.bake_(shape[2], shape[3])
  return model
