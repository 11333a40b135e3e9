"""Parameter and MAC counting by abstract tracing.

``profile`` traces the model once with ``jax.eval_shape`` (nothing is computed or allocated) and
counts multiply-accumulates from the shapes seen at trace time:

* every ``nn.Conv`` call: output elements x (kernel height x width x input channels / groups);
* every ``nn.Dense`` call: output elements x input features;
* anything a custom op reports with :func:`add_macs` (FFT convolutions, dynamic-kernel mixing,
  graph aggregation...), under a tag of its choosing.

That is the convention of fvcore and of most papers' tables (conv and matmul MACs; normalisation,
activations and pooling free). Families whose official numbers count differently register a hook
with :func:`mobilevis_jax.models.registry.register_profile_hook` that adds the official-profiler
figures next to the true ones.
Tags starting with ``_`` are side counts for such hooks (e.g. what an official profiler counts
that is not a MAC): they are reported in ``side_counts`` and never added to ``macs``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobilevis_jax.layers.macs import add_macs, counting
from mobilevis_jax.models.registry import abstract_variables, create_model, model_info, profile_hook

__all__ = ["add_macs", "count_params", "counting", "profile"]


def count_params(variables: Mapping) -> int:
  """Number of trainable parameters (the ``params`` collection; BN running stats excluded)."""
  params = nn.unbox(variables).get("params", {})
  return int(sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def profile(name_or_model: str | nn.Module, resolution: int | None = None, *,
            variables: Mapping | None = None, batch: int = 1, family: str | None = None,
            **model_kwargs: Any) -> dict:
  """``{'params': int, 'macs': int, 'macs_by_tag': {...}}`` for one image at ``resolution``.

  ``name_or_model`` is a registered name (built with ``model_kwargs``) or a module; for a module
  pass ``resolution`` (and ``variables`` if it should not be initialised abstractly, e.g. a fused
  model). ``macs`` is per image.
  """
  if isinstance(name_or_model, str):
    info = model_info(name_or_model)
    model = create_model(name_or_model, **model_kwargs)
    resolution = resolution or info.default_resolution
    family = family or info.family
    name = name_or_model
  else:
    if resolution is None:
      raise ValueError("profile(module) needs an explicit resolution")
    if model_kwargs:
      raise ValueError("model_kwargs are only used when a model name is given")
    model, name = name_or_model, type(name_or_model).__name__
  x = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32)
  if variables is None:
    variables = abstract_variables(model, resolution, batch)
  with counting() as counts:
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  by_tag = {k: v // batch for k, v in sorted(counts.items()) if not k.startswith("_")}
  side = {k: v // batch for k, v in sorted(counts.items()) if k.startswith("_")}
  result = {"params": count_params(variables), "macs": sum(by_tag.values()), "macs_by_tag": by_tag,
            "resolution": resolution}
  if side:
    result["side_counts"] = side
  hook = profile_hook(family)
  if hook is not None:
    result.update(hook(name, {**by_tag, **side}, result["params"], resolution=resolution))
  return result
