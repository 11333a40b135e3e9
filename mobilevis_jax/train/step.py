"""The jitted training and evaluation steps: pure functions of (state, batch), no I/O.

Parallelism. The step is written pmap-style: `per_device_train_step` sees one device's slice of
the batch, averages gradients and metrics with `lax.pmean` over the axis `data`, and applies the
same update everywhere. It is run with `jax.shard_map` over a 1-D mesh of all devices of all
processes (what `jax.pmap` itself lowers to in current JAX), with the state replicated, the batch a
global array sharded along `data`, and the state buffers donated. `check_vma=False` keeps pmap's
semantics: gradients are per-device until the explicit pmean (with the varying-manual-axes check
on, JAX would insert the psum itself when differentiating replicated parameters).

BatchNorm statistics are per device by default (PyTorch DDP without SyncBN): each device
normalises with its own batch moments; the running statistics are averaged over devices after the
step so the replicated state stays identical everywhere. With `sync_batchnorm` the moments are
averaged inside every BatchNorm (`layers.sync_batch_stats`), which makes the step independent of
the number of devices.

This module imports neither TensorFlow nor `mobilevis_jax.data` (tests/test_layering.py checks it):
the step only sees arrays, and mixup/cutmix run inside it (`train/mixup.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from mobilevis_jax.layers import sync_batch_stats
from mobilevis_jax.train import ema as ema_lib
from mobilevis_jax.train import losses, mixup
from mobilevis_jax.train.distributed import DATA_AXIS

# ================================================================================================
# State
# ================================================================================================

@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; replicated on every device."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any        # {} when EMA is off
  ema_batch_stats: Any   # {} when EMA is off
  rng: jax.Array         # base key; step t uses fold_in(rng, t), so it never needs advancing

  def as_dict(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """The static (compile-time) settings of one training step."""
  num_classes: int
  label_smoothing: float = 0.0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mixup_switch_prob: float = 0.5
  distillation: str = 'none'
  distillation_alpha: float = 0.5
  ema_decay: float = 0.0
  sync_batchnorm: bool = False
  half_precision: bool = False
  grad_accum_steps: int = 1

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, num_classes: int) -> StepOptions:
    d = cfg.data
    if cfg.distillation.type not in ('none', 'hard'):
      raise ValueError(f"distillation.type must be 'none' or 'hard', got {cfg.distillation.type!r}")
    return cls(num_classes=num_classes, label_smoothing=float(d.get('label_smoothing', 0.0)),
               mixup_alpha=float(d.get('mixup_alpha', 0.0)),
               cutmix_alpha=float(d.get('cutmix_alpha', 0.0)),
               mixup_switch_prob=float(d.get('mixup_switch_prob', 0.5)),
               distillation=cfg.distillation.type, distillation_alpha=float(cfg.distillation.alpha),
               ema_decay=float(cfg.ema_decay), sync_batchnorm=bool(cfg.sync_batchnorm),
               half_precision=bool(cfg.half_precision), grad_accum_steps=int(cfg.grad_accum_steps))


def _cast_floats(tree: Any, dtype) -> Any:
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# ================================================================================================
# Per-device training step
# ================================================================================================

def make_targets(rng: jax.Array, images: jax.Array, labels: jax.Array,
                 opts: StepOptions) -> tuple[jax.Array, jax.Array]:
  """(possibly mixed images, soft targets): mixup/cutmix when configured, else smoothed one-hot."""
  if opts.mixup_alpha > 0 or opts.cutmix_alpha > 0:
    return mixup.mixup_cutmix(rng, images, labels, num_classes=opts.num_classes,
                              mixup_alpha=opts.mixup_alpha, cutmix_alpha=opts.cutmix_alpha,
                              switch_prob=opts.mixup_switch_prob,
                              label_smoothing=opts.label_smoothing)
  return images, losses.smoothed_one_hot(labels, opts.num_classes, opts.label_smoothing)


def _micro_batch_grads(params, batch_stats, images, labels, rng, teacher_variables, *, model,
                       teacher_model, opts: StepOptions):
  """Loss, gradients, new BN statistics and #correct of one micro-batch on one device."""
  mix_rng, dropout_rng = jax.random.split(rng)
  images, targets = make_targets(mix_rng, images, labels, opts)
  compute_dtype = jnp.bfloat16 if opts.half_precision else jnp.float32
  teacher_logits = None
  if opts.distillation == 'hard':
    # Inference mode: running statistics, no dropout, no gradient.
    teacher_logits = lax.stop_gradient(teacher_model.apply(
        _cast_floats(teacher_variables, compute_dtype), images.astype(compute_dtype), train=False))

  def loss_fn(p):
    variables = {'params': _cast_floats(p, compute_dtype), 'batch_stats': batch_stats}
    ctx = sync_batch_stats(DATA_AXIS) if opts.sync_batchnorm else contextlib.nullcontext()
    with ctx:
      out, mutated = model.apply(variables, images.astype(compute_dtype), train=True,
                                 mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    if isinstance(out, (tuple, list)):
      logits, dist_logits = out
    else:
      logits, dist_logits = out, None
    logits = logits.astype(jnp.float32)
    if opts.distillation == 'hard':
      if dist_logits is None:
        raise ValueError('hard distillation needs a model with a distillation head '
                         '(model_kwargs.distillation=True)')
      loss = losses.hard_distillation_loss(logits, dist_logits.astype(jnp.float32), targets,
                                           teacher_logits, opts.distillation_alpha)
    else:
      # As DeiT's DistillationLoss with type 'none': only the class head is trained.
      loss = losses.soft_target_cross_entropy(logits, targets)
    new_stats = _cast_floats(mutated.get('batch_stats', {}), jnp.float32)
    return loss, (new_stats, logits)

  (loss, (new_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  correct = jnp.sum((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return loss, grads, new_stats, correct


def per_device_train_step(state: TrainState, batch: dict, teacher_variables: Any, *,
                          model: nn.Module,
                          tx: optax.GradientTransformation, schedule: Callable, opts: StepOptions,
                          teacher_model: nn.Module | None = None) -> tuple[TrainState, dict]:
  """One optimiser step as seen by one device (call inside shard_map / pmap over `data`)."""
  images, labels = batch['image'], batch['label']
  device_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                                  lax.axis_index(DATA_AXIS))
  k = opts.grad_accum_steps
  grad_fn = functools.partial(_micro_batch_grads, teacher_variables=teacher_variables, model=model,
                              teacher_model=teacher_model, opts=opts)
  if k == 1:
    loss, grads, batch_stats, correct = grad_fn(state.params, state.batch_stats, images, labels,
                                                device_rng)
  else:
    if images.shape[0] % k:
      raise ValueError(f'per-device batch {images.shape[0]} is not divisible by '
                       f'grad_accum_steps={k}')
    split = lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:])

    def body(carry, xs):
      grad_sum, stats, loss_sum, correct_sum = carry
      imgs, labs, i = xs
      loss_i, grads_i, stats, correct_i = grad_fn(state.params, stats, imgs, labs,
                                                  jax.random.fold_in(device_rng, i))
      grad_sum = jax.tree.map(jnp.add, grad_sum, grads_i)
      return (grad_sum, stats, loss_sum + loss_i, correct_sum + correct_i), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grad_sum, batch_stats, loss_sum, correct), _ = lax.scan(
        body, (zeros, state.batch_stats, 0.0, 0.0), (split(images), split(labels), jnp.arange(k)))
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    loss = loss_sum / k

  # pmap-style all-reduce: every device ends with the same gradient, hence the same update.
  grads = lax.pmean(grads, DATA_AXIS)
  if not opts.sync_batchnorm:
    batch_stats = lax.pmean(batch_stats, DATA_AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params, ema_batch_stats = state.ema_params, state.ema_batch_stats
  if opts.ema_decay > 0:
    ema_params = ema_lib.ema_update(ema_params, params, opts.ema_decay)
    ema_batch_stats = ema_lib.ema_update(ema_batch_stats, batch_stats, opts.ema_decay)
  metrics = {
      'loss': lax.pmean(loss, DATA_AXIS),
      'train_accuracy': lax.psum(correct, DATA_AXIS) / lax.psum(images.shape[0], DATA_AXIS),
      'grad_norm': optax.tree.norm(grads),
      'lr': schedule(state.step),
  }
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, ema_params=ema_params,
                            ema_batch_stats=ema_batch_stats)
  return new_state, metrics


# XLA options that trade run time for compile time (config `xla_fast_compile`, CPU only). LLVM
# at -O0 compiles the train step in 0.59-0.86x the CPU time and runs it 2.2-4.8x slower, by
# model (`experiments/bench/bench_step_compile.py --variants default,opt0`; RESULTS.md), so it
# pays only for runs of a few steps, where compile is everything (smoke tests). Same program,
# same semantics; values differ from the optimised build's by float rounding (fewer fused
# multiply-adds).
FAST_COMPILE_OPTIONS = {'xla_backend_optimization_level': 0}


def compiler_options(fast_compile: bool) -> dict | None:
  """The XLA options of the jitted steps: `FAST_COMPILE_OPTIONS` when asked for on CPU (where
  they were measured), else XLA's defaults."""
  return dict(FAST_COMPILE_OPTIONS) if fast_compile and jax.default_backend() == 'cpu' else None


def make_train_step(mesh: jax.sharding.Mesh, *, model: nn.Module,
                    tx: optax.GradientTransformation, schedule: Callable, opts: StepOptions,
                    teacher_model: nn.Module | None = None,
                    fast_compile: bool = False) -> Callable:
  """The jitted data-parallel step: (state, global batch, teacher variables) -> (state, metrics)."""
  fn = functools.partial(per_device_train_step, model=model, tx=tx, schedule=schedule, opts=opts,
                         teacher_model=teacher_model)
  mapped = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()), out_specs=(P(), P()),
                         check_vma=False)
  return jax.jit(mapped, donate_argnums=(0,), compiler_options=compiler_options(fast_compile))


