"""The training loop (flax-examples layout): the jitted steps live in step.py, flags in main.py.

`train_and_evaluate` builds the model, optimiser, state and data source, restores the newest
readable checkpoint, runs the step over the global batches, evaluates (raw / EMA / fused weights,
one helper) and checkpoints; `evaluate_checkpoint` is the evaluation alone. The data source comes
from `mobilevis_jax.data.get_source`, weight merging from `checkpoint.merge_pretrained`, and
preemption (SIGTERM or orbax's signal) is one object, `checkpoint.Preemption`.

Sections: evaluation; initialisation helpers; the loop.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

import mobilevis_jax
from mobilevis_jax import fs
from mobilevis_jax.models.registry import compile_init, lower_init, model_info
from mobilevis_jax.train import best as best_lib
from mobilevis_jax.train import checkpoint as ckpt_lib
from mobilevis_jax.train import distributed, metrics_log, optim

# Re-exported: the step's names are part of this module's API (tests, benchmarks, notebooks).
from mobilevis_jax.train.checkpoint import merge_pretrained  # noqa: F401
from mobilevis_jax.train.step import (  # noqa: F401
  StepOptions,
  TrainState,
  grads_emitter,
  make_eval_step,
  make_targets,
  make_train_step,
  per_device_eval_step,
  per_device_train_step,
)

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """Raised when a step produced a NaN/Inf loss; the message is the diagnostic."""


class ConfigError(ValueError):
  """A run that cannot work as configured, found before the first step; says what to change."""


def evaluate(eval_step: Callable, variables: dict, batches: Iterator[dict], mesh: Mesh
            ) -> dict[str, float]:
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
  # One home for model initialisation: a one-shot compile (see models.registry.init_variables).
  from mobilevis_jax.models.registry import init_variables as one_shot_init
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

def _check_finite(step: int, metrics: dict, last_good: int | None, ckpt_dir: str) -> None:
  """Stops on a non-finite loss, or a non-finite gradient norm (which would poison the parameters
  even when the loss still looks finite, e.g. a NaN input zeroed by a ReLU in the forward pass)."""
  loss, gnorm = metrics['loss'], metrics['grad_norm']
  if math.isfinite(loss) and math.isfinite(gnorm):
    return
  what = (f'loss ({loss})' if not math.isfinite(loss)
          else f'gradient norm ({gnorm}; loss {loss:.4g})')
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


def evaluate_all(cfg: ml_collections.ConfigDict, *, mesh: Mesh, model: nn.Module,
                 source: types.ModuleType, variables: dict, ema_variables: dict | None = None,
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
      eval_steps[step_key] = make_eval_step(mesh, model=m, half_precision=cfg.half_precision,
                                            fast_compile=cfg.xla_fast_compile)
    batches = source.eval_iterator(cfg.data, global_batch_size=cfg.eval_batch_size)
    metrics = evaluate(eval_steps[step_key], v, batches, mesh)
    results.update({f'{prefix}/{k}': x for k, x in metrics.items()})
  return results


def run_evaluations(cfg: ml_collections.ConfigDict, *, mesh: Mesh, model: nn.Module,
                    state: TrainState, eval_step: Callable, source: types.ModuleType,
                    eval_cache: dict) -> dict[str, float]:
  """`evaluate_all` of the training state: raw weights, EMA weights (if kept and cfg.eval_ema)."""
  eval_cache.setdefault('model', eval_step)
  ema = (_variables(state.ema_params, state.ema_batch_stats) if cfg.ema_decay > 0 and cfg.eval_ema
         else None)
  return evaluate_all(cfg, mesh=mesh, model=model, source=source,
                      variables=_variables(state.params, state.batch_stats), ema_variables=ema,
                      eval_steps=eval_cache)


def check_batch_layout(cfg: ml_collections.ConfigDict, n_devices: int) -> None:
  """Raises ValueError, saying what to change, when the batches cannot be split over the mesh."""
  for key in ('global_batch_size', 'eval_batch_size'):
    b = int(cfg[key])
    if b < n_devices or b % n_devices:
      lo = max(n_devices, b - b % n_devices)
      raise ConfigError(
          f'{key}={b} cannot be split over the {n_devices} devices: it must be a positive multiple '
          f'of {n_devices}; set --config.{key}={lo}' + (f' or {lo + n_devices}' if lo != b else '')
          + ' (or run on fewer devices)')


def train_step_layout(cfg: ml_collections.ConfigDict) -> tuple[bool | None, str]:
  """(split, emitter) of the train step (`step.TrainStep`) from `train_step_programs` and
  `xla_cpu_grads_emitter`; split None = the backend's default. A bad value is a ConfigError."""
  programs = cfg.train_step_programs
  if programs not in ('auto', 'split', 'one'):
    raise ConfigError(f"train_step_programs={programs!r}: use 'auto', 'split' or 'one'")
  # An unknown model is build_model's error (with its suggestions), raised right after this.
  family = model_info(cfg.model).family if cfg.model in mobilevis_jax.list_models() else ''
  try:
    emitter = grads_emitter(family, cfg.xla_cpu_grads_emitter)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return (None if programs == 'auto' else programs == 'split'), emitter


