"""The ``pretrained_cfg`` of every registered model: eval preprocessing and the paper's numbers.

One table, one entry per registered name (a test checks that none is missing). Values come from
the official evaluation code and timm, as recorded in ``../shared/reference/<family>.md``; where
the two disagree the cfg holds the official value and ``timm_differences`` timm's, so that
``pretrained_cfg(name).timm()`` gives the transform timm would use (RepViT: official eval Resize
256 -> CenterCrop 224, i.e. crop_pct 0.875; timm ``crop_pct=0.95``).

``top1`` is the paper's ImageNet-1K top-1 of the released (or described) weights; ``latency_ms``
the paper's latency with the device it was measured on. ``None`` where nothing was published.
"""
from __future__ import annotations

from mobilevis_jax.models.registry import _PRETRAINED_CFGS, PretrainedCfg, list_models, model_info

_REPVIT = dict(crop_pct=0.875, interpolation="bicubic", distillation=True,
               timm_differences=(("crop_pct", 0.95),),
               source="repvit.md: official eval Resize 256 bicubic -> CenterCrop 224 (crop 0.875), "
                      "timm cfg crop_pct 0.95; top-1 300 epochs distilled; latency iPhone 12, "
                      "Core ML")
_IPHONE12 = "iPhone 12, Core ML, batch 1 @224"
_MOBILEVIG = dict(crop_pct=224 / 248, interpolation="bicubic", distillation=True,
                  source="mobilevig.md: official eval Resize 248 bicubic -> CenterCrop 224; "
                         "latency iPhone 13 Mini NPU (Ti/B confirmed by the abstract, S/M from the "
                         "paper table)")
_IPHONE13 = "iPhone 13 Mini NPU, Core ML"
_GHOSTNET_TIMM = dict(crop_pct=0.875, interpolation="bicubic",
                      source="timm ghostnet _cfg (crop 0.875, bicubic); top-1 from parameternet.md "
                             "(GhostNet paper x1.0 73.9, x1.3 75.7)")
_PARAMETERNET = dict(crop_pct=0.875, interpolation="bilinear",
                     source="parameternet.md: eval cfg in the official code (224, crop 0.875, "
                            "bilinear, ImageNet mean/std); no weights released; top-1 from the "
                            "repo figure")
_PARCNET = dict(input_size=(3, 256, 256), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                crop_pct=256 / 288, interpolation="bilinear", input_convention="parc_bgr",
                source="parc.md: cv2 BGR /255 without mean/std; validation resize 288 -> centre "
                       "crop 256 (bilinear, cvnets default); only ParC-Net-S has published numbers")
_PARC_CONVNETS = dict(crop_pct=0.875, interpolation="bicubic",
                      source="parc.md gives no eval transform for the ParC-ConvNets; they are "
                             "trained with the ConvNeXt code (README: 'ConvNeXt recipe'), whose "
                             "eval is "
                             "Resize 256 bicubic -> CenterCrop 224; latency: README, CPU")

_TABLE: dict[str, PretrainedCfg] = _PRETRAINED_CFGS  # the registry's table, filled here


def _add(name: str, top1: float | None = None, latency_ms=None, **kw) -> None:
  _TABLE[name] = PretrainedCfg(top1=top1, latency_ms=latency_ms, **kw)


for _name, _top1, _ms in (("repvit_m0_6", 74.1, 0.6), ("repvit_m0_9", 78.7, 0.9),
                          ("repvit_m1_0", 80.0, 1.0), ("repvit_m1_1", 80.7, 1.1),
                          ("repvit_m1_5", 82.3, 1.5), ("repvit_m2_3", 83.3, 2.3),
                          ("repvit_m1", 78.5, 0.9), ("repvit_m2", 80.6, 1.1),
                          ("repvit_m3", 81.4, 1.3)):
  _add(_name, _top1, (_ms, _IPHONE12), **_REPVIT)
for _name, _top1, _ms in (("mobilevig_ti", 75.7, 0.78), ("mobilevig_s", 78.2, 0.82),
                          ("mobilevig_m", 80.6, 1.02), ("mobilevig_b", 82.6, 2.30)):
  _add(_name, _top1, (_ms, _IPHONE13), **_MOBILEVIG)
_add("ghostnet_050", None, **_GHOSTNET_TIMM)
_add("ghostnet_100", 73.9, **_GHOSTNET_TIMM)
_add("ghostnet_130", 75.7, **_GHOSTNET_TIMM)
_add("ghostnet_300m", 76.3, **_PARAMETERNET)
_add("ghostnet_600m", 78.6, **_PARAMETERNET)
_add("parameternet_300m", 77.2, **_PARAMETERNET)
# 79.0 trained on ImageNet-1K only; 81.6 after ImageNet-22K pre-training (the headline number).
_add("parameternet_600m", 81.6, **_PARAMETERNET)
_add("parcnet_xs", None, **_PARCNET)
_add("parcnet_s", 78.6, (353.0, "RK3288 ARM CPU, ONNX -> MNN (98 ms on the DP chip)"), **_PARCNET)
_add("parcnet_h", None, **_PARCNET)
_add("parc_convnext_xt", 78.3, (48.0, "CPU (README)"), **_PARC_CONVNETS)
_add("parc_resnet50", 79.6, (98.0, "CPU (README)"), **_PARC_CONVNETS)
_add("parc_mobilenetv2", 71.1, (27.0, "CPU (README)"), **_PARC_CONVNETS)
# RegNetY (the DeiT teacher): DeiT's weights are evaluated by DeiT's code at crop 0.875 bicubic;
# timm serves them as `regnety_160.deit_in1k` with crop 0.95. pycls weights: timm's _cfgpyc.
_add("regnety_160", 82.9, crop_pct=0.875, interpolation="bicubic",
     timm_differences=(("crop_pct", 0.95),),
     source="DeiT (teacher RegNetY-16GF, 82.9% in DeiT's table) eval transform; timm "
            "regnety_160.deit_in1k uses crop 0.95")
_add("regnety_002", None, crop_pct=0.875, interpolation="bicubic",
     source="timm regnety_002.pycls_in1k (_cfgpyc)")
_add("regnety_004", None, crop_pct=0.875, interpolation="bicubic",
     source="timm regnety_004.pycls_in1k (_cfgpyc)")


def pretrained_cfg(name: str) -> PretrainedCfg | None:
  """The cfg of a registered model (``model_info(name).pretrained_cfg``); None for a model
  registered outside this package (e.g. a test's toy model), which has no recorded weights."""
  model_info(name)  # an unknown name gets the registry's error, with suggestions
  return _TABLE.get(name)


def package_models() -> list[str]:
  """The registered models defined by ``mobilevis_jax.models`` (not by a user or a test)."""
  return [n for n in list_models() if model_info(n).factory.__module__.startswith("mobilevis_jax.")]


def missing_cfgs() -> list[str]:
  """Models of this package without an entry here (the tests require none)."""
  return [n for n in package_models() if n not in _TABLE]