# ================================================================================================
# Evaluation
# ================================================================================================

def per_device_eval_step(variables: dict, batch: dict, *, model: nn.Module,
                         half_precision: bool = False) -> dict[str, jax.Array]:
  """Masked sums (loss, top-1, top-5, count) over one device's slice, summed over devices."""
  dtype = jnp.bfloat16 if half_precision else jnp.float32
  logits = model.apply(_cast_floats(variables, dtype), batch['image'].astype(dtype), train=False)
  logits = logits.astype(jnp.float32)
  mask, labels = batch['mask'], batch['label']
  logp = jax.nn.log_softmax(logits, -1)
  nll = -jnp.take_along_axis(logp, labels[:, None], -1)[:, 0]
  sums = {'loss': jnp.sum(nll * mask), 'top1': losses.masked_topk_correct(logits, labels, mask, 1),
          'top5': losses.masked_topk_correct(logits, labels, mask, 5), 'count': jnp.sum(mask)}
  return lax.psum(sums, DATA_AXIS)


def make_eval_step(mesh: jax.sharding.Mesh, *, model: nn.Module,
                   half_precision: bool = False, fast_compile: bool = False) -> Callable:
  fn = functools.partial(per_device_eval_step, model=model, half_precision=half_precision)
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P(),
                               check_vma=False),
                 compiler_options=compiler_options(fast_compile))
