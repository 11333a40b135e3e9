"""Optimiser, learning-rate schedule and weight-decay mask of the paper recipes, built with optax.

The recipes are timm/cvnets AdamW runs. What differs between them is captured by config fields:
the lr scaling rule (peak = base_lr * global_batch / lr_scaling_batch), the scheduler (timm's
`CosineLRScheduler` stepped once per epoch as DeiT's loop steps it, or cvnets' cosine for
ParC-Net; see `../shared/reference/training.md`), which parameters are decayed, layer-wise lr
decay, and gradient clipping (global norm, or timm's adaptive gradient clipping used by RepViT).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

SCHEDULES = ('cosine', 'cvnets_cosine', 'constant')


def peak_learning_rate(opt_cfg: ml_collections.ConfigDict, global_batch_size: int) -> float:
  """base_lr scaled linearly with the global batch (each recipe's rule), or as is."""
  if opt_cfg.lr_scaling_batch and opt_cfg.lr_scaling_batch > 0:
    return opt_cfg.base_lr * global_batch_size / opt_cfg.lr_scaling_batch
  return opt_cfg.base_lr


def timm_cosine_lr(t: float, *, peak: float, t_initial: float, warmup_t: float, warmup_lr: float,
                   min_lr: float) -> float:
  """timm `CosineLRScheduler._get_lr(t)` with one cycle, warmup_prefix=False, k_decay=1.

  t < warmup_t: warmup_lr + t (peak - warmup_lr) / warmup_t; else
  min_lr + (peak - min_lr)(1 + cos(pi t / t_initial)) / 2, and min_lr once t >= t_initial.
  """
  if t < warmup_t:
    return warmup_lr + t * (peak - warmup_lr) / warmup_t
  if t >= t_initial:  # timm: cycle index 1 >= cycle_limit 1
    return min_lr
  return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * t / t_initial))


def cvnets_cosine_lr(epoch: int, iteration: int, *, peak: float, max_epochs: int,
                     warmup_iterations: int, warmup_lr: float, min_lr: float) -> float:
  """cvnets `CosineScheduler.get_lr(epoch, curr_iter)`, epoch-based (ParC-Net's cvnets version).

  iteration < warmup_iterations: warmup_lr + iteration (peak - warmup_lr) / warmup_iterations;
  else min_lr + (peak - min_lr)(1 + cos(pi epoch / max_epochs)) / 2, clipped at 0. cvnets calls it
  before every iteration with the 0-based epoch and the number of iterations done so far.
  """
  if iteration < warmup_iterations:
    lr = warmup_lr + iteration * (peak - warmup_lr) / warmup_iterations
  else:
    lr = min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * epoch / max_epochs))
  return max(0.0, lr)


def _epoch_of_step(step: jax.Array, epoch_starts: np.ndarray) -> jax.Array:
  """0-based epoch that step `step` (0-based, the number of updates done) belongs to."""
  return jnp.searchsorted(jnp.asarray(epoch_starts[1:]), step, side='right')


