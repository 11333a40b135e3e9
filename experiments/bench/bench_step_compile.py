"""Where the first training step's time goes: tracing, lowering and XLA compilation, by variant.

``bench_first_step.py`` times what a user waits for (init, optimizer state, first step); this
script takes the first step apart, to see what bounds it. Each variant runs in a fresh process
(no compilation reused): the trainer's data-parallel step (``train.make_train_step`` on a
one-device mesh, AdamW + AGC as the recipes) is traced, lowered to StableHLO and compiled by
XLA, and then run once. For each phase it prints the wall time and the process's CPU time
(every thread of the process; on a shared machine the CPU time is the steadier measure of the
work), the size of the optimised program (HLO lines, fusions) and the first run.

Variants (``--variants``, comma-separated):

* ``default``: the trainer as it runs (depthwise convolutions on the ``kernels.KERNEL_TABLE``
  path, ``'shift'`` on CPU; AGC on);
* ``dw_xla``: depthwise convolutions through XLA's grouped convolution instead;
* ``dyn_vmap``: ParameterNet's per-sample (dynamic) convolutions through ``'vmap'`` (XLA's conv
  vmapped over the batch; the GPU/TPU path) instead of the CPU table's ``'einsum'``/``'shift'``;
* ``no_agc``: without adaptive gradient clipping (the optimizer's per-leaf norms);
* ``flat_adamw``: without AGC, and AdamW applied to all parameters raveled into one vector
  (``optax.flatten``; no weight-decay mask): what an optimizer over one flat buffer would cost;
* ``grad_only``: only ``jax.grad`` of the loss (forward + backward, no optimizer, no shard_map);
* ``opt0`` / ``fast_compile``: the default step with XLA's backend optimisation level 0
  (``--xla_backend_optimization_level=0``) / XLA:CPU's ``FAST_COMPILE`` preset, i.e. compile
  time traded for run time; ``step`` (the median of the next runs) shows the price;
* ``legacy_emitters``: the default step with XLA:CPU's elemental IR emitter for its fusions
  (``--xla_cpu_use_fusion_emitters=false``) instead of the MLIR fusion emitters;
* ``split`` / ``split_elemental``: the step as the trainer runs it on CPU now, two programs
  (forward + backward, then the update; ``train.TrainStep``) compiled concurrently in two
  threads, the first with XLA's MLIR fusion emitters / the elemental emitter. ``trace`` is the
  tracing and lowering of both, ``compile`` the wall time until both are compiled (``compile_cpu``
  adds both threads); every other variant is the step as one program;
* ``cached``: the default step twice, each in a fresh process sharing one JAX persistent
  compilation cache directory (a temporary one): the second process is what a resumed run or a
  re-run of the same configuration waits for when ``jax_compilation_cache_dir`` is set.

    python experiments/bench/bench_step_compile.py                          # repvit_m1_1, 64 px
    python experiments/bench/bench_step_compile.py --models ghostnet_100 --variants default,dw_xla

The last line is JSON with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
sys.path.insert(0, ROOT)

VARIANTS = ('default', 'dw_xla', 'dyn_vmap', 'no_agc', 'flat_adamw', 'grad_only', 'cached', 'opt0',
            'fast_compile', 'legacy_emitters', 'split', 'split_elemental')
# Variants that are the default step under XLA options (set in the worker's environment, as
# XLA reads them once, when the backend starts).
XLA_FLAG_VARIANTS = {
    'opt0': '--xla_backend_optimization_level=0',      # LLVM's -O0 for the generated kernels
    'fast_compile': '--xla_cpu_opt_preset=FAST_COMPILE',  # XLA:CPU's compile-time preset
  # XLA:CPU's older elemental IR emitter for loop/reduce fusions instead of the MLIR fusion
  # emitters (a per-fusion MLIR pipeline before LLVM).
  'legacy_emitters': '--xla_cpu_use_fusion_emitters=false',
}
STEADY_RUNS = 5


def _phases(fn, *args) -> tuple[dict, object]:
  """Trace, lower and compile the jitted ``fn`` at ``args``, timing each phase (wall and CPU)."""
  out = {}
  clocks = [(time.perf_counter(), time.process_time())]
  traced = fn.trace(*args)
  clocks.append((time.perf_counter(), time.process_time()))
  lowered = traced.lower()
  clocks.append((time.perf_counter(), time.process_time()))
  compiled = lowered.compile()
  clocks.append((time.perf_counter(), time.process_time()))
  for i, phase in enumerate(('trace', 'lower', 'compile')):
    out[f'{phase}_s'] = clocks[i + 1][0] - clocks[i][0]
    out[f'{phase}_cpu_s'] = clocks[i + 1][1] - clocks[i][1]
  hlo = compiled.as_text()
  out['hlo_lines'] = hlo.count('\n')
  out['fusions'] = len(re.findall(r'^\s*(?:ROOT )?%\S+ = \S+ fusion\(', hlo, flags=re.M))
  return out, compiled


def _split_phases(step, *args) -> dict:
  """Lower the TrainStep's programs, then compile them concurrently (as the trainer does)."""
  out = {}
  clocks = [(time.perf_counter(), time.process_time())]
  lowered = step.lower(*args)
  clocks.append((time.perf_counter(), time.process_time()))
  step.compile(*args, lowered=lowered)  # concurrently, one thread per program
  clocks.append((time.perf_counter(), time.process_time()))
  compiled = step.executables(args[1])
  for i, phase in enumerate(('trace', 'compile')):
    out[f'{phase}_s'] = clocks[i + 1][0] - clocks[i][0]
    out[f'{phase}_cpu_s'] = clocks[i + 1][1] - clocks[i][1]
  out['lower_s'] = out['lower_cpu_s'] = 0.0  # included in trace_s
  hlo = ''.join(c.as_text() for c in compiled)
  out['hlo_lines'] = hlo.count('\n')
  out['fusions'] = len(re.findall(r'^\s*(?:ROOT )?%\S+ = \S+ fusion\(', hlo, flags=re.M))
  return out


