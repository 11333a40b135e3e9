"""PyTorch RegNetY with timm's module tree and key names (``timm.models.regnet``, timm 1.0).

Written by us so that a RegNetY exported from this project runs without timm: ``stem.conv`` /
``stem.bn``, stages ``s1 .. s4`` of blocks ``b1 ..`` (``conv1``, ``conv2``, ``se.fc1`` /
``se.fc2``, ``conv3``, and ``downsample`` where the width or stride changes), ``head.fc``. The
stage tables are written out here again (not imported from the JAX port), as timm derives them.
Inference only: no stochastic depth and no timm initialisation.
"""
from __future__ import annotations

import torch
from torch import nn

# name: (((width, depth) per stage), group width); every Y model has SE ratio 0.25 (of the block
# input width) and bottleneck ratio 1.
STAGES = {
    "regnety_002": (((24, 1), (56, 1), (152, 4), (368, 7)), 8),
    "regnety_004": (((48, 1), (104, 3), (208, 6), (440, 6)), 8),
    "regnety_160": (((224, 2), (448, 4), (1232, 11), (3024, 1)), 112),
}


class ConvNormAct(nn.Module):
  """timm ``ConvNormAct``: ``conv`` (no bias, symmetric padding ``k // 2``) + ``bn`` (+ ReLU)."""

  def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
               act: bool = True) -> None:
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
    self.bn = nn.BatchNorm2d(cout)
    self.act = nn.ReLU() if act else nn.Identity()

  def forward(self, x) -> torch.Tensor:
    return self.act(self.bn(self.conv(x)))


class SEModule(nn.Module):
  def __init__(self, channels: int, rd_channels: int) -> None:
    super().__init__()
    self.fc1 = nn.Conv2d(channels, rd_channels, 1)
    self.act = nn.ReLU()
    self.fc2 = nn.Conv2d(rd_channels, channels, 1)

  def forward(self, x) -> torch.Tensor:
    return x * self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()


class Bottleneck(nn.Module):
  def __init__(self, cin: int, width: int, stride: int, group_size: int, se_ratio: float) -> None:
    super().__init__()
    self.conv1 = ConvNormAct(cin, width, 1)
    self.conv2 = ConvNormAct(width, width, 3, stride, groups=width // group_size)
    rd = int(round(cin * se_ratio))
    self.se = SEModule(width, rd) if rd else nn.Identity()
    self.conv3 = ConvNormAct(width, width, 1, act=False)
    self.downsample = (ConvNormAct(cin, width, 1, stride, act=False)
                       if cin != width or stride != 1 else None)
    self.act3 = nn.ReLU()

  def forward(self, x) -> torch.Tensor:
    y = self.conv3(self.se(self.conv2(self.conv1(x))))
    return self.act3(y + (x if self.downsample is None else self.downsample(x)))


class Head(nn.Module):
  def __init__(self, cin: int, num_classes: int) -> None:
    super().__init__()
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x) -> torch.Tensor:
    return self.fc(x.mean((2, 3)))


class RegNet(nn.Module):
  def __init__(self, stages, group_size: int, se_ratio: float = 0.25, stem_width: int = 32,
               num_classes: int = 1000) -> None:
    super().__init__()
    self.stem = ConvNormAct(3, stem_width, 3, 2)
    cin = stem_width
    for i, (width, depth) in enumerate(stages):
      blocks = nn.Sequential()
      for j in range(depth):
        blocks.add_module(f"b{j + 1}", Bottleneck(cin, width, 2 if j == 0 else 1, group_size,
                                                   se_ratio))
        cin = width
      self.add_module(f"s{i + 1}", blocks)
    self.num_stages = len(stages)
    self.head = Head(cin, num_classes)

  def forward(self, x) -> torch.Tensor:
    x = self.stem(x)
    for i in range(self.num_stages):
      x = getattr(self, f"s{i + 1}")(x)
    return self.head(x)


def build(name: str, num_classes: int = 1000) -> RegNet:
  stages, group_size = STAGES[name]
  return RegNet(stages, group_size, num_classes=num_classes)