def learning_rate_schedule(opt_cfg: ml_collections.ConfigDict, *, global_batch_size: int,
                           steps_per_epoch: int, total_steps: int,
                           epoch_starts: Sequence[int] | None = None
                           ) -> Callable[[jax.Array], jax.Array]:
  """The lr of every step, `schedule(step)` (step = updates done so far, as optax counts).

  Epoch-stepped schedules take their values from a float64 table computed with the official
  formula (`timm_cosine_lr`, `cvnets_cosine_lr`), so they equal the PyTorch scheduler's values
  to float32 rounding. `epoch_starts` (the first step of every epoch, then the total) describes
  epochs of unequal length (ParC-Net's variable-batch sampler); by default every epoch is
  `steps_per_epoch` steps and the run has ceil(total_steps / steps_per_epoch) epochs.
  """
  peak = peak_learning_rate(opt_cfg, global_batch_size)
  if epoch_starts is None:
    num_epochs = max(int(math.ceil(total_steps / max(steps_per_epoch, 1))), 1)
    epoch_starts = np.arange(num_epochs + 1, dtype=np.int64) * steps_per_epoch
  epoch_starts = np.asarray(epoch_starts, np.int64)
  num_epochs = len(epoch_starts) - 1
  kind, unit = opt_cfg.schedule, opt_cfg.get('schedule_unit', 'epoch')
  lag = int(opt_cfg.get('schedule_epoch_lag', 1))
  if kind not in SCHEDULES:
    raise ValueError(f'optimizer.schedule must be one of {SCHEDULES}, got {kind!r}')
  if unit not in ('epoch', 'step'):
    raise ValueError(f"optimizer.schedule_unit must be 'epoch' or 'step', got {unit!r}")
  warmup_lr, min_lr = float(opt_cfg.warmup_lr), float(opt_cfg.min_lr)
  warmup_iters = (int(opt_cfg.warmup_steps) if opt_cfg.warmup_steps and opt_cfg.warmup_steps > 0
                  else 0)

  if kind == 'cvnets_cosine':
    if warmup_iters <= 0:
      raise ValueError('optimizer.schedule=cvnets_cosine needs optimizer.warmup_steps > 0 (cvnets '
                       'warms up in iterations)')
    table = jnp.asarray([cvnets_cosine_lr(e, warmup_iters, peak=peak, max_epochs=num_epochs,
                                          warmup_iterations=warmup_iters, warmup_lr=warmup_lr,
                                          min_lr=min_lr) for e in range(num_epochs)], jnp.float32)
    slope = (peak - warmup_lr) / warmup_iters

    def cvnets(step):
      step = jnp.asarray(step)
      epoch = jnp.minimum(_epoch_of_step(step, epoch_starts), num_epochs - 1)
      ramp = warmup_lr + step.astype(jnp.float32) * slope
      return jnp.where(step < warmup_iters, ramp, table[epoch])
    return cvnets

  def curve(t, t_initial, warmup_t):
    if kind == 'constant':
      return warmup_lr + t * (peak - warmup_lr) / warmup_t if t < warmup_t else peak
    return timm_cosine_lr(t, peak=peak, t_initial=t_initial, warmup_t=warmup_t, warmup_lr=warmup_lr,
                          min_lr=min_lr)

  if unit == 'epoch':
    if warmup_iters:
      raise ValueError('optimizer.warmup_steps counts iterations: use schedule_unit=step (or '
                       'warmup_epochs with schedule_unit=epoch)')
    warmup_t = float(int(opt_cfg.warmup_epochs))  # timm's warmup_t is an integer number of epochs
    table = jnp.asarray([curve(max(e - lag, 0), num_epochs, warmup_t) for e in range(num_epochs)],
                        jnp.float32)

    def per_epoch(step):
      step = jnp.asarray(step)
      return table[jnp.minimum(_epoch_of_step(step, epoch_starts), num_epochs - 1)]
    return per_epoch

  # Per step: timm with t_in_epochs=False, t = number of updates, t_initial = total steps.
  total = max(int(total_steps), 1)
  warmup_t = warmup_iters or int(round(float(opt_cfg.warmup_epochs) * steps_per_epoch))

  def per_step(step):
    t = jnp.asarray(step).astype(jnp.float32)
    ramp = warmup_lr + t * (peak - warmup_lr) / max(warmup_t, 1)
    if kind == 'constant':
      main = jnp.full_like(t, peak)
    else:
      main = min_lr + 0.5 * (peak - min_lr) * (1.0 + jnp.cos(jnp.pi * t / total))
      main = jnp.where(t >= total, min_lr, main)
    return jnp.where(t < warmup_t, ramp, main)
  return per_step


def path_string(path: tuple) -> str:
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


def weight_decay_mask(params: Any, rule: str, force_patterns: Sequence[str] = ()) -> Any:
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


def agc_unit_axes(path: tuple, leaf: jax.Array) -> tuple[int, ...] | None:
  """The axes over which timm's `unitwise_norm` reduces this leaf, in our (Flax) layout.

  timm reduces a PyTorch tensor with ndim > 1 over every dim but dim 0 (the output unit), and
  takes one norm of a tensor with ndim <= 1. Flax conv kernels (HWIO, depthwise (kh, kw, 1, C))
  and Dense kernels (in, out) keep PyTorch's dim 0 LAST, so they reduce over all axes but the
  last. Two leaves keep other layouts: the DynamicConv expert bank `experts` [M, ...] is stored
  as PyTorch's (dim 0 first), and position embeddings (1, ..., C) are PyTorch's (1, C, ...),
  whose single unit is the whole tensor. None means the whole tensor.
  """
  if jnp.ndim(leaf) <= 1:
    return None
  name = path_string(path).rsplit('/', 1)[-1]
  if name == 'experts':
    return tuple(range(1, jnp.ndim(leaf)))
  if jnp.shape(leaf)[0] == 1 and name.startswith('pe'):
    return None
  return tuple(range(jnp.ndim(leaf) - 1))


def _unitwise_norm(x: jax.Array, axes) -> jax.Array:
  if axes is None:
    return jnp.sqrt(jnp.sum(jnp.square(x)))
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))


