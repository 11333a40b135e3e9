"""Optimiser, learning-rate schedule and weight-decay mask of the paper recipes, built with optax.

The recipes are timm/cvnets AdamW runs. What differs between them is captured by config fields:
the lr scaling rule (peak = base_lr * global_batch / lr_scaling_batch), linear warm-up then cosine to
`min_lr` evaluated per step, which parameters are decayed, and gradient clipping (global norm, or
timm's adaptive gradient clipping used by RepViT).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax


def peak_learning_rate(opt_cfg: ml_collections.ConfigDict, global_batch_size: int) -> float:
  """base_lr scaled linearly with the global batch (each recipe's rule), or as is."""
  if opt_cfg.lr_scaling_batch and opt_cfg.lr_scaling_batch > 0:
    return opt_cfg.base_lr * global_batch_size / opt_cfg.lr_scaling_batch
  return opt_cfg.base_lr


def learning_rate_schedule(opt_cfg: ml_collections.ConfigDict, *, global_batch_size: int,
                           steps_per_epoch: int, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """Per-step schedule: linear warm-up from warmup_lr, then cosine (or constant) down to min_lr.

  The PyTorch recipes step their schedulers once per epoch; evaluating the same curve per step is
  the smooth version of it (it differs by at most one epoch's lr change at any point).
  """
  peak = peak_learning_rate(opt_cfg, global_batch_size)
  if opt_cfg.warmup_steps is not None and opt_cfg.warmup_steps > 0:
    warmup = int(opt_cfg.warmup_steps)
  else:
    warmup = int(round(opt_cfg.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  if opt_cfg.schedule == 'cosine':
    main = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt_cfg.min_lr / peak if peak else 0.0)
  elif opt_cfg.schedule == 'constant':
    main = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optimizer.schedule must be 'cosine' or 'constant', got {opt_cfg.schedule!r}")
  if warmup == 0:
    return main
  ramp = optax.linear_schedule(opt_cfg.warmup_lr, peak, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def path_string(path) -> str:
  """'/'-joined names of a tree path, e.g. 'features_1/token_mixer/conv/kernel'."""
  parts = []
  for p in path:
    if hasattr(p, 'key'):
      parts.append(str(p.key))
    elif hasattr(p, 'name'):
      parts.append(str(p.name))
    elif hasattr(p, 'idx'):
      parts.append(str(p.idx))
    else:
      parts.append(str(p))
  return '/'.join(parts)


def weight_decay_mask(params: Any, rule: str, force_patterns=()) -> Any:
  """Boolean tree: True where weight decay applies.

  rule 'timm': False for parameters with ndim <= 1 (biases, BN scale/shift, vector layer scales),
  exactly timm's `param_groups_weight_decay` filter (`ndim <= 1 or name.endswith('.bias')`; every
  bias here is 1-D). rule 'all': True everywhere. `force_patterns` (regexes, searched in the
  '/'-joined path) turn decay back on for parameters PyTorch stores with more dimensions.
  """
  if rule not in ('timm', 'all'):
    raise ValueError(f"optimizer.weight_decay_rule must be 'timm' or 'all', got {rule!r}")
  compiled = [re.compile(p) for p in force_patterns]

  def decide(path, leaf):
    if rule == 'all':
      return True
    if any(c.search(path_string(path)) for c in compiled):
      return True
    return jnp.ndim(leaf) > 1

  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(opt_cfg: ml_collections.ConfigDict, schedule, params: Any) -> optax.GradientTransformation:
  """AdamW with the recipe's clipping in front; its weight decay is coupled as in torch.optim.AdamW
  (decoupled, multiplied by the current lr), masked per `weight_decay_mask`."""
  chain = []
  if opt_cfg.agc_clip and opt_cfg.grad_clip_norm:
    raise ValueError('set at most one of optimizer.agc_clip and optimizer.grad_clip_norm')
  if opt_cfg.agc_clip > 0:
    # timm's AGC: per output unit, clip the gradient norm to agc_clip * max(param norm, 1e-3).
    # optax's unit-wise norms (HWIO conv: per output channel; Dense (in,out): per output) are the
    # same units as timm's (OIHW / (out,in) reduced over all but dim 0).
    chain.append(optax.adaptive_grad_clip(opt_cfg.agc_clip, eps=1e-3))
  elif opt_cfg.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
  mask = weight_decay_mask(params, opt_cfg.weight_decay_rule, tuple(opt_cfg.weight_decay_force))
  chain.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay, mask=mask))
  return optax.chain(*chain)
