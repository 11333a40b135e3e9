"""PyTorch ParameterNet / GhostNet with the official module tree and key names.

Our own code (not taken from the official repository, which needs timm 0.4.x): it
reproduces the structure of ``parameternet_pytorch/cv/parameternet.py`` so that ``state_dict()``
has the official keys and shapes -- ``conv_stem``/``bn1``, ``blocks.<group>.<row>`` Ghost
bottlenecks (``ghost1``/``ghost2`` with ``primary_conv.{0,1}`` and ``cheap_operation.{0,1}``,
``conv_dw``/``bn_dw``, ``se.conv_reduce``/``se.conv_expand``, ``shortcut.{0,1,2,3}``), the final
``blocks.9.0.conv``/``bn1``, ``conv_head`` and ``classifier``. Every dynamic position holds
``routing`` (Linear Cin -> M) and ``cond_conv.weight`` ``[M, Cout*Cin/g*kh*kw]``.

The dynamic convolution is written the way CondConv computes it (per-sample mixed kernels run as
one grouped convolution over the folded batch), independently of the JAX port. With
``dynamic=False`` the same tree is built with plain ``nn.Conv2d`` at the dynamic positions, which is
the static GhostNet twin and has timm's GhostNet key names.

The layer tables are written out here again (not imported from the JAX port) so that the parity
tests also check the JAX tables.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PARAMETERNET_ROWS = [
    [[3, 16, 16, 0, 1]],
    [[3, 48, 24, 0, 2]],
    [[3, 72, 24, 0, 1]],
    [[5, 72, 40, 0.25, 2]],
    [[3, 120, 40, 0.25, 1], [3, 120, 40, 0.25, 1]],
    [[3, 240, 80, 0, 2]],
    [[3, 200, 80, 0, 1], [3, 200, 80, 0, 1], [3, 200, 80, 0, 1], [3, 480, 112, 0.25, 1],
     [3, 672, 112, 0.25, 1], [3, 672, 112, 0.25, 1]],
    [[5, 672, 160, 0.25, 2]],
    [[3, 960, 160, 0.25, 1]] * 5,
]

# GhostNet's own table (timm ``ghostnet_*``), used by the derived 300M models.
GHOSTNET_ROWS = [
    [[3, 16, 16, 0, 1]],
    [[3, 48, 24, 0, 2]],
    [[3, 72, 24, 0, 1]],
    [[5, 72, 40, 0.25, 2]],
    [[5, 120, 40, 0.25, 1]],
    [[3, 240, 80, 0, 2]],
    [[3, 200, 80, 0, 1], [3, 184, 80, 0, 1], [3, 184, 80, 0, 1], [3, 480, 112, 0.25, 1],
     [3, 672, 112, 0.25, 1]],
    [[5, 672, 160, 0.25, 2]],
    [[5, 960, 160, 0, 1], [5, 960, 160, 0.25, 1], [5, 960, 160, 0, 1], [5, 960, 160, 0.25, 1]],
]


def divisible(v: float, divisor: int = 4) -> int:
  out = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return out + divisor if out < 0.9 * v else out


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
  return F.relu6(x + 3.0) / 6.0


class CondConv2d(nn.Module):
  """Expert bank ``weight`` [M, P]; ``forward(x, r)`` convolves sample b with ``r[b] @ weight``."""

  def __init__(self, cin, cout, k, stride, padding, groups, num_experts) -> None:
    super().__init__()
    self.cin, self.cout, self.k = cin, cout, k
    self.stride, self.padding, self.groups = stride, padding, groups
    self.kernel_shape = (cout, cin // groups, k, k)
    self.weight = nn.Parameter(torch.empty(num_experts, math.prod(self.kernel_shape)))
    bound = 1.0 / math.sqrt(math.prod(self.kernel_shape[1:]))
    nn.init.uniform_(self.weight, -bound, bound)

  def forward(self, x, r) -> torch.Tensor:
    b, c, h, w = x.shape
    if b == 1:
      # One sample (batch-1 deployment): a plain convolution with its mixed kernel. This is also
      # the form Core ML converts: in the folded form below the batch size enters ``groups``,
      # which a traced graph records as shape arithmetic that coremltools cannot convert.
      return F.conv2d(x, (r @ self.weight).view(self.kernel_shape), None, self.stride,
                      self.padding, groups=self.groups)
    kernels = (r @ self.weight).view(b * self.cout, self.cin // self.groups, self.k, self.k)
    y = F.conv2d(x.reshape(1, b * c, h, w), kernels, None, self.stride, self.padding,
                 groups=self.groups * b)
    return y.view(b, self.cout, y.shape[-2], y.shape[-1])


class DynamicConv(nn.Module):
  """routing: GAP -> Linear -> sigmoid, as the official code (no softmax)."""

  def __init__(self, cin, cout, k=1, stride=1, padding=0, groups=1, num_experts=4) -> None:
    super().__init__()
    self.routing = nn.Linear(cin, num_experts)
    self.cond_conv = CondConv2d(cin, cout, k, stride, padding, groups, num_experts)

  def forward(self, x) -> torch.Tensor:
    r = torch.sigmoid(self.routing(F.adaptive_avg_pool2d(x, 1).flatten(1)))
    return self.cond_conv(x, r)


def make_conv(dynamic: bool, num_experts: int, cin: int, cout: int, k: int = 1, stride: int = 1,
              padding: int = 0, groups: int = 1) -> nn.Module:
  if dynamic:
    return DynamicConv(cin, cout, k, stride, padding, groups, num_experts)
  return nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False)


class SqueezeExcite(nn.Module):
  def __init__(self, chs, rd, act_layer) -> None:
    super().__init__()
    self.conv_reduce = nn.Conv2d(chs, rd, 1, bias=True)
    self.act1 = act_layer()
    self.conv_expand = nn.Conv2d(rd, chs, 1, bias=True)

  def forward(self, x) -> torch.Tensor:
    s = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
    return x * hard_sigmoid(s)


class GhostModule(nn.Module):
  def __init__(self, cin, cout, act_layer, dynamic, num_experts) -> None:
    super().__init__()
    self.cout = cout
    init = math.ceil(cout / 2)
    act = (lambda: act_layer()) if act_layer is not None else nn.Sequential
    self.primary_conv = nn.Sequential(make_conv(dynamic, num_experts, cin, init, 1, 1, 0),
                                      nn.BatchNorm2d(init), act())
    self.cheap_operation = nn.Sequential(
        make_conv(dynamic, num_experts, init, init, 3, 1, 1, groups=init), nn.BatchNorm2d(init),
        act())

  def forward(self, x) -> torch.Tensor:
    a = self.primary_conv(x)
    return torch.cat([a, self.cheap_operation(a)], 1)[:, :self.cout]


class GhostBottleneck(nn.Module):
  def __init__(self, cin, mid, cout, k, stride, se_ratio, act_layer, dynamic, num_experts) -> None:
    super().__init__()
    self.ghost1 = GhostModule(cin, mid, act_layer, dynamic, num_experts)
    if stride > 1:
      self.conv_dw = nn.Conv2d(mid, mid, k, stride, (k - 1) // 2, groups=mid, bias=False)
      self.bn_dw = nn.BatchNorm2d(mid)
    else:
      self.conv_dw = self.bn_dw = None
    self.se = SqueezeExcite(mid, divisible(mid * se_ratio, 4), act_layer) if se_ratio else None
    self.ghost2 = GhostModule(mid, cout, None, dynamic, num_experts)
    if cin == cout and stride == 1:
      self.shortcut = nn.Sequential()
    else:
      self.shortcut = nn.Sequential(
          make_conv(dynamic, num_experts, cin, cin, k, stride, (k - 1) // 2, groups=cin),
          nn.BatchNorm2d(cin), make_conv(dynamic, num_experts, cin, cout, 1, 1, 0),
          nn.BatchNorm2d(cout))

  def forward(self, x) -> torch.Tensor:
    y = self.ghost1(x)
    if self.conv_dw is not None:
      y = self.bn_dw(self.conv_dw(y))
    if self.se is not None:
      y = self.se(y)
    return self.shortcut(x) + self.ghost2(y)


class ConvBnAct(nn.Module):
  def __init__(self, cin, cout, act_layer, dynamic, num_experts) -> None:
    super().__init__()
    self.conv = make_conv(dynamic, num_experts, cin, cout, 1, 1, 0)
    self.bn1 = nn.BatchNorm2d(cout)
    self.act1 = act_layer()

  def forward(self, x) -> torch.Tensor:
    return self.act1(self.bn1(self.conv(x)))


class ParameterNet(nn.Module):
  def __init__(self, rows=PARAMETERNET_ROWS, width=1.9, act_layer=nn.Hardswish, dynamic=True,
               num_experts=4, num_classes=1000) -> None:
    super().__init__()
    stem = divisible(16 * width)
    self.conv_stem = make_conv(dynamic, num_experts, 3, stem, 3, 2, 1)
    self.bn1 = nn.BatchNorm2d(stem)
    self.act1 = act_layer()
    prev = stem
    groups = []
    for group in rows:
      layers = []
      for k, exp, c, se, s in group:
        out, mid = divisible(c * width), divisible(exp * width)
        layers.append(GhostBottleneck(prev, mid, out, k, s, se, act_layer, dynamic, num_experts))
        prev = out
      groups.append(nn.Sequential(*layers))
    last = divisible(rows[-1][-1][1] * width)
    groups.append(nn.Sequential(ConvBnAct(prev, last, act_layer, dynamic, num_experts)))
    self.blocks = nn.Sequential(*groups)
    self.global_pool = nn.AdaptiveAvgPool2d(1)
    self.conv_head = nn.Conv2d(last, 1280, 1, 1, 0, bias=True)
    self.act2 = act_layer()
    self.classifier = nn.Linear(1280, num_classes)

  def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of every ``blocks.<i>`` (for the features_only check)."""
    x = self.act1(self.bn1(self.conv_stem(x)))
    outs = []
    for stage in self.blocks:
      x = stage(x)
      outs.append(x)
    return outs

  def forward(self, x) -> torch.Tensor:
    x = self.forward_stages(x)[-1]
    x = self.act2(self.conv_head(self.global_pool(x)))
    return self.classifier(x.flatten(1))


def parameternet_600m(num_experts: int = 4, num_classes: int = 1000) -> ParameterNet:
  return ParameterNet(width=1.9, dynamic=True, num_experts=num_experts, num_classes=num_classes)


def ghostnet_600m(num_classes: int = 1000) -> ParameterNet:
  return ParameterNet(width=1.9, dynamic=False, num_classes=num_classes)


def parameternet_300m(num_experts: int = 4, num_classes: int = 1000) -> ParameterNet:
  """The derived 300M model (see the JAX docstring): GhostNet's table at width 1.45, Hardswish."""
  return ParameterNet(GHOSTNET_ROWS, width=1.45, dynamic=True, num_experts=num_experts,
                      num_classes=num_classes)


def ghostnet_300m(num_classes: int = 1000) -> ParameterNet:
  return ParameterNet(GHOSTNET_ROWS, width=1.45, dynamic=False, num_classes=num_classes)
