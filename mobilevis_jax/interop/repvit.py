"""PyTorch key layouts of RepViT: the official THU-MIG/RepViT one and timm's.

**official** (the released ``.pth`` files): ``features.0`` is the stem (``.0`` and ``.2`` are its
Conv-BNs), then one ``features.N`` per config row, i.e. per block: the stage blocks, the
pre-block of the next downsample, the stride-2 row (``token_mixer.0`` depthwise Conv-BN,
``token_mixer.2`` 1x1 Conv-BN, ``channel_mixer.m.0/m.2`` FFN), and so on. Conv-BNs are
``.c``/``.bn``; the head is ``classifier.classifier`` (+ ``classifier.classifier_dist``) with
``.bn``/``.l``. The fused form (``create_model(name, fused=True)``, what ``replace_batchnorm``
saves) has the same prefixes with plain ``.weight``/``.bias`` and a single ``classifier``.

**timm** (``timm.models.repvit``): ``stem.conv1/conv2``, ``stages.S.downsample.{pre_block,
spatial_downsample, channel_downsample, ffn}``, ``stages.S.blocks.j``, ``head.head(_dist)``; it is
the Flax module tree almost name for name. Only unfused models have a timm layout.
"""
from __future__ import annotations

from mobilevis_jax.interop.keymap import Entry, bn, conv, conv_bn, dense, register_torch_layout
from mobilevis_jax.models.repvit import FusedRepViT, RepViT


def _conv_norm(prefix: str, path: tuple[str, ...], fused: bool) -> list[Entry]:
  """A Conv-BN (``.c`` + ``.bn``), or a conv with bias once fused."""
  return conv(prefix, path, bias=True) if fused else conv_bn(prefix, path)


def _block(token_mixer: str, se: str | None, mlp: tuple[str, str], path: tuple[str, ...],
           model: RepViT) -> list[Entry]:
  """A stride-1 block, given the torch prefixes of its token mixer, SE and two FFN convs."""
  fused = isinstance(model, FusedRepViT)
  if fused:
    entries = conv(token_mixer, path + ("token_mixer",), bias=True)
  else:
    tm = path + ("token_mixer",)
    entries = conv_bn(f"{token_mixer}.conv", tm + ("conv",))
    if model.legacy:
      entries += conv_bn(f"{token_mixer}.conv1", tm + ("conv1",))
    else:
      entries += (conv(f"{token_mixer}.conv1", tm + ("conv1",), bias=True)
                  + bn(f"{token_mixer}.bn", tm + ("bn",)))
  if se is not None:
    entries += conv(f"{se}.fc1", path + ("se", "reduce"), bias=True)
    entries += conv(f"{se}.fc2", path + ("se", "expand"), bias=True)
  entries += _conv_norm(mlp[0], path + ("channel_mixer", "conv1"), fused)
  entries += _conv_norm(mlp[1], path + ("channel_mixer", "conv2"), fused)
  return entries


def _head(prefix: str, dist_prefix: str, model: RepViT) -> list[Entry]:
  if model.features_only or model.num_classes == 0:
    return []
  if isinstance(model, FusedRepViT):
    return dense(prefix, ("head",))
  entries = bn(f"{prefix}.bn", ("head", "bn")) + dense(f"{prefix}.l", ("head", "linear"))
  if model.distillation:
    entries += (bn(f"{dist_prefix}.bn", ("head_dist", "bn"))
                + dense(f"{dist_prefix}.l", ("head_dist", "linear")))
  return entries


@register_torch_layout("official")
def official_layout(model_name: str, model: RepViT, variables: dict = None) -> list[Entry]:
  fused = isinstance(model, FusedRepViT)
  entries = (_conv_norm("features.0.0", ("stem_conv1",), fused)
             + _conv_norm("features.0.2", ("stem_conv2",), fused))

  def block(row: int, path: tuple[str, ...], use_se: bool) -> list[Entry]:
    p = f"features.{row}"
    return _block(f"{p}.token_mixer.0", f"{p}.token_mixer.1" if use_se else None,
                  (f"{p}.channel_mixer.m.0", f"{p}.channel_mixer.m.2"), path, model)

  row = 1
  for s, depth in enumerate(model.depths):
    stage = f"stages_{s}"
    if s > 0:
      down = (stage, "downsample")
      entries += block(row, down + ("pre_block",), use_se=False)
      p = f"features.{row + 1}"
      entries += _conv_norm(f"{p}.token_mixer.0", down + ("spatial_downsample",), fused)
      entries += _conv_norm(f"{p}.token_mixer.2", down + ("channel_downsample",), fused)
      entries += _conv_norm(f"{p}.channel_mixer.m.0", down + ("ffn", "conv1"), fused)
      entries += _conv_norm(f"{p}.channel_mixer.m.2", down + ("ffn", "conv2"), fused)
      row += 2
    for j in range(depth):
      entries += block(row, (stage, f"blocks_{j}"), use_se=j % 2 == 0)
      row += 1
  if fused:
    return entries + _head("classifier", "", model)
  return entries + _head("classifier.classifier", "classifier.classifier_dist", model)


@register_torch_layout("timm")
def timm_layout(model_name: str, model: RepViT, variables: dict = None) -> list[Entry]:
  if isinstance(model, FusedRepViT):
    raise ValueError(f"{model_name}: timm has no fused RepViT layout; export the unfused model "
                     "or use layout='official'")

  def block(prefix: str, path: tuple[str, ...], use_se: bool) -> list[Entry]:
    return _block(f"{prefix}.token_mixer", f"{prefix}.se" if use_se else None,
                  (f"{prefix}.channel_mixer.conv1", f"{prefix}.channel_mixer.conv2"), path, model)

  entries = conv_bn("stem.conv1", ("stem_conv1",)) + conv_bn("stem.conv2", ("stem_conv2",))
  for s, depth in enumerate(model.depths):
    if s > 0:
      p, down = f"stages.{s}.downsample", (f"stages_{s}", "downsample")
      entries += block(f"{p}.pre_block", down + ("pre_block",), use_se=False)
      entries += conv_bn(f"{p}.spatial_downsample", down + ("spatial_downsample",))
      entries += conv_bn(f"{p}.channel_downsample", down + ("channel_downsample",))
      entries += conv_bn(f"{p}.ffn.conv1", down + ("ffn", "conv1"))
      entries += conv_bn(f"{p}.ffn.conv2", down + ("ffn", "conv2"))
    for j in range(depth):
      entries += block(f"stages.{s}.blocks.{j}", (f"stages_{s}", f"blocks_{j}"), use_se=j % 2 == 0)
  return entries + _head("head.head", "head.head_dist", model)