def worker(model_name: str, variant: str, resolution: int, batch: int) -> dict:
  """One model, one variant, in this (fresh) process."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import mobilevis_jax
  from mobilevis_jax.layers import kernels
  from mobilevis_jax.models import registry
  from mobilevis_jax.train import distributed, optim, train
  from mobilevis_jax.train.config import base_config

  if variant == 'dw_xla':
    kernels.set_default('depthwise', 'xla')
  if variant == 'dyn_vmap':
    kernels.set_default('dynamic_1x1', 'vmap')
    kernels.set_default('dynamic_kxk', 'vmap')
  cfg = base_config()
  cfg.optimizer.agc_clip = 0.0 if variant in ('no_agc', 'flat_adamw') else 0.02
  cfg.optimizer.weight_decay = 0.05
  model = mobilevis_jax.create_model(model_name, num_classes=1000)
  # Filled by shape: the init's own compile is bench_first_step.py's subject, not this one's.
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(scale=0.02, size=s.shape), s.dtype),
      dict(registry.abstract_variables(model, resolution)))
  variables.setdefault('batch_stats', {})
  images = rng.normal(size=(batch, resolution, resolution, 3)).astype(np.float32)
  labels = rng.integers(0, 1000, size=batch).astype(np.int32)
  out = {'model': model_name, 'variant': variant, 'resolution': resolution, 'batch': batch}

  if variant == 'grad_only':
    def loss(params):
      logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                              images, train=True, mutable=['batch_stats'],
                              rngs={'dropout': jax.random.PRNGKey(0)})
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
    fn = jax.jit(jax.grad(loss))
    phases, compiled = _phases(fn, variables['params'])
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(variables['params']))
  else:
    mesh = distributed.make_data_mesh(jax.devices()[:1])
    schedule = optim.learning_rate_schedule(cfg.optimizer, global_batch_size=batch,
                                            steps_per_epoch=100, total_steps=1000)
    tx = optim.make_optimizer(cfg.optimizer, schedule, variables['params'])
    if variant == 'flat_adamw':
      import optax
      tx = optax.flatten(optax.adamw(schedule, weight_decay=cfg.optimizer.weight_decay))
    state = jax.jit(lambda v, r: train.create_train_state(v, tx, r, use_ema=False),
                    out_shardings=distributed.replicated(mesh))(variables, jax.random.PRNGKey(1))
    split = variant in ('split', 'split_elemental')
    step = train.make_train_step(mesh, model=model, tx=tx, schedule=schedule,
                                 opts=train.StepOptions.from_config(cfg, 1000), split=split,
                                 emitter='elemental' if variant == 'split_elemental' else 'mlir')
    gbatch = distributed.global_batch({'image': images, 'label': labels}, mesh)
    if split:
      phases = _split_phases(step, state, gbatch, {})
      compiled = step
    else:
      phases, compiled = _phases(step.programs[0], state, gbatch, {})
    t0 = time.perf_counter()
    state, metrics = compiled(state, gbatch, {})
    loss = float(jax.device_get(metrics['loss']))
    if not np.isfinite(loss):
      raise RuntimeError(f'{model_name}/{variant}: non-finite first loss {loss}')
  out['run_s'] = time.perf_counter() - t0
  if variant != 'grad_only':
    # The steady-state step: what a compile-time option costs over a run.
    times = []
    for _ in range(STEADY_RUNS):
      t0 = time.perf_counter()
      state, metrics = compiled(state, gbatch, {})
      jax.block_until_ready(metrics['loss'])
      times.append(time.perf_counter() - t0)
    out['step_s'] = float(np.median(times))
  out['xla_flags'] = os.environ.get('XLA_FLAGS', '')
  out.update(phases)
  out['total_s'] = out['trace_s'] + out['lower_s'] + out['compile_s'] + out['run_s']
  return out


def run_in_subprocess(model_name: str, variant: str, resolution: int, batch: int,
                      cache_dir: str | None = None) -> dict:
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'),
             PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
             TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  if variant in XLA_FLAG_VARIANTS:
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + XLA_FLAG_VARIANTS[variant]).strip()
  if cache_dir:
    env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
  cmd = [sys.executable, os.path.abspath(__file__), '--worker', '--models', model_name,
         '--variants', variant, '--resolution', str(resolution), '--batch', str(batch)]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f'{model_name}/{variant} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_row(r: dict, label: str, base: dict | None) -> None:
  ratio = f"  {r['total_s'] / base['total_s']:5.2f}x default" if base else ''
  step = r.get('step_s', float('nan'))
  print(f"{r['model']:16s} {label:14s} trace {r['trace_s']:5.1f} s ({r['trace_cpu_s']:5.1f} cpu)"
        f"  lower {r['lower_s']:5.1f} s  compile {r['compile_s']:6.1f} s "
        f"({r['compile_cpu_s']:6.1f} cpu)  run {r['run_s']:5.1f} s  step {step:5.2f} s"
        f"  total {r['total_s']:6.1f} s"
        f"  HLO {r['hlo_lines']:6d} lines, {r['fusions']:5d} fusions{ratio}", flush=True)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--models', default='repvit_m1_1', help='comma-separated model names')
  p.add_argument('--variants', default=','.join(VARIANTS), help=f'comma-separated, from {VARIANTS}')
  p.add_argument('--resolution', type=int, default=64)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  models = [m for m in args.models.split(',') if m]
  variants = [v for v in args.variants.split(',') if v]
  bad = [v for v in variants if v not in VARIANTS]
  if bad:
    p.error(f'unknown --variants {bad}; choose from {VARIANTS}')
  if args.worker:
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    print(json.dumps(worker(models[0], variants[0], args.resolution, args.batch)))
    return 0

  rows = []
  for name in models:
    base = None
    for variant in variants:
      if variant == 'cached':
        with tempfile.TemporaryDirectory(prefix='mobilevis_xla_cache_') as cache:
          cold = run_in_subprocess(name, 'default', args.resolution, args.batch, cache)
          warm = run_in_subprocess(name, 'default', args.resolution, args.batch, cache)
        for label, r in (('cache cold', cold), ('cache warm', warm)):
          _print_row(r, label, base)
          rows.append({**r, 'variant': label})
        continue
      r = run_in_subprocess(name, variant, args.resolution, args.batch)
      _print_row(r, variant, base)
      base = base or (r if variant == 'default' else None)
      rows.append(r)
  print(json.dumps({'resolution': args.resolution, 'batch': args.batch,
                    'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count(),
                    'load_avg_1min': os.getloadavg()[0], 'rows': rows}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