def epoch_layout(cfg: ml_collections.ConfigDict, source: types.ModuleType, info: dict,
                 global_batch_size: int, n_devices: int) -> tuple[int, int, np.ndarray | None]:
  """(steps per epoch, total steps, epoch starts or None) of the run, as its sampler defines them.

  The sampler owns what an epoch is (`data.train_schedule`): one pass of global batches for the
  plain stream, DeiT's RASampler length for repeated augmentation, one pass over the data through
  cvnets' variable-batch sampler for multi-scale (epochs of unequal length: their first steps go
  to the lr schedule). `num_train_steps > 0` overrides the total.
  """
  num_examples = int(info['splits'][cfg.data.train_split])
  if not hasattr(source, 'train_schedule'):  # e.g. the synthetic source: a plain stream
    steps_per_epoch = max(num_examples // global_batch_size, 1)
    total = int(math.ceil(cfg.num_epochs * steps_per_epoch))
    starts = None
  else:
    sched = source.train_schedule(cfg.data, num_examples=num_examples,
                                  global_batch_size=global_batch_size, num_devices=n_devices,
                                  seed=int(cfg.seed),
                                  num_epochs=max(int(math.ceil(cfg.num_epochs)), 1))
    if sched.sampler == 'variable_batch':
      starts = sched.epoch_starts
      steps_per_epoch = max(int(round(float(np.mean(sched.epoch_steps)))), 1)
      total = int(sched.total_steps)
    else:
      starts = None
      steps_per_epoch = int(sched.epoch_steps[0])
      total = int(math.ceil(cfg.num_epochs * steps_per_epoch))
  if cfg.num_train_steps > 0:
    total = int(cfg.num_train_steps)
  return steps_per_epoch, total, starts


def build_model(name: str, kwargs: dict, what: str = 'model') -> nn.Module:
  """`create_model(name, **kwargs)` with a config-level error for an unknown name or kwarg."""
  if name not in mobilevis_jax.list_models():
    close = [m for m in mobilevis_jax.list_models() if m.split('_')[0] == name.split('_')[0]][:8]
    raise ConfigError(f'{what} {name!r} is not a registered model' +
                     (f' (same family: {", ".join(close)})' if close else ''))
  try:
    return mobilevis_jax.create_model(name, **kwargs)
  except TypeError as e:
    section = 'model_kwargs' if what == 'model' else 'distillation.teacher_model_kwargs'
    raise ConfigError(f'{what} {name!r} does not accept {section} {sorted(kwargs)}: {e}') from None


def _flat(tree) -> dict[str, Any]:
  """{'params/a/b': leaf} of a variables tree (for shape checks with readable key names)."""
  return {jax.tree_util.keystr(p, simple=True, separator='/'): v
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def load_teacher(cfg: ml_collections.ConfigDict, num_classes: int, image_size: int
                 ) -> tuple[nn.Module, dict]:
  """(teacher model, host variables) for hard distillation, checked against the teacher model.

  The checkpoint must hold the model `distillation.teacher_model` names (when set), with every
  variable of the shape that model has: a wrong teacher fails here, before the first step.
  """
  dcfg = cfg.distillation
  if not dcfg.teacher_checkpoint:
    raise ConfigError('distillation.type=hard needs distillation.teacher_checkpoint (a directory '
                     'written by `mobilevis import`, e.g. of regnety_160)')
  variables, meta = ckpt_lib.restore_variables(dcfg.teacher_checkpoint)
  saved = meta.get('model_name')
  if dcfg.teacher_model and saved and saved != dcfg.teacher_model:
    raise ConfigError(f'distillation.teacher_checkpoint {dcfg.teacher_checkpoint} holds {saved!r}, '
                     f'but distillation.teacher_model={dcfg.teacher_model!r}: point the checkpoint '
                     f'at a {dcfg.teacher_model} import, or set '
                     f'--config.distillation.teacher_model={saved}')
  name = dcfg.teacher_model or saved
  if not name:
    raise ConfigError('set distillation.teacher_model (the teacher checkpoint does not name its '
                      'model)')
  kwargs = dict(meta.get('model_kwargs', {}))
  kwargs.update(dcfg.teacher_model_kwargs.to_dict())
  kwargs.setdefault('num_classes', num_classes)
  if int(kwargs['num_classes']) != int(num_classes):
    raise ConfigError(f'the teacher {name} in {dcfg.teacher_checkpoint} predicts '
                      f'{kwargs["num_classes"]} classes and the student {num_classes}: distil from '
                      'a teacher of the same label set (or set num_classes / '
                      'distillation.teacher_model_kwargs.num_classes)')
  model = build_model(name, kwargs, 'distillation.teacher_model')
  from mobilevis_jax.models.registry import abstract_variables
  expected = _flat(dict(abstract_variables(model, image_size)))
  got = _flat(dict(variables))
  problems = [f'missing {k}' for k in expected if k not in got]
  problems += [f'{k}: checkpoint {tuple(np.shape(got[k]))} vs {name} {tuple(expected[k].shape)}'
               for k in expected
               if k in got and tuple(np.shape(got[k])) != tuple(expected[k].shape)]
  problems += [f'unexpected {k}' for k in got if k not in expected]
  if problems:
    raise ConfigError(f'distillation.teacher_checkpoint {dcfg.teacher_checkpoint} does not hold a '
                     f'{name} with {kwargs}: ' + '; '.join(problems[:8]) +
                     (' ...' if len(problems) > 8 else '') +
                     ' (wrong teacher model, or teacher_model_kwargs such as num_classes)')
  return model, variables


def _host_variables(params, batch_stats):
  return distributed.to_host(_variables(params, batch_stats))


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str, *,
                       devices: Sequence[jax.Device] | None = None,
                       on_step: Callable[[int], None] | None = None) -> dict[str, float]:
  """Trains `cfg` in `workdir` (resuming from its newest readable checkpoint) and evaluates.

  Returns the final metrics (the last eval plus 'step'). Raises NonFiniteLossError on a NaN/Inf
  loss, after making sure the checkpoints already written are complete. `on_step(step)` is called
  after every step (e.g. a progress hook).
  """
  from mobilevis_jax import data  # here, not at the top: TensorFlow loads only when a run starts

  mesh = distributed.make_data_mesh(devices)
  n_devices = mesh.devices.size
  gbs = int(cfg.global_batch_size)
  check_batch_layout(cfg, n_devices)
  split, emitter = train_step_layout(cfg)
  is_main = jax.process_index() == 0

  # --- input ---
  source = data.get_source(cfg.data.name, cfg.data.get('backend', 'tfdata'))
  info = source.dataset_info(cfg.data)
  num_classes = cfg.num_classes if cfg.num_classes > 0 else int(info['num_classes'])
  if cfg.data.train_split not in info['splits']:
    raise ValueError(f"train split {cfg.data.train_split!r} not in dataset splits "
                     f"{list(info['splits'])}")
  steps_per_epoch, total_steps, epoch_starts = epoch_layout(cfg, source, info, gbs, n_devices)
  eval_every = (int(round(cfg.eval_every_epochs * steps_per_epoch)) if cfg.eval_every_epochs > 0
                else 0)

  # --- model and optimiser ---
  model_kwargs = (dict(cfg.model_kwargs.to_dict()) if hasattr(cfg.model_kwargs, 'to_dict')
                  else dict(cfg.model_kwargs))
  model = build_model(cfg.model, {'num_classes': num_classes, **model_kwargs})
  rng = jax.random.PRNGKey(cfg.seed)
  init_rng, state_rng = jax.random.split(rng)
  image_size = int(cfg.data.image_size)
  teacher_model, teacher_vars = None, {}
  if cfg.distillation.type == 'hard':  # checked before the (expensive) student initialisation
    teacher_model, teacher_vars = load_teacher(cfg, num_classes, image_size)
  # Compile ahead, concurrently: XLA compiles a program mostly on one thread, so the model's
  # initialisation, the train state's creation and the step's programs compile in these threads
  # while this one traces the next program (the first step of a fresh run waits for the longest
  # compile, not the sum; RESULTS.md "Time to the first training step").
  compiler = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix='xla-compile')
  init_lowered = lower_init(model, init_rng, image_size)
  abstract_variables = init_lowered.out_info
  schedule = optim.learning_rate_schedule(cfg.optimizer, global_batch_size=gbs,
                                          steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                                          epoch_starts=epoch_starts)
  tx = optim.make_optimizer(cfg.optimizer, schedule, abstract_variables['params'])
  opts = StepOptions.from_config(cfg, num_classes)
  replicated = distributed.replicated(mesh)
  make_state = jax.jit(functools.partial(create_train_state, tx=tx, use_ema=cfg.ema_decay > 0),
                       out_shardings=replicated)
  abstract_state = _abstract(jax.eval_shape(make_state, abstract_variables, rng=state_rng),
                             replicated)

  if teacher_model is not None:
    teacher_vars = distributed.replicate(dict(teacher_vars), mesh)

  # --- checkpoint: auto-resume ---
  # An input iterator with its own state (grain) is saved and restored with every checkpoint.
  data_handler = getattr(source, 'IteratorStateHandler', None)
  checkpointer = ckpt_lib.TrainCheckpointer(workdir, keep=cfg.checkpoint_keep,
                                            use_async=cfg.checkpoint_async,
                                            data_handler=data_handler and data_handler())
  restored = checkpointer.restore_latest(abstract_state.as_dict())
  last_good = None
  fresh = None  # a fresh run's state, still compiling
  if restored is not None:  # a resumed run never initialises
    state_dict, meta, last_good = restored
    state = TrainState(**state_dict)
    if int(meta.get('data_position', last_good)) != last_good:
      raise ValueError(f'checkpoint {last_good} has data position {meta.get("data_position")}')
    if is_main:
      print(f'resumed from step {last_good} ({checkpointer.directory})', flush=True)
    start_step = int(distributed.to_host(state.step))
  else:
    def fresh_state() -> TrainState:
      variables = compile_init(init_lowered)(init_rng)
      if cfg.init_from:
        loaded, meta = ckpt_lib.restore_variables(cfg.init_from)
        if meta.get('model_name') not in (None, cfg.model):
          log.warning('init_from holds %s, training %s', meta.get('model_name'), cfg.model)
        variables = ckpt_lib.merge_pretrained(variables, loaded, tuple(cfg.init_exclude))
      return make_state(variables, rng=state_rng)

    fresh = compiler.submit(fresh_state)
    state, start_step = abstract_state, 0

  train_step = make_train_step(mesh, model=model, tx=tx, schedule=schedule, opts=opts,
                               teacher_model=teacher_model, fast_compile=cfg.xla_fast_compile,
                               split=split, emitter=emitter)
  if is_main and train_step.split:
    log.info('train step: forward + backward and the update as two programs; forward + '
             'backward with the %s fusion emitter (%s)', train_step.emitter, cfg.model)
  eval_step = make_eval_step(mesh, model=model, half_precision=cfg.half_precision,
                             fast_compile=cfg.xla_fast_compile)
  eval_cache: dict = {}
  writer = metrics_log.MetricWriter(workdir, tensorboard=cfg.tensorboard)
  bar = metrics_log.ProgressBar(total=total_steps, initial=start_step, batch_size=gbs,
                                enabled=cfg.progress_bar)
  meta_base = {'model_name': cfg.model,
               'model_kwargs': {'num_classes': num_classes, **model_kwargs}}
  train_iter = source.train_iterator(cfg.data, global_batch_size=gbs, seed=cfg.seed,
                                     start_step=start_step, num_devices=n_devices)
  if data_handler is not None and last_good is not None:
    # The saved state places the iterator (and is checked against this run's data stream); a
    # checkpoint without one (written with the tf.data backend) keeps the start_step position.
    checkpointer.restore_data(last_good, train_iter.checkpoint_restore_args())
    if train_iter.step != start_step:
      raise ValueError(f'checkpoint {last_good}: the input iterator state is at step '
                       f'{train_iter.step}, the training state at {start_step}')
  first_batch = None  # taken ahead, to compile the step for its shape while the state is built
  if start_step < total_steps:
    first_batch = distributed.global_batch(next(train_iter), mesh)
    train_step.compile(state, first_batch, teacher_vars, executor=compiler)
  if fresh is not None:
    state = fresh.result()
  del fresh
  tracker = (best_lib.BestTracker(workdir, keep_best_ema=cfg.keep_best_ema, meta=meta_base)
             if cfg.track_best else None)

  def track(step_no: int, res: dict) -> dict:
    """Adds best/* to `res` (and saves the best variables) when best tracking is on."""
    if tracker is None:
      return res
    ema = (_host_variables(state.ema_params, state.ema_batch_stats)
           if cfg.ema_decay > 0 and 'eval_ema/top1' in res else None)
    raw = _host_variables(state.params, state.batch_stats)
    return {**res, **tracker.update(step_no, res, raw, ema)}

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
    data_args = train_iter.checkpoint_save_args() if data_handler is not None else None
    if checkpointer.save(step_no, state.as_dict(), meta, force=force, data_args=data_args):
      last_good = step_no
    writer.flush()  # a remote work directory's logs are uploaded with each checkpoint

  try:
    with ckpt_lib.Preemption(checkpointer) as preemption:
      step = start_step
      while step < total_steps:
        if first_batch is not None:
          batch, first_batch = first_batch, None
        else:
          batch = distributed.global_batch(next(train_iter), mesh)
        state, metrics = train_step(state, batch, teacher_vars)
        step += 1
        pending.append((step, metrics))
        if on_step is not None:
          on_step(step)
        if step % cfg.log_every_steps == 0 or step == total_steps:
          last = flush()
          rate = bar.update(step, last[1]['loss'])
          writer.write(step, {**{f'train/{k}': v for k, v in last[1].items()},
                              'train/images_per_sec': rate})
        if step % cfg.checkpoint_every_steps == 0 and step < total_steps:
          save(step)
        if eval_every and step % eval_every == 0 and step < total_steps:
          flush()
          results = track(step, run_evaluations(cfg, mesh=mesh, model=model, state=state,
                                                eval_step=eval_step, source=source,
                                                eval_cache=eval_cache))
          writer.write(step, results)
          bar.write(f'step {step}: ' + ', '.join(f'{k}={v:.4f}' for k, v in results.items()
                                                 if 'count' not in k))
        if preemption.reached(step):
          bar.write(f'preemption signal: saving step {step} and exiting')
          save(step, force=True)
          checkpointer.wait()
          return {'step': step, 'preempted': 1.0}
      flush()
      if last_good != total_steps:
        save(total_steps, force=True)
      results = track(total_steps, run_evaluations(cfg, mesh=mesh, model=model, state=state,
                                                   eval_step=eval_step, source=source,
                                                   eval_cache=eval_cache))
      writer.write(total_steps, results)
      bar.write(f'final (step {total_steps}): '
                + ', '.join(f'{k}={v:.4f}' for k, v in results.items() if 'count' not in k))
  finally:
    compiler.shutdown(wait=False, cancel_futures=True)
    checkpointer.wait()
    bar.close()
    writer.close()
  return {'step': float(total_steps), **results}


