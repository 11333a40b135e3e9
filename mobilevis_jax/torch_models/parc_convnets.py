"""PyTorch modules of the official ParC-ConvNets (hkzhang91/ParC-Net, `ParC_ConvNets/`).

Our own code, the parity reference of `mobilevis_jax.models.parc_convnets` and its export target:
it rebuilds the official
module trees (ParC-ConvNeXt-XT, ParC-ResNet50, ParC-MobileNetV2) so that `state_dict()` has the
official key names and shapes, and computes the same forward pass.

The official ParC operator is fixed to the 224 px feature sizes (its position embedding is
expanded to K x K). With `resample=True` this reference instead stretches the stored kernel and
position embedding to the actual feature length with `F.interpolate(..., align_corners=True)`,
the way ParC-Net (`gcc_ca_mf_block`) does; at 224 px the two modes are the same computation, which
the tests check.

``bake_(model, (H, W))`` resamples every operator's kernel and position embedding to the lengths
it sees at one input resolution and fixes it there (no interpolation left in the forward pass),
the deployable form ``mobilevis export --format torch`` writes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mobilevis_jax.torch_models.common import input_shapes

# --------------------------------------------------------------------------- ParC operator


def _stretch(t: torch.Tensor, length: int, axis: int) -> torch.Tensor:
  """Resize a 4-D tensor along spatial `axis` (2 or 3) with align_corners=True linear
  interpolation, leaving the other spatial axis untouched."""
  if t.shape[axis] == length:
    return t
  size = [t.shape[2], t.shape[3]]
  size[axis - 2] = length
  return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=True)


class ParCOperator(nn.Module):
  """One global circular convolution along H or W (official `ParC_operator`).

  Keys: `gcc_conv.weight` (C, C/groups, K, 1) or (C, C/groups, 1, K), `gcc_conv.bias` (C,),
  and `pe` (1, C, K, 1) / (1, C, 1, K) when `use_pe`.
  """

  def __init__(self, dim: int, direction: str, kernel_size: int, use_pe: bool = True,
               groups: int | None = None, resample: bool = False) -> None:
    super().__init__()
    if direction not in ("H", "W"):
      raise ValueError(f"direction must be 'H' or 'W', got {direction!r}")
    self.direction = direction
    self.dim = dim
    self.kernel_size = kernel_size
    self.use_pe = use_pe
    self.resample = resample
    self.baked = False
    shape = (kernel_size, 1) if direction == "H" else (1, kernel_size)
    self.gcc_conv = nn.Conv2d(dim, dim, shape, groups=dim if groups is None else groups)
    if use_pe:
      pe_shape = (1, dim) + shape
      self.pe = nn.Parameter(torch.zeros(pe_shape))
      nn.init.trunc_normal_(self.pe, std=0.02)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    axis = 2 if self.direction == "H" else 3
    n = x.shape[axis]
    weight, pe = self.gcc_conv.weight, (self.pe if self.use_pe else None)
    if n != self.kernel_size:
      if self.baked:
        raise ValueError(f"this ParC operator is baked for length {self.kernel_size} along "
                         f"{self.direction}, got {n} (the input resolution differs from the "
                         "export's)")
      if not self.resample:
        raise ValueError(
            f"official ParC operator is fixed to length {self.kernel_size}, got {n}")
      weight = _stretch(weight, n, axis)
      pe = _stretch(pe, n, axis) if pe is not None else None
    if pe is not None:
      x = x + pe  # broadcasts along the other spatial axis
    # Appending the first n-1 entries and a VALID conv gives y[i] = sum_k w[k] x[(i+k) % n].
    head = x[:, :, :-1, :] if axis == 2 else x[:, :, :, :-1]
    x = torch.cat((x, head), dim=axis)
    return F.conv2d(x, weight, self.gcc_conv.bias, groups=self.gcc_conv.groups)


  @torch.no_grad()
  def bake_(self, n: int) -> None:
    """Resample the kernel and PE to length ``n`` and fix the operator there, in place."""
    axis = 2 if self.direction == "H" else 3
    self.gcc_conv.weight = nn.Parameter(_stretch(self.gcc_conv.weight, n, axis).clone())
    self.gcc_conv.kernel_size = tuple(self.gcc_conv.weight.shape[2:])
    if self.use_pe:
      self.pe = nn.Parameter(_stretch(self.pe, n, axis).clone())
    self.kernel_size = n
    self.baked = True


def bake_(model: nn.Module, resolution: tuple[int, int]) -> nn.Module:
  """Bake every :class:`ParCOperator` of ``model`` for ``(H, W)`` inputs, in place; returns it.

  The length each operator sees is its input shape (`common.input_shapes`).
  """
  for op, shape in input_shapes(model, resolution, ParCOperator).items():
    op.bake_(shape[2 if op.direction == "H" else 3])
  return model


def _parc_pair(module: nn.Module, x: torch.Tensor, name_h: str, name_w: str) -> torch.Tensor:
  """Split channels in two halves: ParC-H on the first, ParC-W on the second."""
  x_h, x_w = torch.chunk(x, 2, dim=1)
  return torch.cat((getattr(module, name_h)(x_h), getattr(module, name_w)(x_w)), dim=1)


# --------------------------------------------------------------------------- ParC-ConvNeXt


class ChannelsFirstLayerNorm(nn.Module):
  """ConvNeXt LayerNorm over the channel axis of an NCHW tensor (keys `weight`, `bias`)."""

  def __init__(self, dim: int, eps: float = 1e-6) -> None:
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.bias = nn.Parameter(torch.zeros(dim))
    self.eps = eps

  def forward(self, x) -> torch.Tensor:
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    x = (x - mean) / torch.sqrt(var + self.eps)
    return self.weight[:, None, None] * x + self.bias[:, None, None]


class _ConvNeXtMlp(nn.Module):
  """The shared tail of both ConvNeXt blocks: LN, Linear 4x, GELU, Linear, layer scale."""

  def _init_mlp(self, dim: int, ls_init: float):
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.pwconv1 = nn.Linear(dim, 4 * dim)
    self.act = nn.GELU()
    self.pwconv2 = nn.Linear(4 * dim, dim)
    self.gamma = nn.Parameter(ls_init * torch.ones(dim))

  def _mlp(self, x):
    x = x.permute(0, 2, 3, 1)
    x = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(x))))
    return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(_ConvNeXtMlp):
  def __init__(self, dim: int, ls_init: float = 1e-6) -> None:
    super().__init__()
    self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
    self._init_mlp(dim, ls_init)

  def forward(self, x) -> torch.Tensor:
    return x + self._mlp(self.dwconv(x))


class ParCConvNeXtBlock(_ConvNeXtMlp):
  def __init__(self, dim: int, kernel_size: int, ls_init: float = 1e-6,
               resample: bool = False) -> None:
    super().__init__()
    self.gcc_H = ParCOperator(dim // 2, "H", kernel_size, True, resample=resample)
    self.gcc_W = ParCOperator(dim // 2, "W", kernel_size, True, resample=resample)
    self._init_mlp(dim, ls_init)

  def forward(self, x) -> torch.Tensor:
    return x + self._mlp(_parc_pair(self, x, "gcc_H", "gcc_W"))


class ParCConvNeXt(nn.Module):
  def __init__(self, depths=(3, 3, 9, 3), dims=(48, 96, 192, 384), parc_start=(3, 3, 6, 2),
               kernel_sizes=(56, 28, 14, 7), num_classes: int = 1000,
               resample: bool = False) -> None:
    super().__init__()
    self.downsample_layers = nn.ModuleList()
    self.downsample_layers.append(nn.Sequential(
        nn.Conv2d(3, dims[0], 4, stride=4), ChannelsFirstLayerNorm(dims[0])))
    for i in range(3):
      self.downsample_layers.append(nn.Sequential(
          ChannelsFirstLayerNorm(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2)))
    self.stages = nn.ModuleList()
    for depth, dim, start, k in zip(depths, dims, parc_start, kernel_sizes):
      self.stages.append(nn.Sequential(*[
          ConvNeXtBlock(dim) if j < start else ParCConvNeXtBlock(dim, k, resample=resample)
          for j in range(depth)]))
    self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
    self.head = nn.Linear(dims[-1], num_classes)
    for m in self.modules():
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)

  def forward(self, x) -> torch.Tensor:
    for down, stage in zip(self.downsample_layers, self.stages):
      x = stage(down(x))
    return self.head(self.norm(x.mean((-2, -1))))


# --------------------------------------------------------------------------- ParC-ResNet50


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int = 1,
               downsample: nn.Module | None = None) -> None:
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def _mid(self, out):
    return self.conv2(out)

  def forward(self, x) -> torch.Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self._mid(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class ParCBottleneck(Bottleneck):
  """Bottleneck whose 3x3 conv is a dense ParC-H / ParC-W pair (official `ParC_block`)."""

  def __init__(self, inplanes: int, planes: int, kernel_size: int, resample: bool = False) -> None:
    nn.Module.__init__(self)
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    # groups=1: the official ResNet ParC mixes all channels of its half (dense kernel).
    self.parc_H = ParCOperator(planes // 2, "H", kernel_size, True, groups=1, resample=resample)
    self.parc_W = ParCOperator(planes // 2, "W", kernel_size, True, groups=1, resample=resample)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = None

  def _mid(self, out):
    return _parc_pair(self, out, "parc_H", "parc_W")


class ParCResNet(nn.Module):
  def __init__(self, layers=(3, 4, 6, 3), parc_start=(3, 4, 3, 2), kernel_sizes=(56, 28, 14, 7),
               num_classes: int = 1000, resample: bool = False) -> None:
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    inplanes = 64
    for i, (n, start, k) in enumerate(zip(layers, parc_start, kernel_sizes)):
      planes, stride = 64 * 2 ** i, (1 if i == 0 else 2)
      downsample = nn.Sequential(
          nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
          nn.BatchNorm2d(planes * 4))
      blocks = [Bottleneck(inplanes, planes, stride, downsample)]
      inplanes = planes * 4
      for j in range(1, n):
        blocks.append(Bottleneck(inplanes, planes) if j < start
                      else ParCBottleneck(inplanes, planes, k, resample=resample))
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.fc = nn.Linear(2048, num_classes)

  def forward(self, x) -> torch.Tensor:
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for i in range(1, 5):
      x = getattr(self, f"layer{i}")(x)
    return self.fc(x.mean((-2, -1)))


# --------------------------------------------------------------------------- ParC-MobileNetV2


class ConvBNReLU6(nn.Sequential):
  def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1,
               groups: int = 1) -> None:
    super().__init__(
        nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(cout), nn.ReLU6())


class InvertedResidual(nn.Module):
  def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
    super().__init__()
    hidden = int(round(inp * expand_ratio))
    self.use_res_connect = stride == 1 and inp == oup
    layers: list[nn.Module] = []
    if expand_ratio != 1:
      layers.append(ConvBNReLU6(inp, hidden, 1))
    layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
               nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
    self.conv = nn.Sequential(*layers)

  def forward(self, x) -> torch.Tensor:
    return x + self.conv(x) if self.use_res_connect else self.conv(x)


class ParCInvertedResidual(nn.Module):
  """Inverted residual whose depthwise 3x3 is a ParC-H / ParC-W pair (official
  `InvertedResidual_parc`)."""

  def __init__(self, inp: int, oup: int, expand_ratio: int, kernel_size: int, use_pe: bool,
               resample: bool = False) -> None:
    super().__init__()
    hidden = int(round(inp * expand_ratio))
    self.use_res_connect = inp == oup
    self.pw_expand = ConvBNReLU6(inp, hidden, 1)
    self.gcc_H = ParCOperator(hidden // 2, "H", kernel_size, use_pe, resample=resample)
    self.gcc_W = ParCOperator(hidden // 2, "W", kernel_size, use_pe, resample=resample)
    self.bn = nn.BatchNorm2d(hidden)
    self.act = nn.ReLU6()
    self.pw_linear = nn.Sequential(nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup))

  def forward(self, x) -> torch.Tensor:
    out = _parc_pair(self, self.pw_expand(x), "gcc_H", "gcc_W")
    out = self.pw_linear(self.act(self.bn(out)))
    return x + out if self.use_res_connect else out


# t, c, n, s, number of plain blocks before ParC, ParC kernel (feature size at 224 px)
MOBILENETV2_SETTING = (
    (1, 16, 1, 1, 1, 112),
    (6, 24, 2, 2, 2, 56),
    (6, 32, 3, 2, 3, 28),
    (6, 64, 4, 2, 2, 14),
    (6, 96, 3, 1, 2, 14),
    (6, 160, 3, 2, 2, 7),
    (6, 320, 1, 1, 1, 7),
)


class ParCMobileNetV2(nn.Module):
  def __init__(self, num_classes: int = 1000, resample: bool = False) -> None:
    super().__init__()
    features: list[nn.Module] = [ConvBNReLU6(3, 32, 3, 2)]
    cin = 32
    for t, c, n, s, plain, k in MOBILENETV2_SETTING:
      for i in range(n):
        if i < plain:
          features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
        else:
          features.append(ParCInvertedResidual(cin, c, t, k, use_pe=(i == plain),
                                               resample=resample))
        cin = c
    features.append(ConvBNReLU6(cin, 1280, 1))
    self.features = nn.Sequential(*features)
    self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

  def forward(self, x) -> torch.Tensor:
    return self.classifier(self.features(x).mean((-2, -1)))


def parc_convnext_xt(**kw) -> ParCConvNeXt:
  return ParCConvNeXt(**kw)


def parc_resnet50(**kw) -> ParCResNet:
  return ParCResNet(**kw)


def parc_mobilenetv2(**kw) -> ParCMobileNetV2:
  return ParCMobileNetV2(**kw)


BUILDERS = {
    "parc_convnext_xt": parc_convnext_xt,
    "parc_resnet50": parc_resnet50,
    "parc_mobilenetv2": parc_mobilenetv2,
}
