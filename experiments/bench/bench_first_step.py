"""Time to the first training step: model init + train-step compile + one step, per recipe model.

A user who starts ``mobilevis train`` waits for XLA before the first step: the variables are
initialised, the train state is built, the data-parallel step is compiled and run once. This
script measures those phases the way the trainer runs them (``train.init_variables``,
``train.create_train_state``, ``train.make_train_step`` on a one-device mesh, AdamW + AGC as
the recipes), each model in a fresh process so that no compilation is reused. Three modes
(``--init``): ``trainer`` runs ``train.train_and_evaluate`` itself on synthetic data and times it
from the call to its first finished step (what the trainer does now: the init, the state and
the step's two programs compiled concurrently, see ``train.TrainStep``); ``one_shot`` and ``jit``
replay the trainer's earlier sequence phase by phase (init, then state, then the step as one
program), ``one_shot`` with the initialisation the trainer uses
(``models.registry.init_variables``: ``model.init`` compiled as a one-shot program, at XLA
optimisation level 0; see its docstring), ``jit`` with the one it used before that
(``jax.jit(model.init)``: every initialiser of the network in one XLA program, optimised like any
other).

    python experiments/bench/bench_first_step.py                     # every recipe model, 64 px
    python experiments/bench/bench_first_step.py --models parameternet_600m --resolution 64
    python experiments/bench/bench_first_step.py --init one_shot,trainer  # before/after the split

Printed per model and mode: ``init_s`` (until the variables are on the device), ``state_s``
(optimizer state, jitted), ``step_s`` (first step: compile + run), ``total_s`` (``trainer``: only
the total, its phases overlap), and
for the old method the split of ``init_s`` into tracing/lowering and XLA compilation plus the
number of random-number ops (``random_bits``) in the init program, which is what its compile
time grows with. The last line is JSON with every number and the ratio old / new total.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
sys.path.insert(0, ROOT)

# The models of the recipes in experiments/configs/ plus the other families' trained variants.
MODELS = ('repvit_m1_1', 'mobilevig_s', 'parameternet_600m', 'parcnet_s', 'ghostnet_100',
          'parc_convnext_xt', 'parc_resnet50', 'parc_mobilenetv2')
INITS = ('jit', 'one_shot', 'trainer')
# --optimizer recipe: the models that have a shipped recipe (mobilevis_jax/configs/) train with its
# optimizer and step options; the others with AdamW alone (base_config).
RECIPES = {'repvit_m1_1': 'repvit_m1_1_in1k', 'mobilevig_s': 'mobilevig_s_in1k',
           'parameternet_600m': 'parameternet_600m_in22k', 'parcnet_s': 'parcnet_s_in1k'}
OPTIMIZERS = ('agc', 'recipe')


def _train_config(model_name: str, optimizer: str):
  """base_config with the optimizer under test: 'agc' = AdamW (wd 0.05) + AGC 0.02 for every model
  (RepViT's recipe; the earlier tables' setting), 'recipe' = the model's recipe's optimizer, label
  smoothing, mixup/cutmix and EMA (no teacher: its own program would be measured as well)."""
  from mobilevis_jax.train.config import base_config, load_config
  cfg = base_config()
  if optimizer == 'agc':
    cfg.optimizer.agc_clip = 0.02
    cfg.optimizer.weight_decay = 0.05
  elif model_name in RECIPES:
    recipe = load_config(RECIPES[model_name])
    cfg.optimizer = recipe.optimizer
    cfg.ema_decay = recipe.ema_decay
    for key in ('label_smoothing', 'mixup_alpha', 'cutmix_alpha', 'mixup_switch_prob'):
      if key in recipe.data:
        cfg.data[key] = recipe.data[key]
  return cfg


def _count_random_bits(jaxpr) -> int:
  """Number of ``random_bits`` primitives in a (closed) jaxpr, sub-jaxprs included."""
  import jax
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'random_bits':
      n += 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          n += _count_random_bits(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          n += _count_random_bits(sub)
  return n


def _jit_init(model, rng, resolution: int) -> dict:
  """The trainer's init before: model.init traced into one ``jax.jit`` (compiled as usual)."""
  import jax.numpy as jnp
  variables = dict(model.init({'params': rng, 'dropout': rng},
                              jnp.zeros((1, resolution, resolution, 3)), train=False))
  variables.setdefault('batch_stats', {})
  return variables


