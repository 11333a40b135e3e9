"""PyTorch MobileViG (SLDGroup/MobileViG, ``models/mobilevig.py``): parity reference and export
target.

Written from the architecture description, not copied: it reproduces the official module tree so
that ``state_dict()`` has exactly the official key names and shapes (``stem.stem.N``,
``local_backbone.i.mlp.*``, ``local_backbone.i.layer_scale_2``, ``backbone.j.0.graph_conv.nn.*``,
``prediction.N``, ``head``, ``dist_head``). Unlike the official factories, ``num_classes`` and
``distillation`` are honoured so that the tests can exercise both head configurations.
"""
from __future__ import annotations

import torch
from torch import nn

VARIANTS = {
    # name: (local depths, local channels, global depth, global channels, embedding dim)
    "mobilevig_ti": ((2, 2, 6), (42, 84, 168), 2, 256, 512),
    "mobilevig_s": ((3, 3, 9), (42, 84, 176), 3, 256, 512),
    "mobilevig_m": ((3, 3, 9), (42, 84, 224), 3, 400, 768),
    "mobilevig_b": ((5, 5, 15), (42, 84, 240), 5, 464, 768),
}


class RefDropPath(nn.Module):
  """Per-sample stochastic depth; identity in eval mode (all parity tests run in eval)."""

  def __init__(self, rate: float) -> None:
    super().__init__()
    self.rate = rate

  def forward(self, x) -> torch.Tensor:
    if not self.training or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class RefStem(nn.Module):
  def __init__(self, out_ch: int) -> None:
    super().__init__()
    half = out_ch // 2
    self.stem = nn.Sequential(
        nn.Conv2d(3, half, 3, 2, 1), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, out_ch, 3, 2, 1), nn.BatchNorm2d(out_ch), nn.GELU())

  def forward(self, x) -> torch.Tensor:
    return self.stem(x)


class RefMlp(nn.Module):
  """The expand / depthwise / project path of the inverted residual (attribute names official)."""

  def __init__(self, dim: int, hidden: int) -> None:
    super().__init__()
    # Registration order decides the state_dict key order; it follows the official class.
    self.fc1 = nn.Conv2d(dim, hidden, 1)
    self.act = nn.GELU()
    self.fc2 = nn.Conv2d(hidden, dim, 1)
    self.drop = nn.Dropout(0.0)
    self.mid = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
    self.mid_norm = nn.BatchNorm2d(hidden)
    self.norm1 = nn.BatchNorm2d(hidden)
    self.norm2 = nn.BatchNorm2d(dim)

  def forward(self, x) -> torch.Tensor:
    x = self.act(self.norm1(self.fc1(x)))
    x = self.act(self.mid_norm(self.mid(x)))
    return self.drop(self.norm2(self.fc2(self.drop(x))))


class RefInvertedResidual(nn.Module):
  def __init__(self, dim: int, drop_path: float) -> None:
    super().__init__()
    self.mlp = RefMlp(dim, 4 * dim)
    self.drop_path = RefDropPath(drop_path) if drop_path > 0 else nn.Identity()
    self.layer_scale_2 = nn.Parameter(torch.full((dim, 1, 1), 1e-5))

  def forward(self, x) -> torch.Tensor:
    return x + self.drop_path(self.layer_scale_2 * self.mlp(x))


class RefDownsample(nn.Module):
  def __init__(self, cin: int, cout: int) -> None:
    super().__init__()
    self.conv = nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout))

  def forward(self, x) -> torch.Tensor:
    return self.conv(x)


class RefMRConv4d(nn.Module):
  """SVGA: max over rolled differences along H then W (stride K), block concat, 1x1 conv-BN-GELU."""

  def __init__(self, channels: int, k: int) -> None:
    super().__init__()
    self.k = k
    self.nn = nn.Sequential(nn.Conv2d(2 * channels, 2 * channels, 1), nn.BatchNorm2d(2 * channels),
                            nn.GELU())

  def forward(self, x) -> torch.Tensor:
    _, _, h, w = x.shape
    agg = torch.zeros_like(x)
    for shift in range(self.k, h, self.k):
      agg = torch.maximum(agg, x - torch.roll(x, shift, dims=2))
    for shift in range(self.k, w, self.k):
      agg = torch.maximum(agg, x - torch.roll(x, shift, dims=3))
    return self.nn(torch.cat([x, agg], dim=1))


class RefGrapher(nn.Module):
  def __init__(self, dim: int, drop_path: float, k: int) -> None:
    super().__init__()
    self.fc1 = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim))
    self.graph_conv = RefMRConv4d(dim, k)
    self.fc2 = nn.Sequential(nn.Conv2d(2 * dim, dim, 1), nn.BatchNorm2d(dim))
    self.drop_path = RefDropPath(drop_path) if drop_path > 0 else nn.Identity()

  def forward(self, x) -> torch.Tensor:
    return x + self.drop_path(self.fc2(self.graph_conv(self.fc1(x))))


class RefFFN(nn.Module):
  def __init__(self, dim: int, hidden: int, drop_path: float) -> None:
    super().__init__()
    self.fc1 = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.BatchNorm2d(hidden))
    self.act = nn.GELU()
    self.fc2 = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.BatchNorm2d(dim))
    self.drop_path = RefDropPath(drop_path) if drop_path > 0 else nn.Identity()

  def forward(self, x) -> torch.Tensor:
    return x + self.drop_path(self.fc2(self.act(self.fc1(x))))


class RefMobileViG(nn.Module):
  def __init__(self, local_depths, local_channels, global_depth, global_channels, emb_dims,
               num_classes=1000, distillation=True, drop_path=0.1, k=2) -> None:
    super().__init__()
    self.distillation = distillation
    total = sum(local_depths) + global_depth
    rates = torch.linspace(0, drop_path, total).tolist()
    self.stem = RefStem(local_channels[0])
    blocks = []
    idx = 0
    for stage, (depth, ch) in enumerate(zip(local_depths, local_channels)):
      if stage > 0:
        blocks.append(RefDownsample(local_channels[stage - 1], ch))
      for _ in range(depth):
        blocks.append(RefInvertedResidual(ch, rates[idx]))
        idx += 1
    blocks.append(RefDownsample(local_channels[-1], global_channels))
    self.local_backbone = nn.ModuleList(blocks)
    graph_blocks = []
    for _ in range(global_depth):
      graph_blocks.append(nn.Sequential(RefGrapher(global_channels, rates[idx], k),
                                        RefFFN(global_channels, 4 * global_channels, rates[idx])))
      idx += 1
    self.backbone = nn.ModuleList(graph_blocks)
    self.prediction = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                    nn.Conv2d(global_channels, emb_dims, 1),
                                    nn.BatchNorm2d(emb_dims), nn.GELU(), nn.Dropout(0.0))
    self.head = nn.Conv2d(emb_dims, num_classes, 1)
    if distillation:
      self.dist_head = nn.Conv2d(emb_dims, num_classes, 1)

  def forward_features(self, x) -> torch.Tensor:
    x = self.stem(x)
    for blk in self.local_backbone:
      x = blk(x)
    for blk in self.backbone:
      x = blk(x)
    return x

  def forward(self, x) -> torch.Tensor:
    x = self.prediction(self.forward_features(x))
    logits = self.head(x).flatten(1)
    if not self.distillation:
      return logits
    dist = self.dist_head(x).flatten(1)
    if self.training:
      return logits, dist
    return (logits + dist) / 2


def build(name: str, **kw) -> RefMobileViG:
  return RefMobileViG(*VARIANTS[name], **kw)
