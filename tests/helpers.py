"""Helpers shared by the model and layer tests (one home each; torch is imported lazily).

* :func:`abstract_variables`: the shapes of a model's variables without computing anything
  (``mobilevis_jax.models.registry.abstract_variables``, plus non-square inputs).
* :func:`randomize_bn_`: non-trivial BatchNorm statistics and affine parameters in a PyTorch
  reference model, so eval-mode parity exercises every BN tensor (a fresh BN is the identity in
  eval mode and would hide a scale/bias or mean/var mix-up).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import mobilevis_jax
from mobilevis_jax.models import registry


def abstract_variables(name_or_model: str | nn.Module, resolution: int | tuple[int, int] = 224,
                       **kw) -> Any:
  """``jax.ShapeDtypeStruct`` tree of ``init`` at ``resolution`` (an int, or ``(height, width)``).

  A name is built with ``create_model(name, **kw)``; a module is used as it is.
  """
  if isinstance(name_or_model, str):
    model = mobilevis_jax.create_model(name_or_model, **kw)
  elif kw:
    raise TypeError(f"keyword arguments {sorted(kw)} need a model name, not a module")
  else:
    model = name_or_model
  if isinstance(resolution, int):
    return registry.abstract_variables(model, resolution)
  x = jax.ShapeDtypeStruct((1, *resolution, 3), jnp.float32)
  return jax.eval_shape(lambda rng, x: model.init(rng, x, train=False), jax.random.PRNGKey(0), x)


def randomize_bn_(model, seed: Any = 0):
  """Random BN weights (1 + 0.2 N), biases (0.1 N), running means (0.1 N) and variances
  (0.5 + U[0, 1)) in every ``BatchNorm2d`` of the torch ``model``, in module order; returns it.
  ``num_batches_tracked`` stays 0, which is what our export writes (round trips compare it).

  ``seed`` is an int or a ``torch.Generator`` (to continue a stream the caller also draws from).
  """
  import torch

  g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(1.0 + 0.2 * torch.randn(c, generator=g))
        m.bias.copy_(0.1 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + torch.rand(c, generator=g))
  return model


def assert_same_tree(a, b) -> None:
  """Same paths, bitwise-equal leaves (round trips through files must lose nothing)."""
  import numpy as np

  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, u), (_, v) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=jax.tree_util.keystr(path))