def worker(model_name: str, init: str, resolution: int, batch: int, optimizer: str) -> dict:
  """One model, one init method, in this (fresh) process."""
  t_start = time.perf_counter()
  import jax
  import numpy as np

  import mobilevis_jax
  from mobilevis_jax.models import registry
  from mobilevis_jax.train import distributed, optim, train
  cfg = _train_config(model_name, optimizer)
  model = mobilevis_jax.create_model(model_name, num_classes=1000)
  mesh = distributed.make_data_mesh(jax.devices()[:1])
  rng = jax.random.PRNGKey(0)
  t_import = time.perf_counter() - t_start
  out = {'model': model_name, 'init': init, 'resolution': resolution, 'batch': batch,
         'optimizer': optimizer,
         'import_s': t_import}

  t0 = time.perf_counter()
  if init == 'jit':
    # What the trainer did: one jit of model.init; lowering and compilation timed apart.
    fn = jax.jit(lambda r: _jit_init(model, r, resolution))
    lowered = fn.lower(rng)
    out['init_lower_s'] = time.perf_counter() - t0
    t1 = time.perf_counter()
    compiled = lowered.compile()
    out['init_compile_s'] = time.perf_counter() - t1
    variables = compiled(rng)
    out['random_bits_ops'] = _count_random_bits(
        jax.make_jaxpr(lambda r: _jit_init(model, r, resolution))(rng).jaxpr)
  else:
    variables = registry.init_variables(model, rng, resolution)
  jax.block_until_ready(variables)
  out['init_s'] = time.perf_counter() - t0

  t0 = time.perf_counter()
  schedule = optim.learning_rate_schedule(cfg.optimizer, global_batch_size=batch,
                                          steps_per_epoch=100, total_steps=1000)
  tx = optim.make_optimizer(cfg.optimizer, schedule, variables['params'])
  state = jax.jit(lambda v, r: train.create_train_state(v, tx, r, use_ema=cfg.ema_decay > 0),
                  out_shardings=distributed.replicated(mesh))(variables, jax.random.PRNGKey(1))
  jax.block_until_ready(state)
  out['state_s'] = time.perf_counter() - t0

  t0 = time.perf_counter()
  # One program, compiled after the state exists: the trainer's sequence before the split step.
  step = train.make_train_step(mesh, model=model, tx=tx, schedule=schedule,
                               opts=train.StepOptions.from_config(cfg, 1000), split=False)
  data = np.random.default_rng(0)
  gbatch = distributed.global_batch(
      {'image': data.normal(size=(batch, resolution, resolution, 3)).astype(np.float32),
       'label': data.integers(0, 1000, size=batch).astype(np.int32)}, mesh)
  state, metrics = step(state, gbatch, {})
  loss = float(jax.device_get(metrics['loss']))
  out['step_s'] = time.perf_counter() - t0
  if not np.isfinite(loss):
    raise RuntimeError(f'{model_name}: non-finite first loss {loss}')
  out['loss'] = loss
  out['total_s'] = out['init_s'] + out['state_s'] + out['step_s']
  return out


class _FirstStep(Exception):
  pass