def evaluate_checkpoint(cfg: ml_collections.ConfigDict, checkpoint: str, *,
                        devices: Sequence[jax.Device] | None = None) -> dict[str, float]:
  """Evaluates a variables checkpoint or a work directory's newest checkpoint on cfg's eval split
  (and after `fuse` when cfg.eval_fused). The model is built from the checkpoint's meta when it
  names one, else from cfg."""
  from mobilevis_jax import data  # here, not at the top: TensorFlow loads only when a run starts

  mesh = distributed.make_data_mesh(devices)
  variables, meta = ckpt_lib.restore_variables(checkpoint)
  if not fs.isdir(ckpt_lib.checkpoint_dir(checkpoint)):
    # Weights from elsewhere (`mobilevis import`): their own eval preprocessing (pretrained_cfg)
    # wherever the recipe keeps the data defaults. A work directory keeps its recipe's transform.
    from mobilevis_jax.train.eval_transform import eval_data_config
    cfg = cfg.copy_and_resolve_references()
    cfg.data = eval_data_config(meta.get('model_name') or cfg.model, cfg.data)
  source = data.get_source(cfg.data.name)
  info = source.dataset_info(cfg.data)
  kwargs = dict(meta.get('model_kwargs') or {})
  kwargs.setdefault('num_classes',
                    cfg.num_classes if cfg.num_classes > 0 else int(info['num_classes']))
  if not meta.get('model_kwargs'):
    kwargs.update(cfg.model_kwargs.to_dict())
  model = mobilevis_jax.create_model(meta.get('model_name') or cfg.model, **kwargs)
  variables = distributed.replicate(dict(variables), mesh)
  return evaluate_all(cfg, mesh=mesh, model=model, source=source, variables=variables)
