"""PyTorch RepViT with the official THU-MIG/RepViT module tree and key names.

Our own code (not taken from the official repository), the parity reference of the tests and
the module `mobilevis export --format torch` deploys: it reproduces the structure the
official checkpoints are saved from -- ``features.0`` is the stem, ``features.1..N`` are the
config rows (one block each), ``classifier.classifier`` / ``classifier.classifier_dist`` are
BN->Linear heads -- so that ``state_dict()`` has exactly the official keys and shapes.

The variants are written here as per-row tables, the way the official code lists them, and *not*
derived from the (widths, depths) description the JAX port uses: the parity tests then also
check that the two descriptions agree.

``fuse_model`` reproduces the official ``utils.replace_batchnorm`` result (one depthwise 3x3 conv
with bias per RepVGGDW, fused Conv-BNs, one Linear head with the two heads averaged).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

# Per stage: (width, row codes). Codes, one per official config row: 'D' the stride-2 downsample
# row, '1' a stride-1 block with squeeze-excite, '0' a stride-1 block without it. Every row has
# kernel 3 and expansion 2 in the official tables.
ROW_TABLES = {
    "repvit_m0_6": ((40, "10"), (80, "D10"), (160, "D101010100"), (320, "D1")),
    "repvit_m0_9": ((48, "100"), (96, "D100"), (192, "D101010101010100"), (384, "D10")),
    "repvit_m1_0": ((56, "100"), (112, "D100"), (224, "D101010101010100"), (448, "D10")),
    "repvit_m1_1": ((64, "100"), (128, "D100"), (256, "D1010101010100"), (512, "D10")),
    "repvit_m1_5": ((64, "10100"), (128, "D10100"), (256, "D1010101010101010101010100"),
                    (512, "D1010")),
    "repvit_m2_3": ((80, "1010100"), (160, "D1010100"),
                    (320, "D10101010101010101010101010101010100"), (640, "D10")),
    # Legacy models of the first release (RepVGGDW with a Conv-BN 1x1 branch and no outer BN).
    "repvit_m1": ((48, "100"), (96, "D100"), (192, "D101010101010100"), (384, "D10")),
    "repvit_m2": ((64, "100"), (128, "D100"), (256, "D1010101010100"), (512, "D10")),
    "repvit_m3": ((64, "10100"), (128, "D10100"), (256, "D1010101010101010100"), (512, "D10")),
}
LEGACY = {"repvit_m1", "repvit_m2", "repvit_m3"}


def _divisible(v: float, divisor: int = 8) -> int:
  """SE width rounding of timm's SEModule (``make_divisible`` with round_limit=0)."""
  return max(divisor, int(v + divisor / 2) // divisor * divisor)


class Conv2d_BN(nn.Sequential):  # the official class name
  def __init__(self, cin, cout, ks=1, stride=1, pad=0, groups=1, bn_weight_init=1.0) -> None:
    super().__init__()
    self.add_module("c", nn.Conv2d(cin, cout, ks, stride, pad, groups=groups, bias=False))
    self.add_module("bn", nn.BatchNorm2d(cout))
    nn.init.constant_(self.bn.weight, bn_weight_init)
    nn.init.zeros_(self.bn.bias)

  @torch.no_grad()
  def fuse(self) -> nn.Conv2d:
    c, bn = self.c, self.bn
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    out = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                    groups=c.groups, bias=True, dtype=c.weight.dtype)
    out.weight.copy_(c.weight * s[:, None, None, None])
    out.bias.copy_(bn.bias - bn.running_mean * s)
    return out


class SqueezeExcite(nn.Module):
  """timm's SEModule(C, 0.25): keys ``fc1``/``fc2`` (1x1 convs with bias)."""

  def __init__(self, channels) -> None:
    super().__init__()
    rd = _divisible(channels * 0.25)
    self.fc1 = nn.Conv2d(channels, rd, 1, bias=True)
    self.act = nn.ReLU()
    self.fc2 = nn.Conv2d(rd, channels, 1, bias=True)

  def forward(self, x) -> torch.Tensor:
    s = x.mean((2, 3), keepdim=True)
    return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


class Residual(nn.Module):
  def __init__(self, m) -> None:
    super().__init__()
    self.m = m

  def forward(self, x) -> torch.Tensor:
    return x + self.m(x)


class RepVGGDW(nn.Module):
  """BN(dw3x3-BN(x) + dw1x1(x) + x); legacy: dw3x3-BN(x) + dw1x1-BN(x) + x."""

  def __init__(self, dim, legacy=False) -> None:
    super().__init__()
    self.legacy = legacy
    self.conv = Conv2d_BN(dim, dim, 3, 1, 1, groups=dim)
    if legacy:
      self.conv1 = Conv2d_BN(dim, dim, 1, 1, 0, groups=dim)
    else:
      self.conv1 = nn.Conv2d(dim, dim, 1, 1, 0, groups=dim, bias=True)
      self.bn = nn.BatchNorm2d(dim)

  def forward(self, x) -> torch.Tensor:
    y = self.conv(x) + self.conv1(x) + x
    return y if self.legacy else self.bn(y)

  @torch.no_grad()
  def fuse(self) -> nn.Conv2d:
    conv = self.conv.fuse()
    conv1 = self.conv1.fuse() if self.legacy else self.conv1
    w = conv.weight + nn.functional.pad(conv1.weight, [1, 1, 1, 1])
    w[:, :, 1, 1] += 1.0  # the identity branch
    b = conv.bias + conv1.bias
    if not self.legacy:
      s = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
      w = w * s[:, None, None, None]
      b = self.bn.bias + (b - self.bn.running_mean) * s
    conv.weight.copy_(w)
    conv.bias.copy_(b)
    return conv


