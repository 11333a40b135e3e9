"""Helpers shared by the model and layer tests (one home each; torch is imported lazily).

* :func:`abstract_variables`: the shapes of a model's variables without computing anything
  (``mobilevis_jax.models.registry.abstract_variables``, plus non-square inputs).
* :func:`randomize_bn_`: non-trivial BatchNorm statistics and affine parameters in a PyTorch
  reference model, so eval-mode parity exercises every BN tensor (a fresh BN is the identity in
  eval mode and would hide a scale/bias or mean/var mix-up).
* :func:`randomize_repvit_`, :func:`randomize_mobilevig_`: the same for the packaged PyTorch
  modules of those families (``mobilevis_jax.torch_models``), with every weight random too.
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


def randomize_mobilevig_(model, seed: int = 0):
  """:func:`randomize_bn_`, then layer scales away from 1e-5 so that the MBConv branch of a
  ``torch_models.mobilevig`` model contributes visibly to the logits; returns the model."""
  import torch

  from mobilevis_jax.torch_models.mobilevig import RefInvertedResidual

  g = torch.Generator().manual_seed(seed)
  randomize_bn_(model, g)
  with torch.no_grad():
    for mod in model.modules():
      if isinstance(mod, RefInvertedResidual):
        mod.layer_scale_2.copy_(0.5 * torch.randn(mod.layer_scale_2.shape, generator=g))
  return model


def randomize_repvit_(model, seed: int = 0, resolution: int = 64):
  """Random weights *and* non-trivial BN statistics in a ``torch_models.repvit`` model (or timm's
  RepViT), so that parity tests exercise every tensor; returns the model.

  A fresh model has zero BN gammas in the residual branches and identity running statistics; a
  port that mixed those tensors up would still match, so all of them are replaced. Weights are
  fan-in scaled and gammas random; the running statistics are then set to the
  real batch statistics of a random batch (one train-mode pass with momentum 1), which keeps
  activations O(1) in eval mode, as in a trained network, instead of growing block after block.
  """
  import torch
  from torch import nn

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim > 1:
        p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
      elif name.endswith("bn.weight"):
        # Gammas the official init zeroes (last BN of each residual branch) stay small, as in a
        # trained network: a deep stack of full-size random residual branches is chaotic and
        # turns float32 rounding into 1e-3 logit noise.
        low, high = (0.05, 0.3) if bool((p == 0).all()) else (0.5, 1.5)
        p.copy_(low + (high - low) * torch.rand(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    saved = [m.momentum for m in bns]
    for m in bns:
      m.momentum = 1.0
    was_training = model.training
    model.train()
    model(torch.randn(8, 3, resolution, resolution, generator=g))
    model.train(was_training)
    for m, momentum in zip(bns, saved):
      m.momentum = momentum
      m.num_batches_tracked.zero_()
      if isinstance(m, nn.BatchNorm1d):
        # Pooled features of noise images barely differ from image to image, so their batch
        # variance is tiny and the head would amplify float32 rounding ~1e3x; normalising by the
        # second moment instead keeps the logits well conditioned.
        m.running_var.add_(m.running_mean ** 2)
  return model
