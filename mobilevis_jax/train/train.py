"""The training loop as pure, separately testable functions (flax-examples layout; flags live in main.py).

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

Sections: state; per-device step; evaluation; initialisation helpers; the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import re
import signal
import time
from typing import Any, Callable, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from mobilevis_jax.layers import sync_batch_stats
from mobilevis_jax.train import checkpoint as ckpt_lib
from mobilevis_jax.train import distributed
from mobilevis_jax.train import ema as ema_lib
from mobilevis_jax.train import losses
from mobilevis_jax.train import metrics_log
from mobilevis_jax.train import optim
from mobilevis_jax.train.distributed import DATA_AXIS

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """Raised when a step produced a NaN/Inf loss; the message is the diagnostic."""


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
  def from_config(cls, cfg: ml_collections.ConfigDict, num_classes: int) -> 'StepOptions':
    d = cfg.data
    if cfg.distillation.type not in ('none', 'hard'):
      raise ValueError(f"distillation.type must be 'none' or 'hard', got {cfg.distillation.type!r}")
    return cls(num_classes=num_classes, label_smoothing=float(d.get('label_smoothing', 0.0)),
               mixup_alpha=float(d.get('mixup_alpha', 0.0)), cutmix_alpha=float(d.get('cutmix_alpha', 0.0)),
               mixup_switch_prob=float(d.get('mixup_switch_prob', 0.5)),
               distillation=cfg.distillation.type, distillation_alpha=float(cfg.distillation.alpha),
               ema_decay=float(cfg.ema_decay), sync_batchnorm=bool(cfg.sync_batchnorm),
               half_precision=bool(cfg.half_precision), grad_accum_steps=int(cfg.grad_accum_steps))


def _cast_floats(tree: Any, dtype) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# ================================================================================================
# Per-device training step
# ================================================================================================

def make_targets(rng: jax.Array, images: jax.Array, labels: jax.Array, opts: StepOptions):
  """(possibly mixed images, soft targets): mixup/cutmix when configured, else smoothed one-hot."""
  if opts.mixup_alpha > 0 or opts.cutmix_alpha > 0:
    from mobilevis_jax.data.mixup import mixup_cutmix  # pylint: disable=import-outside-toplevel
    return mixup_cutmix(rng, images, labels, num_classes=opts.num_classes, mixup_alpha=opts.mixup_alpha,
                        cutmix_alpha=opts.cutmix_alpha, switch_prob=opts.mixup_switch_prob,
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


def per_device_train_step(state: TrainState, batch: dict, teacher_variables: Any, *, model: nn.Module,
                          tx: optax.GradientTransformation, schedule: Callable, opts: StepOptions,
                          teacher_model: nn.Module | None = None):
  """One optimiser step as seen by one device (call inside shard_map / pmap over `data`)."""
  images, labels = batch['image'], batch['label']
  device_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), lax.axis_index(DATA_AXIS))
  k = opts.grad_accum_steps
  grad_fn = functools.partial(_micro_batch_grads, teacher_variables=teacher_variables, model=model,
                              teacher_model=teacher_model, opts=opts)
  if k == 1:
    loss, grads, batch_stats, correct = grad_fn(state.params, state.batch_stats, images, labels, device_rng)
  else:
    if images.shape[0] % k:
      raise ValueError(f'per-device batch {images.shape[0]} is not divisible by grad_accum_steps={k}')
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
                            opt_state=opt_state, ema_params=ema_params, ema_batch_stats=ema_batch_stats)
  return new_state, metrics


def make_train_step(mesh, *, model, tx, schedule, opts: StepOptions, teacher_model=None):
  """The jitted data-parallel step: (state, global batch, teacher variables) -> (state, metrics)."""
  fn = functools.partial(per_device_train_step, model=model, tx=tx, schedule=schedule, opts=opts,
                         teacher_model=teacher_model)
  mapped = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()), out_specs=(P(), P()),
                         check_vma=False)
  return jax.jit(mapped, donate_argnums=(0,))


# ================================================================================================
# Evaluation
# ================================================================================================

def per_device_eval_step(variables, batch, *, model, half_precision: bool = False):
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


def make_eval_step(mesh, *, model, half_precision: bool = False):
  fn = functools.partial(per_device_eval_step, model=model, half_precision=half_precision)
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P(),
                               check_vma=False))


def evaluate(eval_step, variables, batches: Iterator[dict], mesh) -> dict[str, float]:
  """top1/top5 (fractions) and mean loss over every real example of the padded eval set."""
  totals = None
  for local in batches:
    sums = eval_step(variables, distributed.global_batch(local, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError('the eval split yielded no batches')
  totals = distributed.to_host(totals)
  n = float(totals['count'])
  return {'top1': float(totals['top1']) / n, 'top5': float(totals['top5']) / n,
          'loss': float(totals['loss']) / n, 'count': n}


# ================================================================================================
# Initialisation helpers
# ================================================================================================

def data_source(data_cfg):
  """The module providing train_iterator / eval_iterator / dataset_info for `data_cfg.name`."""
  if data_cfg.name == 'synthetic':
    from mobilevis_jax.train import synthetic  # pylint: disable=import-outside-toplevel
    return synthetic
  from mobilevis_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline


def _flat(tree) -> dict[str, Any]:
  return {optim.path_string(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def merge_pretrained(fresh: dict, loaded: dict, exclude=()) -> dict:
  """`fresh` variables with every leaf taken from `loaded`, except paths matching `exclude`.

  Any other mismatch (a missing leaf, a leaf of another shape, a leftover loaded leaf) is an error
  naming the paths: a silently partial initialisation is the worst kind of bug in a fine-tune.
  """
  pats = [re.compile(p) for p in exclude]
  excluded = lambda path: any(p.search(path) for p in pats)
  out = {}
  for collection, tree in fresh.items():
    src = _flat(loaded.get(collection, {}))
    used = set()
    problems = []

    def pick(path, leaf):
      key = optim.path_string(path)
      if excluded(key):
        return leaf
      if key not in src:
        problems.append(f'missing {collection}/{key}')
        return leaf
      used.add(key)
      if tuple(np.shape(src[key])) != tuple(np.shape(leaf)):
        problems.append(f'{collection}/{key}: checkpoint {np.shape(src[key])} vs model {np.shape(leaf)}')
        return leaf
      return jnp.asarray(src[key], dtype=leaf.dtype)

    out[collection] = jax.tree_util.tree_map_with_path(pick, tree)
    leftover = [k for k in src if k not in used and not excluded(k)]
    problems += [f'unexpected {collection}/{k}' for k in leftover]
    if problems:
      raise ValueError('init_from does not match the model (use init_exclude for re-initialised '
                       'parts): ' + '; '.join(problems[:20]) + (' ...' if len(problems) > 20 else ''))
  return out


def init_variables(model: nn.Module, rng: jax.Array, image_size: int) -> dict:
  # One home for model initialisation: a one-shot compile (see models.registry.init_variables).
  from mobilevis_jax.models.registry import init_variables as one_shot_init  # pylint: disable=import-outside-toplevel
  return one_shot_init(model, rng, image_size)


def create_train_state(variables: dict, tx: optax.GradientTransformation, rng: jax.Array,
                       use_ema: bool) -> TrainState:
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params) if use_ema else {},
      ema_batch_stats=jax.tree.map(jnp.copy, batch_stats) if use_ema else {},
      rng=rng)


def _abstract(tree, sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


# ================================================================================================
# The loop
# ================================================================================================

class _Preemption:
  """SIGTERM (what schedulers send before a kill) -> save at the next step boundary and exit."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. a notebook worker): rely on orbax only
      self._previous = None
    return self

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_finite(step: int, metrics: dict, last_good: int | None, ckpt_dir: str) -> None:
  """Stops on a non-finite loss, or a non-finite gradient norm (which would poison the parameters
  even when the loss still looks finite, e.g. a NaN input zeroed by a ReLU in the forward pass)."""
  loss, gnorm = metrics['loss'], metrics['grad_norm']
  if math.isfinite(loss) and math.isfinite(gnorm):
    return
  what = f'loss ({loss})' if not math.isfinite(loss) else f'gradient norm ({gnorm}; loss {loss:.4g})'
  where = (f'the last good checkpoint is step {last_good} in {ckpt_dir}' if last_good is not None
           else 'no checkpoint was written before it')
  raise NonFiniteLossError(
      f'non-finite {what} at step {step} (lr={metrics["lr"]:.3g}); stopping without saving this '
      f'state; {where}. Lower the learning rate, enable gradient clipping, or check the input '
      'for NaNs.')


