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

import concurrent.futures
import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
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


def per_device_grads(state: TrainState, batch: dict, teacher_variables: Any, *,
                     model: nn.Module, opts: StepOptions,
                     teacher_model: nn.Module | None = None) -> tuple[Any, Any, dict]:
  """Forward and backward of one step as seen by one device (inside shard_map over `data`):
  (gradients, BatchNorm statistics, metrics), all-reduced, so identical on every device."""
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
  metrics = {
      'loss': lax.pmean(loss, DATA_AXIS),
      'train_accuracy': lax.psum(correct, DATA_AXIS) / lax.psum(images.shape[0], DATA_AXIS),
  }
  return grads, batch_stats, metrics


def per_device_update(state: TrainState, grads: Any, batch_stats: Any, *,
                      tx: optax.GradientTransformation, schedule: Callable,
                      opts: StepOptions) -> tuple[TrainState, dict]:
  """The optimiser update from all-reduced gradients and statistics: the same on every device,
  so it needs no collective."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params, ema_batch_stats = state.ema_params, state.ema_batch_stats
  if opts.ema_decay > 0:
    ema_params = ema_lib.ema_update(ema_params, params, opts.ema_decay)
    ema_batch_stats = ema_lib.ema_update(ema_batch_stats, batch_stats, opts.ema_decay)
  metrics = {'grad_norm': optax.tree.norm(grads), 'lr': schedule(state.step)}
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, ema_params=ema_params,
                            ema_batch_stats=ema_batch_stats)
  return new_state, metrics


def per_device_train_step(state: TrainState, batch: dict, teacher_variables: Any, *,
                          model: nn.Module,
                          tx: optax.GradientTransformation, schedule: Callable, opts: StepOptions,
                          teacher_model: nn.Module | None = None) -> tuple[TrainState, dict]:
  """One optimiser step as seen by one device (call inside shard_map / pmap over `data`)."""
  grads, batch_stats, metrics = per_device_grads(state, batch, teacher_variables, model=model,
                                                 opts=opts, teacher_model=teacher_model)
  new_state, update_metrics = per_device_update(state, grads, batch_stats, tx=tx,
                                                schedule=schedule, opts=opts)
  return new_state, {**metrics, **update_metrics}


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


# XLA:CPU's fusion emitters for the split step's forward + backward program. Its compile is
# dominated by per-fusion emission (LLVM code generation, then the MLIR fusion emitters; a profile
# in RESULTS.md "The fusion emitter"), and XLA's older elemental emitter compiles ParameterNet's
# in 0.65-0.85x the time at the same step time, while it is slower for the other families (and
# doubles the optimiser program's compile). That program's compile, one core, MLIR -> elemental
# (RESULTS.md, "The init's random bits on the host, and the step as two programs"):
# parameternet_600m 55.6 -> 35.9-47.1 s, repvit_m1_1 16.1 -> 26.2, mobilevig_s 18.6 -> 20.8,
# parcnet_s 33.4 -> 36.9, parc_convnext_xt 20.2 -> 20.6, parc_mobilenetv2 15.0 -> 13.4 (within
# the noise); the whole split step, idle, both cores: ghostnet_100 24.6 -> 21.8 s,
# parameternet_600m 42.1 -> 35.1 s. A family not listed keeps XLA's default.
GRADS_EMITTER_TABLE = {'parameternet': 'elemental'}
EMITTER_OPTIONS = {'mlir': {}, 'elemental': {'xla_cpu_use_fusion_emitters': False}}


def grads_emitter(family: str, choice: str = 'auto') -> str:
  """The fusion emitter of the forward + backward program: `choice`, or the family's measured one
  for 'auto' (config `xla_cpu_grads_emitter`)."""
  if choice == 'auto':
    return GRADS_EMITTER_TABLE.get(family, 'mlir')
  if choice not in EMITTER_OPTIONS:
    raise ValueError(f"xla_cpu_grads_emitter must be 'auto' or one of {sorted(EMITTER_OPTIONS)}, "
                     f'got {choice!r}')
  return choice


def _signature(tree: Any) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


class TrainStep:
  """The jitted data-parallel step: `step(state, global batch, teacher variables) -> (state,
  metrics)`, the same function as `per_device_train_step` under `shard_map` over `data`.

  `split=True` (the default on CPU) runs it as two XLA programs: forward + backward with the
  all-reduce (`per_device_grads`), then the optimiser update (`per_device_update`, the state
  donated). Same arithmetic, same collectives; the gradients are materialised between
  the two, which a single program does too. What the split buys is compile time: XLA compiles a
  program mostly on one thread, so two programs compile concurrently, each with the options that
  suit it (`emitter`, the forward + backward program's on CPU: see `grads_emitter`), and the first
  step on a multi-core CPU waits for the longer compile instead of the sum (RESULTS.md, "Time to
  the first training step"). `split=False` (the default on GPU/TPU, where compile is not the
  bottleneck and one program leaves XLA free to schedule across the boundary) is one program.

  `compile(state, batch, teacher_variables, executor=...)` compiles for one batch signature
  ahead of the first call, from arrays or `jax.ShapeDtypeStruct`s, in the executor's threads
  when one is given (the trainer overlaps it with the model's initialisation). A call with a
  batch signature not seen before compiles it first (ParC-Net's multi-scale batches have several).
  """

  def __init__(self, mesh: jax.sharding.Mesh, *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: Callable, opts: StepOptions,
               teacher_model: nn.Module | None = None, fast_compile: bool = False,
               split: bool | None = None, emitter: str = 'mlir') -> None:
    on_cpu = jax.default_backend() == 'cpu'
    self.split = on_cpu if split is None else bool(split)
    if emitter not in EMITTER_OPTIONS:
      raise ValueError(f'emitter must be one of {sorted(EMITTER_OPTIONS)}, got {emitter!r}')
    self.emitter = emitter if on_cpu and self.split else 'mlir'
    options = compiler_options(fast_compile)
    if self.split:
      grads = functools.partial(per_device_grads, model=model, opts=opts,
                                teacher_model=teacher_model)
      update = functools.partial(per_device_update, tx=tx, schedule=schedule, opts=opts)
      grads_options = {**(options or {}), **EMITTER_OPTIONS[self.emitter]} or None
      self._programs = (
          (jax.jit(jax.shard_map(grads, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()),
                                 out_specs=(P(), P(), P()), check_vma=False)), grads_options),
          (jax.jit(jax.shard_map(update, mesh=mesh, in_specs=(P(), P(), P()),
                                 out_specs=(P(), P()), check_vma=False),
                   donate_argnums=(0,)), options))
    else:
      fn = functools.partial(per_device_train_step, model=model, tx=tx, schedule=schedule,
                             opts=opts, teacher_model=teacher_model)
      self._programs = ((jax.jit(jax.shard_map(fn, mesh=mesh,
                                               in_specs=(P(), P(DATA_AXIS), P()),
                                               out_specs=(P(), P()), check_vma=False),
                                 donate_argnums=(0,)), options),)
    self._compiled: dict[tuple, list] = {}  # batch signature -> compiled programs (or futures)

  @property
  def programs(self) -> tuple:
    """The jitted programs, in call order (one, or forward + backward and update)."""
    return tuple(fn for fn, _ in self._programs)

  def _lower_each(self, state: Any, batch: dict, teacher_variables: Any) -> Iterator:
    (first, _), rest = self._programs[0], self._programs[1:]
    lowered = first.lower(state, batch, teacher_variables)
    yield lowered
    if rest:
      grads, batch_stats, _ = lowered.out_info
      yield rest[0][0].lower(state, grads, batch_stats)

  def lower(self, state: Any, batch: dict, teacher_variables: Any) -> list:
    """The programs lowered for these (abstract or concrete) arguments, in call order."""
    return list(self._lower_each(state, batch, teacher_variables))

  def compile(self, state: Any, batch: dict, teacher_variables: Any,
              executor: concurrent.futures.Executor | None = None,
              lowered: list | None = None) -> None:
    """Compiles the step for `batch`'s signature (shapes and dtypes), the programs concurrently:
    each program's compile starts as soon as it is lowered, while the next one is traced. With
    an `executor` it returns once all are lowered and leaves the compiles running there.
    `lowered`: what `lower` returned for these arguments, when the caller has it already."""
    key = _signature(batch)
    if key in self._compiled:
      return
    programs = lowered if lowered is not None else self._lower_each(state, batch,
                                                                    teacher_variables)
    own = executor is None
    pool = concurrent.futures.ThreadPoolExecutor(len(self._programs)) if own else executor
    futures = [pool.submit(low.compile, compiler_options=options)
               for low, (_, options) in zip(programs, self._programs)]
    if own:
      pool.shutdown(wait=True)
      futures = [f.result() for f in futures]
    self._compiled[key] = futures

  def executables(self, batch: dict) -> list:
    """The compiled programs for `batch`'s signature (waiting for compiles still running)."""
    return self._executables(_signature(batch))

  def _executables(self, key: tuple) -> list:
    programs = self._compiled[key]
    if any(isinstance(p, concurrent.futures.Future) for p in programs):
      programs = [p.result() if isinstance(p, concurrent.futures.Future) else p
                  for p in programs]
      self._compiled[key] = programs
    return programs

  def __call__(self, state: TrainState, batch: dict,
               teacher_variables: Any) -> tuple[TrainState, dict]:
    key = _signature(batch)
    if key not in self._compiled:
      self.compile(state, batch, teacher_variables)
    programs = self._executables(key)
    if not self.split:
      return programs[0](state, batch, teacher_variables)
    grads, batch_stats, metrics = programs[0](state, batch, teacher_variables)
    state, update_metrics = programs[1](state, grads, batch_stats)
    return state, {**metrics, **update_metrics}


def make_train_step(mesh: jax.sharding.Mesh, *, model: nn.Module,
                    tx: optax.GradientTransformation, schedule: Callable, opts: StepOptions,
                    teacher_model: nn.Module | None = None,
                    fast_compile: bool = False, split: bool | None = None,
                    emitter: str = 'mlir') -> TrainStep:
  """The jitted data-parallel step: (state, global batch, teacher variables) -> (state, metrics).
  See `TrainStep` (one program, or two on CPU)."""
  return TrainStep(mesh, model=model, tx=tx, schedule=schedule, opts=opts,
                   teacher_model=teacher_model, fast_compile=fast_compile, split=split,
                   emitter=emitter)


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