def trainer_worker(model_name: str, resolution: int, batch: int, optimizer: str) -> dict:
  """`train.train_and_evaluate` itself, on synthetic data, until its first step has finished."""
  t_start = time.perf_counter()
  import tempfile

  import jax

  from mobilevis_jax.train import train
  cfg = _train_config(model_name, optimizer)
  cfg.model = model_name
  cfg.num_classes = 1000
  cfg.data.name = 'synthetic'
  cfg.data.image_size = resolution
  with cfg.data.unlocked():
    cfg.data.synthetic_num_classes = 1000
    cfg.data.synthetic_num_train = 4 * batch
    cfg.data.synthetic_num_eval = batch
  cfg.global_batch_size = batch
  cfg.num_train_steps = 2
  cfg.eval_every_epochs = 0.0
  cfg.progress_bar = False
  cfg.tensorboard = False
  cfg.checkpoint_every_steps = 1000
  out = {'model': model_name, 'init': 'trainer', 'resolution': resolution, 'batch': batch,
         'optimizer': optimizer,
         'import_s': time.perf_counter() - t_start}
  t0 = time.perf_counter()

  def on_step(step: int) -> None:
    for x in jax.live_arrays():  # the step's outputs exist: it has finished
      x.block_until_ready()
    out['total_s'] = time.perf_counter() - t0
    raise _FirstStep

  with tempfile.TemporaryDirectory() as workdir:
    try:
      train.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1], on_step=on_step)
    except _FirstStep:
      pass
  if 'total_s' not in out:
    raise RuntimeError(f'{model_name}: the trainer returned without a first step')
  out['init_s'] = out['state_s'] = out['step_s'] = float('nan')  # overlapped: only the total
  return out


def run_in_subprocess(model_name: str, init: str, resolution: int, batch: int,
                      optimizer: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'),
             PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
             TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('JAX_COMPILATION_CACHE_DIR', None)  # a persistent cache would hide the compile time
  cmd = [sys.executable, os.path.abspath(__file__), '--worker', '--models', model_name,
         '--init', init, '--resolution', str(resolution), '--batch', str(batch),
         '--optimizer', optimizer]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f'{model_name}/{init} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--models', default=','.join(MODELS), help='comma-separated model names')
  p.add_argument('--init', default=','.join(INITS), help=f'comma-separated, from {INITS}')
  p.add_argument('--resolution', type=int, default=64)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--optimizer', default='agc', choices=OPTIMIZERS,
                 help="'agc': AdamW + AGC for every model; 'recipe': each model's recipe's")
  p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  models = [m for m in args.models.split(',') if m]
  inits = [i for i in args.init.split(',') if i]
  bad = [i for i in inits if i not in INITS]
  if bad:
    p.error(f'unknown --init {bad}; choose from {INITS}')
  if args.worker:
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    if inits[0] == 'trainer':
      print(json.dumps(trainer_worker(models[0], args.resolution, args.batch, args.optimizer)))
    else:
      print(json.dumps(worker(models[0], inits[0], args.resolution, args.batch, args.optimizer)))
    return 0

  rows = []
  for name in models:
    per = {}
    for init in inits:
      r = run_in_subprocess(name, init, args.resolution, args.batch, args.optimizer)
      per[init] = r
      extra = ''
      if init == 'jit':
        extra = (f"  (lower {r['init_lower_s']:.1f} s, XLA compile {r['init_compile_s']:.1f} s, "
                 f"{r['random_bits_ops']} random_bits ops)")
      print(f"{name:18s} {init:8s} init {r['init_s']:7.1f} s  state {r['state_s']:5.1f} s  "
            f"first step {r['step_s']:6.1f} s  total {r['total_s']:7.1f} s{extra}", flush=True)
    row = {'model': name, **per}
    if 'one_shot' in per and 'trainer' in per:
      row['ratio_total_one_shot_over_trainer'] = (per['one_shot']['total_s']
                                                  / per['trainer']['total_s'])
      print(f"{name:18s} sequential one program / trainer: "
            f"{row['ratio_total_one_shot_over_trainer']:.2f}x", flush=True)
    if 'jit' in per and 'one_shot' in per:
      row['ratio_total_jit_over_one_shot'] = per['jit']['total_s'] / per['one_shot']['total_s']
      row['ratio_init_jit_over_one_shot'] = per['jit']['init_s'] / per['one_shot']['init_s']
      print(f"{name:18s} old / new: init {row['ratio_init_jit_over_one_shot']:.1f}x, "
            f"total {row['ratio_total_jit_over_one_shot']:.2f}x", flush=True)
    rows.append(row)
  print(json.dumps({'resolution': args.resolution, 'batch': args.batch, 'optimizer': args.optimizer,
                    'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count(),
                    'load_avg_1min': os.getloadavg()[0], 'rows': rows}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