def _variables(params, batch_stats):
  out = {'params': params}
  if batch_stats:
    out['batch_stats'] = batch_stats
  return out


def run_evaluations(cfg, *, mesh, model, state: TrainState, eval_step, source, eval_cache: dict) -> dict[str, float]:
  """Raw weights, EMA weights (if any) and, for families with `fuse`, the fused raw weights."""
  def batches():
    return source.eval_iterator(cfg.data, global_batch_size=cfg.eval_batch_size)

  results = {}
  for k, v in evaluate(eval_step, _variables(state.params, state.batch_stats), batches(), mesh).items():
    results[f'eval/{k}'] = v
  if cfg.ema_decay > 0 and cfg.eval_ema:
    for k, v in evaluate(eval_step, _variables(state.ema_params, state.ema_batch_stats), batches(), mesh).items():
      results[f'eval_ema/{k}'] = v
  if cfg.eval_fused:
    import mobilevis_jax  # pylint: disable=import-outside-toplevel
    host_vars = distributed.to_host(_variables(state.params, state.batch_stats))
    fused_model, fused_vars = mobilevis_jax.fuse(model, host_vars)
    if 'fused' not in eval_cache:
      eval_cache['fused'] = make_eval_step(mesh, model=fused_model, half_precision=cfg.half_precision)
    fused_vars = distributed.replicate(fused_vars, mesh)
    for k, v in evaluate(eval_cache['fused'], fused_vars, batches(), mesh).items():
      results[f'eval_fused/{k}'] = v
  return results


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict[str, float]:
  """Trains `cfg` in `workdir` (resuming from its newest readable checkpoint) and evaluates.

  Returns the final metrics (the last eval plus 'step'). Raises NonFiniteLossError on a NaN/Inf
  loss, after making sure the checkpoints already written are complete.
  """
  import mobilevis_jax  # pylint: disable=import-outside-toplevel  (registry; avoids an import cycle)

  mesh = distributed.make_data_mesh(devices)
  n_devices = mesh.devices.size
  gbs = int(cfg.global_batch_size)
  if gbs % n_devices:
    raise ValueError(f'global_batch_size={gbs} is not divisible by the {n_devices} devices')
  if cfg.eval_batch_size % n_devices:
    raise ValueError(f'eval_batch_size={cfg.eval_batch_size} is not divisible by the {n_devices} devices')
  is_main = jax.process_index() == 0

  # --- input ---
  source = data_source(cfg.data)
  info = source.dataset_info(cfg.data)
  num_classes = cfg.num_classes if cfg.num_classes > 0 else int(info['num_classes'])
  if cfg.data.train_split not in info['splits']:
    raise ValueError(f"train split {cfg.data.train_split!r} not in dataset splits {list(info['splits'])}")
  steps_per_epoch = max(int(info['splits'][cfg.data.train_split]) // gbs, 1)
  total_steps = int(cfg.num_train_steps) if cfg.num_train_steps > 0 else int(math.ceil(cfg.num_epochs * steps_per_epoch))
  eval_every = int(round(cfg.eval_every_epochs * steps_per_epoch)) if cfg.eval_every_epochs > 0 else 0

  # --- model and optimiser ---
  model_kwargs = dict(cfg.model_kwargs.to_dict()) if hasattr(cfg.model_kwargs, 'to_dict') else dict(cfg.model_kwargs)
  model = mobilevis_jax.create_model(cfg.model, num_classes=num_classes, **model_kwargs)
  rng = jax.random.PRNGKey(cfg.seed)
  init_rng, state_rng = jax.random.split(rng)
  image_size = int(cfg.data.image_size)
  variables = init_variables(model, init_rng, image_size)
  if cfg.init_from:
    loaded, meta = ckpt_lib.restore_variables(cfg.init_from)
    if meta.get('model_name') not in (None, cfg.model):
      log.warning('init_from holds %s, training %s', meta.get('model_name'), cfg.model)
    variables = merge_pretrained(variables, loaded, tuple(cfg.init_exclude))
  schedule = optim.learning_rate_schedule(cfg.optimizer, global_batch_size=gbs,
                                          steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  tx = optim.make_optimizer(cfg.optimizer, schedule, variables['params'])
  opts = StepOptions.from_config(cfg, num_classes)
  replicated = distributed.replicated(mesh)
  state = jax.jit(functools.partial(create_train_state, tx=tx, use_ema=cfg.ema_decay > 0),
                  out_shardings=replicated)(variables, rng=state_rng)
  del variables

  # --- teacher ---
  teacher_model, teacher_vars = None, {}
  if cfg.distillation.type == 'hard':
    if not cfg.distillation.teacher_checkpoint:
      raise ValueError('distillation.type=hard needs distillation.teacher_checkpoint')
    teacher_vars, tmeta = ckpt_lib.restore_variables(cfg.distillation.teacher_checkpoint)
    tname = cfg.distillation.teacher_model or tmeta.get('model_name')
    if not tname:
      raise ValueError('set distillation.teacher_model (the teacher checkpoint does not name its model)')
    tkwargs = dict(tmeta.get('model_kwargs', {}))
    tkwargs.update(cfg.distillation.teacher_model_kwargs.to_dict())
    tkwargs.setdefault('num_classes', num_classes)
    teacher_model = mobilevis_jax.create_model(tname, **tkwargs)
    teacher_vars = distributed.replicate(dict(teacher_vars), mesh)

  # --- checkpoint: auto-resume ---
  checkpointer = ckpt_lib.TrainCheckpointer(workdir, keep=cfg.checkpoint_keep, use_async=cfg.checkpoint_async)
  restored = checkpointer.restore_latest(_abstract(state.as_dict(), replicated))
  last_good = None
  if restored is not None:
    state_dict, meta, last_good = restored
    state = TrainState(**state_dict)
    if int(meta.get('data_position', last_good)) != last_good:
      raise ValueError(f'checkpoint {last_good} has data position {meta.get("data_position")}')
    if is_main:
      print(f'resumed from step {last_good} ({checkpointer.directory})', flush=True)
  start_step = int(distributed.to_host(state.step))

  train_step = make_train_step(mesh, model=model, tx=tx, schedule=schedule, opts=opts, teacher_model=teacher_model)
  eval_step = make_eval_step(mesh, model=model, half_precision=cfg.half_precision)
  eval_cache: dict = {}
  writer = metrics_log.MetricWriter(workdir, tensorboard=cfg.tensorboard)
  bar = metrics_log.ProgressBar(total=total_steps, initial=start_step, batch_size=gbs, enabled=cfg.progress_bar)
  meta_base = {'model_name': cfg.model, 'model_kwargs': {'num_classes': num_classes, **model_kwargs}}
  train_iter = source.train_iterator(cfg.data, global_batch_size=gbs, seed=cfg.seed, start_step=start_step)

  pending: list[tuple[int, dict]] = []
  results: dict[str, float] = {}

  def flush() -> dict | None:
    """Fetches pending step metrics (one host sync), stops on non-finite loss, returns the last."""
    last = None
    for step_no, m in pending:
      m = {k: float(v) for k, v in distributed.to_host(m).items()}
      _check_finite(step_no, m, last_good, checkpointer.directory)
      last = (step_no, m)
    pending.clear()
    return last

  def save(step_no: int, force: bool = False):
    nonlocal last_good
    flush()  # never checkpoint a state whose loss went non-finite
    meta = {**meta_base, 'step': step_no, 'data_position': step_no}
    if checkpointer.save(step_no, state.as_dict(), meta, force=force):
      last_good = step_no

  try:
    with _Preemption() as preemption:
      step = start_step
      while step < total_steps:
        batch = distributed.global_batch(next(train_iter), mesh)
        state, metrics = train_step(state, batch, teacher_vars)
        step += 1
        pending.append((step, metrics))
        if cfg.debug_step_sleep:
          time.sleep(cfg.debug_step_sleep)
        if step % cfg.log_every_steps == 0 or step == total_steps:
          last = flush()
          rate = bar.update(step, last[1]['loss'])
          writer.write(step, {**{f'train/{k}': v for k, v in last[1].items()}, 'train/images_per_sec': rate})
        if step % cfg.checkpoint_every_steps == 0 and step < total_steps:
          save(step)
        if eval_every and step % eval_every == 0 and step < total_steps:
          flush()
          results = run_evaluations(cfg, mesh=mesh, model=model, state=state, eval_step=eval_step,
                                    source=source, eval_cache=eval_cache)
          writer.write(step, results)
          bar.write(f'step {step}: ' + ', '.join(f'{k}={v:.4f}' for k, v in results.items() if 'count' not in k))
        if preemption.requested or checkpointer.reached_preemption(step):
          bar.write(f'preemption signal: saving step {step} and exiting')
          save(step, force=True)
          checkpointer.wait()
          return {'step': step, 'preempted': 1.0}
      flush()
      if last_good != total_steps:
        save(total_steps, force=True)
      results = run_evaluations(cfg, mesh=mesh, model=model, state=state, eval_step=eval_step,
                                source=source, eval_cache=eval_cache)
      writer.write(total_steps, results)
      bar.write(f'final (step {total_steps}): ' + ', '.join(f'{k}={v:.4f}' for k, v in results.items() if 'count' not in k))
  finally:
    checkpointer.wait()
    bar.close()
    writer.close()
  return {'step': float(total_steps), **results}


def evaluate_checkpoint(cfg: ml_collections.ConfigDict, checkpoint: str, *, devices=None) -> dict[str, float]:
  """Evaluates a variables checkpoint or a work directory's newest checkpoint on cfg's eval split
  (and after `fuse` when cfg.eval_fused). The model is built from the checkpoint's meta when it
  names one, else from cfg."""
  import mobilevis_jax  # pylint: disable=import-outside-toplevel

  mesh = distributed.make_data_mesh(devices)
  source = data_source(cfg.data)
  info = source.dataset_info(cfg.data)
  variables, meta = ckpt_lib.restore_variables(checkpoint)
  kwargs = dict(meta.get('model_kwargs') or {})
  kwargs.setdefault('num_classes', cfg.num_classes if cfg.num_classes > 0 else int(info['num_classes']))
  if not meta.get('model_kwargs'):
    kwargs.update(cfg.model_kwargs.to_dict())
  model = mobilevis_jax.create_model(meta.get('model_name') or cfg.model, **kwargs)
  variables = distributed.replicate(dict(variables), mesh)
  batches = lambda: source.eval_iterator(cfg.data, global_batch_size=cfg.eval_batch_size)
  step = make_eval_step(mesh, model=model, half_precision=cfg.half_precision)
  results = {f'eval/{k}': v for k, v in evaluate(step, variables, batches(), mesh).items()}
  if cfg.eval_fused:
    fused_model, fused_vars = mobilevis_jax.fuse(model, distributed.to_host(variables))
    fstep = make_eval_step(mesh, model=fused_model, half_precision=cfg.half_precision)
    fused_vars = distributed.replicate(fused_vars, mesh)
    results.update({f'eval_fused/{k}': v for k, v in evaluate(fstep, fused_vars, batches(), mesh).items()})
  return results
