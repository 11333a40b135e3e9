"""What ``kernels.shared_pad`` buys the unfused RepViT forward: run time, compile time, tap slices.

RepViT's unfused token mixer is ``BN(dw3x3-BN(x) + dw1x1(x) + x)``. When the 1x1 and identity
branches read ``x`` itself, XLA's CPU compiler fuses the producer of ``x`` (the previous block's
residual sum, which reads *that* block's ``x``) into each of them and recomputes the whole residual
stack of the stage in every block, in spite of the tap barrier on the padded map; with
``shared_pad`` every branch reads ``x`` through the one materialised padded map. This script
compiles and times both programs in one process (``kernels._SHARED_PAD`` on / off; "off" is the
program before the change: the identity and 1x1 branches read ``x``), and the fused model as the
reference the unfused one is compared with: jitted ``apply(train=False)``, random weights
(``latency.random_variables``), default resolution, median (p10-p90) of ``--runs`` calls after one
warm-up call; ``--train`` times the gradient of a train-mode cross-entropy instead (no fused
reference). That is how RESULTS.md's train-mode numbers were taken; since then ``RepVGGDW`` uses
``shared_pad`` in eval mode only, so both ``--train`` programs are the same one (a check that the
train step is the program from before the change: same slices, ratio 1 within the noise).
``slices`` counts the slice instructions of the optimised HLO (the shift path's taps, recomputed
ones included).

    python experiments/bench/bench_shared_pad.py
    python experiments/bench/bench_shared_pad.py --models repvit_m1_1,repvit_m2 --batches 1 --runs 5
    python experiments/bench/bench_shared_pad.py --train --resolution 64 --batches 8   # gradients

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


def _program(model, train: bool):
  """The jitted forward (eval mode) or, with ``train``, the gradient of a train-mode loss."""
  import jax
  import optax

  if not train:
    return lambda v, x: model.apply(v, x, train=False)

  def loss(params, stats, x):
    logits, _ = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                            mutable=["batch_stats"])
    labels = jax.numpy.arange(x.shape[0]) % logits.shape[-1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return lambda v, x: jax.grad(loss)(v["params"], v["batch_stats"], x)


def time_program(model, variables, batch: int, res: int, runs: int, shared: bool,
                 train: bool = False) -> dict:
  import jax
  import numpy as np

  from mobilevis_jax.layers import kernels
  from mobilevis_jax.timing import sample_ms, spread_ms

  kernels._SHARED_PAD = shared
  try:
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, res, res, 3))
    t0 = time.perf_counter()
    fn = jax.jit(_program(model, train)).lower(variables, x).compile()
    compile_s = time.perf_counter() - t0
  finally:
    kernels._SHARED_PAD = True
  slices = fn.as_text().count(" slice(")
  times = sample_ms(fn, variables, x, reps=runs, warmup=1)
  out = np.concatenate([np.ravel(a) for a in jax.tree.leaves(fn(variables, x))])
  return {"compile_s": compile_s, **spread_ms(times), "slices": slices, "out": out}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="repvit_m1_1", help="comma-separated RepViT names")
  p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
  p.add_argument("--runs", type=int, default=5, help="timed calls per program")
  p.add_argument("--train", action="store_true",
                 help="time the gradient of a train-mode loss instead of the forward (no fused "
                      "reference: the fused model has no BatchNorm to train)")
  p.add_argument("--resolution", type=int, default=None, help="default: the model's")
  args = p.parse_args(argv)
  if args.runs < 1:
    p.error("--runs must be >= 1")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np

  from mobilevis_jax.latency import random_variables
  from mobilevis_jax.models import registry

  models = [m for m in args.models.split(",") if m]
  bad = [m for m in models if not m.startswith("repvit") or m not in registry.list_models()]
  if bad:
    p.error(f"not RepViT models: {bad}")
  cell = lambda t: f"{t['median_ms']:9.1f} ({t['p10_ms']:7.1f}-{t['p90_ms']:7.1f})"  # noqa: E731
  print(f"{'model':12s} {'batch':>5s} | {'off: ms (p10-p90)':>27s} {'compile':>7s} "
        f"{'slices':>6s} | {'shared: ms':>27s} {'compile':>7s} {'slices':>6s} | "
        f"{'fused ms':>9s} | speed-up, unfused/fused off -> shared", flush=True)
  rows = []
  for name in models:
    res = args.resolution or registry.model_info(name).default_resolution
    model = registry.create_model(name)
    variables = jax.device_put(random_variables(name))
    fmodel, fvars = registry.fuse(model, variables)
    for batch in args.batches:
      # Alternate the order so that neither program always runs on a warmer machine.
      order = (True, False) if len(rows) % 2 == 0 else (False, True)
      r = {s: time_program(model, variables, batch, res, args.runs, s, args.train)
           for s in order}
      on, off = r[True], r[False]
      if args.train:
        fused = {"median_ms": float("nan")}
      else:
        fused = time_program(fmodel, fvars, batch, res, args.runs, True)
        fused.pop("out")
      diff = float(np.max(np.abs(on.pop("out") - off.pop("out"))))
      row = {"model": name, "batch": batch, "resolution": res, "shared": on, "off": off,
             "fused": fused, "speedup": off["median_ms"] / on["median_ms"], "max_abs_diff": diff,
             "unfused_over_fused_off": off["median_ms"] / fused["median_ms"],
             "unfused_over_fused_shared": on["median_ms"] / fused["median_ms"]}
      rows.append(row)
      print(f"{name:12s} {batch:5d} | {cell(off)} {off['compile_s']:6.1f}s {off['slices']:6d} | "
            f"{cell(on)} {on['compile_s']:6.1f}s {on['slices']:6d} | {fused['median_ms']:9.1f} | "
            f"{row['speedup']:5.2f}x, {row['unfused_over_fused_off']:4.2f}x -> "
            f"{row['unfused_over_fused_shared']:4.2f}x (max |diff| {diff:.1e})", flush=True)
  print(json.dumps({"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg_1min": os.getloadavg()[0], "runs": args.runs, "rows": rows}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
