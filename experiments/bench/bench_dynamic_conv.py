"""Dynamic convolution: its cost against the static conv it replaces, and its two strategies.

Three questions, each answered by ratios of times measured in this one run (jitted forward
passes, median of several calls after a warm-up):

1. ParameterNet's claim at layer level: a DynamicConv with M=4 experts has ~4x the parameters of
   the static conv and only a few percent more MACs -- but what does it cost in wall-clock, at
   batch 1 (mobile inference) and batch 128 (training)? Printed: params ratio, MACs ratio,
   time ratio dynamic/static.
2. The execution strategies (``vmap`` over per-sample kernels, the batch folded into the
   groups of one grouped conv, the per-sample batched GEMM ``einsum``, the per-sample shifted
   taps ``shift``) and ``auto`` (the layer's default, ``kernels.KERNEL_TABLE``): times of each,
   and ``auto/static``, the number ParameterNet's claim is about.

Layers are the ParameterNet-600M shapes of a Ghost module at stride 16 (14x14, 152 -> 190
primary 1x1 and its 190-channel depthwise 3x3 cheap op) and at stride 4 (56x56, 44 -> 68 1x1).

    python experiments/bench/bench_dynamic_conv.py            # batch 1 and 128
    python experiments/bench/bench_dynamic_conv.py --quick    # smoke run: small shapes, batch 1/4
    python experiments/bench/bench_dynamic_conv.py --profile  # + where the time goes, op by op

``--profile`` adds, per layer at the largest batch, the per-class profile of the static conv and
of the ``auto`` dynamic layer (``profile_step.profile_compiled``: XLA:CPU thunk times by class).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

from mobilevis_jax.layers import Conv2d
from mobilevis_jax.layers.dynamic_conv import STRATEGIES, DynamicConv
from mobilevis_jax.profiling import count_params, counting
from mobilevis_jax.timing import median_ms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# (name, spatial size, in channels, out channels, kernel, groups)
LAYERS = [
    ("1x1 56x56 44->68", 56, 44, 68, 1, 1),
    ("1x1 14x14 152->190", 14, 152, 190, 1, 1),
    ("dw3x3 14x14 190", 14, 190, 190, 3, 190),
]
QUICK_LAYERS = [("1x1 8x8 16->24", 8, 16, 24, 1, 1), ("dw3x3 8x8 24", 8, 24, 24, 3, 24)]




def time_layer(layer, x, reps: int) -> float:
  variables = layer.init(jax.random.PRNGKey(0), x)
  fn = jax.jit(layer.apply)
  return median_ms(fn, variables, x, reps=reps)


def profile_layer(layer, x, reps: int) -> dict:
  import profile_step
  variables = layer.init(jax.random.PRNGKey(0), x)
  compiled = jax.jit(layer.apply).lower(variables, x).compile()
  return profile_step.profile_compiled(compiled.as_text(), lambda: compiled(variables, x), reps,
                                       top=6)


def _macs(layer, hw: int, cin: int) -> int:
  """MACs of one image through ``layer`` (the profiler's counting, fvcore convention)."""
  x = jax.ShapeDtypeStruct((1, hw, hw, cin), jnp.float32)
  variables = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
  with counting() as counts:
    jax.eval_shape(layer.apply, variables, x)
  return sum(counts.values())


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
  parser.add_argument("--experts", type=int, default=4)
  parser.add_argument("--profile", action="store_true",
                      help="also profile static and auto per layer at the largest batch")
  args = parser.parse_args(argv)
  layers = QUICK_LAYERS if args.quick else LAYERS
  batches = (1, 4) if args.quick else (1, 128)
  reps = 3 if args.quick else 10

  print(f"devices: {jax.devices()}  experts M={args.experts}")
  print(f"{'layer':22s} {'batch':>5s} {'static ms':>10s} "
        + " ".join(f"{s:>8s}" for s in STRATEGIES)
        + f" {'auto/static':>11s} {'best/static':>11s} {'params x':>8s} {'MACs x':>7s}")
  for name, hw, cin, cout, k, g in layers:
    static = Conv2d(cout, k, groups=g, use_bias=False)
    dyn = {s: DynamicConv(cout, k, groups=g, num_experts=args.experts, strategy=s)
           for s in STRATEGIES}
    x1 = jnp.zeros((1, hw, hw, cin))
    p_static = count_params(jax.eval_shape(static.init, jax.random.PRNGKey(0), x1))
    p_dyn = count_params(jax.eval_shape(dyn["vmap"].init, jax.random.PRNGKey(0), x1))
    m_static, m_dyn = _macs(static, hw, cin), _macs(dyn["vmap"], hw, cin)
    for b in batches:
      x = jax.random.normal(jax.random.PRNGKey(b), (b, hw, hw, cin))
      t_static = time_layer(static, x, reps)
      t = {s: time_layer(layer, x, reps) for s, layer in dyn.items()}
      best = min(t.values())
      print(f"{name:22s} {b:5d} {t_static:10.3f} " + " ".join(f"{t[s]:8.3f}" for s in STRATEGIES)
            + f" {t['auto'] / t_static:11.2f} {best / t_static:11.2f} "
            f"{p_dyn / p_static:8.2f} {m_dyn / m_static:7.3f}", flush=True)
    if args.profile:
      import profile_step
      x = jax.random.normal(jax.random.PRNGKey(0), (batches[-1], hw, hw, cin))
      for label, layer in (("static", static), ("auto", dyn["auto"])):
        out = profile_layer(layer, x, reps)
        print(f"# {name}, batch {batches[-1]}, {label}: {out['thunks_ms']:.2f} ms of thunks")
        print(profile_step.format_profile(out), flush=True)


if __name__ == "__main__":
  main()
