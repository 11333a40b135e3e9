"""The training loop (flax-examples layout): the jitted steps live in step.py, flags in main.py.

`train_and_evaluate` builds the model, optimiser, state and data source, restores the newest
readable checkpoint, runs the step over the global batches, evaluates (raw / EMA / fused weights,
one helper) and checkpoints; `evaluate_checkpoint` is the evaluation alone. The data source comes
from `mobilevis_jax.data.get_source`, weight merging from `checkpoint.merge_pretrained`, and
preemption (SIGTERM or orbax's signal) is one object, `checkpoint.Preemption`.

Sections: evaluation; initialisation helpers; the loop.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

import mobilevis_jax
from mobilevis_jax.train import checkpoint as ckpt_lib
from mobilevis_jax.train import distributed, metrics_log, optim
# Re-exported: the step's names are part of this module's API (tests, benchmarks, notebooks).
from mobilevis_jax.train.checkpoint import merge_pretrained  # noqa: F401
from mobilevis_jax.train.step import (StepOptions, TrainState, make_eval_step,  # noqa: F401
                                      make_targets, make_train_step, per_device_eval_step,
                                      per_device_train_step)

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """Raised when a step produced a NaN/Inf loss; the message is the diagnostic."""


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

def init_variables(model: nn.Module, rng: jax.Array, image_size: int) -> dict:
  variables = model.init({'params': rng, 'dropout': rng}, jnp.zeros((1, image_size, image_size, 3)),
                         train=False)
  variables = dict(variables)
  variables.setdefault('batch_stats', {})
  return variables


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


def evaluate_all(cfg: ml_collections.ConfigDict, *, mesh, model: nn.Module, source,
                 variables: dict, ema_variables: dict | None = None,
                 eval_steps: dict | None = None) -> dict[str, float]:
  """The one evaluation of raw, EMA and fused weights on cfg's eval split.

  'eval/*' for `variables`, 'eval_ema/*' for `ema_variables` when given, 'eval_fused/*' for
  `mobilevis_jax.fuse(model, variables)` when `cfg.eval_fused`. `eval_steps` caches the compiled
  steps across calls under 'model' and 'fused' (the fused model has other shapes).
  """
  eval_steps = {} if eval_steps is None else eval_steps
  runs = [('eval', 'model', model, variables)]
  if ema_variables is not None:
    runs.append(('eval_ema', 'model', model, ema_variables))
  if cfg.eval_fused:
    fused_model, fused_vars = mobilevis_jax.fuse(model, distributed.to_host(variables))
    runs.append(('eval_fused', 'fused', fused_model, distributed.replicate(fused_vars, mesh)))
  results = {}
  for prefix, step_key, m, v in runs:
    if step_key not in eval_steps:
      eval_steps[step_key] = make_eval_step(mesh, model=m, half_precision=cfg.half_precision)
    batches = source.eval_iterator(cfg.data, global_batch_size=cfg.eval_batch_size)
    metrics = evaluate(eval_steps[step_key], v, batches, mesh)
    results.update({f'{prefix}/{k}': x for k, x in metrics.items()})
  return results


def run_evaluations(cfg, *, mesh, model, state: TrainState, eval_step, source,
                    eval_cache: dict) -> dict[str, float]:
  """`evaluate_all` of the training state: raw weights, EMA weights (if kept and cfg.eval_ema)."""
  eval_cache.setdefault('model', eval_step)
  ema = (_variables(state.ema_params, state.ema_batch_stats) if cfg.ema_decay > 0 and cfg.eval_ema
         else None)
  return evaluate_all(cfg, mesh=mesh, model=model, source=source,
                      variables=_variables(state.params, state.batch_stats), ema_variables=ema,
                      eval_steps=eval_cache)


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict[str, float]:
  """Trains `cfg` in `workdir` (resuming from its newest readable checkpoint) and evaluates.

  Returns the final metrics (the last eval plus 'step'). Raises NonFiniteLossError on a NaN/Inf
  loss, after making sure the checkpoints already written are complete.
  """
  from mobilevis_jax import data  # here, not at the top: TensorFlow loads only when a run starts

  mesh = distributed.make_data_mesh(devices)
  n_devices = mesh.devices.size
  gbs = int(cfg.global_batch_size)
  if gbs % n_devices:
    raise ValueError(f'global_batch_size={gbs} is not divisible by the {n_devices} devices')
  if cfg.eval_batch_size % n_devices:
    raise ValueError(f'eval_batch_size={cfg.eval_batch_size} is not divisible by the {n_devices} devices')
  is_main = jax.process_index() == 0

  # --- input ---
  source = data.get_source(cfg.data.name)
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
  variables = jax.jit(functools.partial(init_variables, model, image_size=image_size))(init_rng)
  if cfg.init_from:
    loaded, meta = ckpt_lib.restore_variables(cfg.init_from)
    if meta.get('model_name') not in (None, cfg.model):
      log.warning('init_from holds %s, training %s', meta.get('model_name'), cfg.model)
    variables = ckpt_lib.merge_pretrained(variables, loaded, tuple(cfg.init_exclude))
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
    with ckpt_lib.Preemption(checkpointer) as preemption:
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
        if preemption.reached(step):
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
  from mobilevis_jax import data  # here, not at the top: TensorFlow loads only when a run starts

  mesh = distributed.make_data_mesh(devices)
  source = data.get_source(cfg.data.name)
  info = source.dataset_info(cfg.data)
  variables, meta = ckpt_lib.restore_variables(checkpoint)
  kwargs = dict(meta.get('model_kwargs') or {})
  kwargs.setdefault('num_classes', cfg.num_classes if cfg.num_classes > 0 else int(info['num_classes']))
  if not meta.get('model_kwargs'):
    kwargs.update(cfg.model_kwargs.to_dict())
  model = mobilevis_jax.create_model(meta.get('model_name') or cfg.model, **kwargs)
  variables = distributed.replicate(dict(variables), mesh)
  return evaluate_all(cfg, mesh=mesh, model=model, source=source, variables=variables)
