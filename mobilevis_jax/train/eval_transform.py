"""The eval transform of a model's released weights (its ``pretrained_cfg``) applied to a data
recipe: what ``mobilevis eval`` of imported weights uses.

It lives with the trainer because it joins the two sides the lower layers keep apart: the model
registry (``pretrained_cfg``) and the data config.
"""
from __future__ import annotations

import logging
from typing import Any

import ml_collections

from mobilevis_jax.models.registry import model_info

log = logging.getLogger(__name__)


def eval_data_overrides(name: str, data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The eval-transform fields of ``data_cfg`` that ``name``'s pretrained_cfg sets.

  A field the recipe left at the data default (``data.config.default_data_config``) takes the
  model's value; a field the recipe changed is the recipe's. The pipeline knows the ImageNet
  mean/std and ParC-Net's BGR convention; another mean/std is an error, not a silent fallback.
  """
  from mobilevis_jax.data.config import default_data_config
  cfg = model_info(name).pretrained_cfg
  if cfg is None:  # a model registered outside the package: the recipe decides
    return {}
  if cfg.input_convention == "parc_bgr":
    normalization = "parc_bgr"
  elif (tuple(cfg.mean), tuple(cfg.std)) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)):
    normalization = "imagenet"
  else:
    raise ValueError(f"{name}: pretrained_cfg mean/std {cfg.mean}/{cfg.std} is not one the data "
                     "pipeline implements (imagenet, parc_bgr)")
  values = {"crop_pct": float(cfg.crop_pct), "eval_interpolation": cfg.interpolation,
            "normalization": normalization}
  defaults = default_data_config()
  return {k: v for k, v in values.items() if data_cfg[k] == defaults[k] and data_cfg[k] != v}


def eval_data_config(name: str, data_cfg: ml_collections.ConfigDict
                     ) -> ml_collections.ConfigDict:
  """A copy of ``data_cfg`` whose eval transform follows ``name``'s pretrained_cfg where the
  recipe does not override it (see :func:`eval_data_overrides`)."""
  overrides = eval_data_overrides(name, data_cfg)
  out = data_cfg.copy_and_resolve_references()
  for k, v in overrides.items():
    out[k] = v
  if overrides:
    log.info("%s: eval transform from its pretrained_cfg: %s", name, overrides)
  return out
