"""What the tap barrier of the shift depthwise path buys: compile time and batch-1 latency.

``layers.kernels`` computes a depthwise convolution on the CPU as ``kh * kw`` shifted
multiply-adds over the padded input, and puts an ``optimization_barrier`` on that padded input.
Without it XLA fuses every tap's slice into the producer of the input (the previous block's
residual add, a bias, an activation) and recomputes the producer per tap; down a stack of
residual blocks the recomputation compounds into one loop fusion over many blocks. This script
times both programs in one process, for each model: the forward at batch 1, default resolution,
eval mode (fused where the family has a fused form, as ``mobilevis latency`` runs it), its XLA
compile time and the median of ``--runs`` timed calls (p10-p90 in brackets).

    python experiments/bench/bench_tap_barrier.py
    python experiments/bench/bench_tap_barrier.py --models repvit_m2_3,mobilevig_s --runs 30

The last line is JSON with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

DEFAULT_MODELS = ('repvit_m0_9,repvit_m1_0,repvit_m1_1,repvit_m2_3,mobilevig_s,ghostnet_100,'
                  'parameternet_600m,parcnet_s,parc_mobilenetv2')


def _forward(name: str):
  from mobilevis_jax.latency import random_variables
  from mobilevis_jax.models import registry

  variables = random_variables(name)
  model = registry.create_model(name)
  try:
    model, variables = registry.fuse(model, variables)
  except (KeyError, ValueError, NotImplementedError):
    pass  # no fused form for this family
  return model, variables, registry.model_info(name).default_resolution


def time_program(model, variables, hw, runs: int, barrier: bool) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from mobilevis_jax.layers import kernels

  kernels._TAP_BARRIER = barrier
  try:
    x = jnp.zeros((1, *hw, 3), jnp.float32)
    variables = jax.device_put(variables)
    t0 = time.perf_counter()
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    compile_s = time.perf_counter() - t0
  finally:
    kernels._TAP_BARRIER = True
  fn(variables, x).block_until_ready()
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn(variables, x).block_until_ready()
    times.append(1e3 * (time.perf_counter() - t0))
  p10, p50, p90 = np.percentile(times, [10, 50, 90])
  return {'compile_s': compile_s, 'ms': float(p50), 'p10': float(p10), 'p90': float(p90)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--models', default=DEFAULT_MODELS, help='comma-separated model names')
  p.add_argument('--runs', type=int, default=20, help='timed calls per program')
  args = p.parse_args(argv)
  if args.runs < 1:
    p.error('--runs must be >= 1')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  from mobilevis_jax.models import registry

  models = [m for m in args.models.split(',') if m]
  unknown = [m for m in models if m not in registry.list_models()]
  if unknown:
    p.error(f'unknown --models {unknown}')
  print(f"{'model':18s} {'res':>7s} | {'barrier: compile':>16s} {'batch 1':>24s} | "
        f"{'none: compile':>13s} {'batch 1':>24s} | speed-up run, compile", flush=True)
  rows = []
  for name in models:
    model, variables, res = _forward(name)
    hw = (res, res) if isinstance(res, int) else tuple(res)
    # Alternate the order between models so neither program always runs on a warmer machine.
    order = (True, False) if len(rows) % 2 == 0 else (False, True)
    r = {b: time_program(model, variables, hw, args.runs, b) for b in order}
    on, off = r[True], r[False]
    row = {'model': name, 'resolution': list(hw), 'barrier': on, 'no_barrier': off,
           'run_speedup': off['ms'] / on['ms'],
           'compile_speedup': off['compile_s'] / on['compile_s']}
    rows.append(row)
    cell = lambda t: f"{t['ms']:8.1f} ms ({t['p10']:6.1f}-{t['p90']:6.1f})"  # noqa: E731
    print(f"{name:18s} {hw[0]:3d}x{hw[1]:<3d} | {on['compile_s']:14.1f} s {cell(on)} | "
          f"{off['compile_s']:11.1f} s {cell(off)} | {row['run_speedup']:5.2f}x "
          f"{row['compile_speedup']:5.2f}x", flush=True)
  print(json.dumps({'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count(),
                    'load_avg_1min': os.getloadavg()[0], 'runs': args.runs, 'rows': rows}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