def _ffn(dim):
  return Residual(nn.Sequential(Conv2d_BN(dim, 2 * dim), nn.GELU(),
                                Conv2d_BN(2 * dim, dim, bn_weight_init=0.0)))


class RepViTBlock(nn.Module):
  def __init__(self, cin, cout, stride, use_se, legacy) -> None:
    super().__init__()
    if stride == 2:
      self.token_mixer = nn.Sequential(
          Conv2d_BN(cin, cin, 3, 2, 1, groups=cin),
          SqueezeExcite(cin) if use_se else nn.Identity(),
          Conv2d_BN(cin, cout, 1))
    else:
      assert cin == cout
      self.token_mixer = nn.Sequential(RepVGGDW(cin, legacy),
                                       SqueezeExcite(cin) if use_se else nn.Identity())
    self.channel_mixer = _ffn(cout)

  def forward(self, x) -> torch.Tensor:
    return self.channel_mixer(self.token_mixer(x))


class BN_Linear(nn.Sequential):  # the official class name
  def __init__(self, cin, cout) -> None:
    super().__init__()
    self.add_module("bn", nn.BatchNorm1d(cin))
    self.add_module("l", nn.Linear(cin, cout))
    nn.init.trunc_normal_(self.l.weight, std=0.02)
    nn.init.zeros_(self.l.bias)

  @torch.no_grad()
  def fuse(self) -> nn.Linear:
    bn, l = self.bn, self.l
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    t = bn.bias - bn.running_mean * s
    out = nn.Linear(l.in_features, l.out_features, dtype=l.weight.dtype)
    out.weight.copy_(l.weight * s[None, :])
    out.bias.copy_(l.weight @ t + l.bias)
    return out


class Classfier(nn.Module):  # the official (misspelt) name
  def __init__(self, dim, num_classes, distillation) -> None:
    super().__init__()
    self.distillation = distillation
    self.classifier = BN_Linear(dim, num_classes)
    if distillation:
      self.classifier_dist = BN_Linear(dim, num_classes)

  def forward(self, x) -> torch.Tensor:
    if not self.distillation:
      return self.classifier(x)
    a, b = self.classifier(x), self.classifier_dist(x)
    return (a, b) if self.training else (a + b) / 2

  @torch.no_grad()
  def fuse(self) -> nn.Linear:
    head = self.classifier.fuse()
    if self.distillation:
      other = self.classifier_dist.fuse()
      head.weight.copy_((head.weight + other.weight) / 2)
      head.bias.copy_((head.bias + other.bias) / 2)
    return head


class RepViT(nn.Module):
  def __init__(self, name: str, num_classes: int = 1000, distillation: bool = False) -> None:
    super().__init__()
    table, legacy = ROW_TABLES[name], name in LEGACY
    width = table[0][0]
    layers = [nn.Sequential(Conv2d_BN(3, width // 2, 3, 2, 1), nn.GELU(),
                            Conv2d_BN(width // 2, width, 3, 2, 1))]
    for cout, codes in table:
      for code in codes:
        layers.append(RepViTBlock(width, cout, 2 if code == "D" else 1, code == "1", legacy))
        width = cout
    self.features = nn.ModuleList(layers)
    self.classifier = Classfier(width, num_classes, distillation)

  def forward_features(self, x) -> torch.Tensor:
    for f in self.features:
      x = f(x)
    return x

  def forward(self, x) -> torch.Tensor:
    return self.classifier(self.forward_features(x).mean((2, 3)))


def stage_output_indices(name: str) -> list[int]:
  """``features`` indices whose outputs are the stride-4/8/16/32 stage outputs.

  A stage ends just before the pre-block of the next downsample (the last '0' row before a 'D'),
  and the last stage ends with the network -- the official detection ``out_indices``.
  """
  out, idx = [], 0
  table = ROW_TABLES[name]
  for i, (_, codes) in enumerate(table):
    idx += len(codes)
    out.append(idx - 1 if i + 1 < len(table) else idx)
  return out


def _replace_fusable(module: nn.Module) -> None:
  for child_name, child in module.named_children():
    if hasattr(child, "fuse"):
      setattr(module, child_name, child.fuse())
    else:
      _replace_fusable(child)


def fuse_model(model: RepViT) -> RepViT:
  """A deep copy with every fusable submodule replaced (official ``replace_batchnorm``)."""
  fused = copy.deepcopy(model).eval()
  _replace_fusable(fused)
  return fused