def adaptive_grad_clip(clip_factor: float, eps: float = 1e-3) -> optax.GradientTransformation:
  """timm `adaptive_clip_grad` (NFNet AGC) per output unit: where the gradient's unit norm is not
  below clip_factor * max(|param unit|, eps), it is rescaled to that norm (timm's exact rule,
  including its 1e-6 floor on the gradient norm)."""

  def update(grads, state, params):
    if params is None:
      raise ValueError('adaptive_grad_clip needs the parameters')

    def clip(path, g, p):
      axes = agc_unit_axes(path, p)
      max_norm = jnp.maximum(_unitwise_norm(p, axes), eps) * clip_factor
      g_norm = _unitwise_norm(g, axes)
      clipped = g * (max_norm / jnp.maximum(g_norm, 1e-6))
      return jnp.where(g_norm < max_norm, g, clipped)

    return jax.tree_util.tree_map_with_path(clip, grads, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def layer_decay_multipliers(params: Any, decay: float, groups: Sequence[str]) -> Any:
  """Per-leaf lr multipliers of layer-wise lr decay (timm `param_groups_layer_decay` semantics).

  A leaf's ordinal is (index of the first regex of `groups` that its '/'-joined path matches,
  then the integers that regex captures); the distinct ordinals, sorted, number the layers. A
  regex written with a leading '+' joins the layer before it (timm's MATCH_PREV_GROUP, e.g.
  GhostNet's conv_head shares the last block's layer). Unmatched leaves (the classifier) form one
  more, last layer, as timm's `group_with_matcher` maps them to the largest ordinal. Layer i of L
  gets decay ** (L - 1 - i), so the last layer trains at the full lr.
  """
  joins_prev = [g.startswith('+') for g in groups]
  compiled = [re.compile(g[1:] if j else g) for g, j in zip(groups, joins_prev)]
  keys = {}
  for path, _ in jax.tree_util.tree_leaves_with_path(params):
    name = path_string(path)
    for i, c in enumerate(compiled):
      m = c.search(name)
      if m:
        try:
          keys[name] = (i,) + tuple(int(x) for x in m.groups() if x is not None)
        except ValueError:
          raise ValueError(f'optimizer.layer_decay_groups regex {groups[i]!r} captured a '
                           f'non-integer in {name!r}: capture only layer numbers (use (?:...) '
                           'otherwise)') from None
        break
  layer_of, layer = {}, -1
  for o in sorted(set(keys.values())):
    if layer < 0 or not joins_prev[o[0]]:
      layer += 1
    layer_of[o] = layer
  # As timm's group_with_matcher: unmatched leaves (the classifier) form one more, last group.
  unmatched = any(path_string(p) not in keys
                  for p, _ in jax.tree_util.tree_leaves_with_path(params))
  last = layer + (1 if unmatched else 0)

  def mult(path, leaf):
    del leaf
    return float(decay) ** (last - layer_of.get(keys.get(path_string(path)), last))

  return jax.tree_util.tree_map_with_path(mult, params)


def scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
  """Multiplies each update leaf by the matching constant of `multipliers`."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(opt_cfg: ml_collections.ConfigDict, schedule: Callable,
                   params: Any) -> optax.GradientTransformation:
  """AdamW with the recipe's clipping in front and layer-wise lr decay behind.

  The weight decay is torch.optim.AdamW's (decoupled, multiplied by the current lr), masked per
  `weight_decay_mask`. Layer-wise decay multiplies the whole AdamW update of a parameter (its
  Adam step and its decay), as timm's per-group `lr_scale` does.
  """
  chain = []
  if opt_cfg.agc_clip and opt_cfg.grad_clip_norm:
    raise ValueError('set at most one of optimizer.agc_clip and optimizer.grad_clip_norm')
  if opt_cfg.agc_clip > 0:
    chain.append(adaptive_grad_clip(opt_cfg.agc_clip, eps=1e-3))
  elif opt_cfg.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
  mask = weight_decay_mask(params, opt_cfg.weight_decay_rule, tuple(opt_cfg.weight_decay_force))
  chain.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay, mask=mask))
  layer_decay = float(opt_cfg.get('layer_decay', 0.0) or 0.0)
  if layer_decay > 0:
    groups = tuple(opt_cfg.get('layer_decay_groups', ()))
    if not groups:
      raise ValueError('optimizer.layer_decay needs optimizer.layer_decay_groups (regexes that '
                       'number the layers)')
    chain.append(scale_by_tree(layer_decay_multipliers(params, layer_decay, groups)))
  return optax.chain(*chain)
