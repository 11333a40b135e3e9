"""Whole-model forward of the ParC-ConvNets: jitted JAX vs the PyTorch reference, same run.

For each model, the PyTorch reference of the official module tree
(``mobilevis_jax/torch_models``) and the
Flax model loaded from its state_dict are timed on the same batch (inference mode, float32, the
same device class: XLA:CPU vs PyTorch CPU unless JAX sees a GPU and torch has CUDA). Reported per
model: median ms per batch for both, the ratio torch / jax (> 1: JAX is faster), JAX's compile
time, and the max |logit difference| as a sanity check. Both frameworks use their default
thread pools (all cores).

    python experiments/bench/bench_parc_convnets.py                 # batch 8 at 224, all models
    python experiments/bench/bench_parc_convnets.py --quick         # seconds: smoke run
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from mobilevis_jax.timing import median_ms

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = ("parc_convnext_xt", "parc_resnet50", "parc_mobilenetv2")




def bench_model(name: str, batch: int, resolution: int, reps: int, parc_method: str) -> dict:
  import jax
  import torch

  import mobilevis_jax as mv
  from mobilevis_jax.interop import from_torch_state_dict
  sys.path.insert(0, REPO)
  from mobilevis_jax.torch_models import parc_convnets as ref

  use_cuda = jax.default_backend() == "gpu" and torch.cuda.is_available()
  device = "cuda" if use_cuda else "cpu"
  # The official operators are fixed to 224 px; the resampling reference runs any size.
  reference = ref.BUILDERS[name](resample=resolution != 224).eval().to(device)
  variables = jax.device_put(from_torch_state_dict(name, reference.state_dict()))
  model = mv.create_model(name, parc_method=parc_method)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))

  x = np.random.RandomState(0).randn(batch, resolution, resolution, 3).astype(np.float32)
  x_jax = jax.device_put(x)
  x_torch = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)

  t = time.perf_counter()
  compiled = forward.lower(variables, x_jax).compile()
  compile_s = time.perf_counter() - t

  def run_jax():
    return jax.block_until_ready(compiled(variables, x_jax))

  def run_torch():
    with torch.no_grad():
      y = reference(x_torch)
    if use_cuda:
      torch.cuda.synchronize()
    return y

  diff = float(np.abs(np.asarray(run_jax()) - run_torch().cpu().numpy()).max())
  jax_ms, torch_ms = median_ms(run_jax, reps=reps), median_ms(run_torch, reps=reps)
  return {"model": name, "device": device, "jax_ms": jax_ms, "torch_ms": torch_ms,
          "ratio": torch_ms / jax_ms, "compile_s": compile_s, "max_diff": diff}


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=list(NAMES), choices=NAMES)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--parc-method", default="auto", help="ParC method of the JAX models")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: ParC-MobileNetV2, batch 1 at 64 px, 2 repetitions")
  args = parser.parse_args(argv)
  if args.quick:
    args.models, args.batch, args.resolution, args.reps = ["parc_mobilenetv2"], 1, 64, 2
  print(f"batch {args.batch} at {args.resolution}x{args.resolution}, median of {args.reps}")
  print(f"{'model':<18} {'device':<6} {'jax ms':>9} {'torch ms':>9} {'torch/jax':>9} "
        f"{'compile s':>9} {'max|diff|':>9}")
  rows = []
  for name in args.models:
    r = bench_model(name, args.batch, args.resolution, args.reps, args.parc_method)
    rows.append(r)
    print(f"{r['model']:<18} {r['device']:<6} {r['jax_ms']:9.2f} {r['torch_ms']:9.2f} "
          f"{r['ratio']:8.2f}x {r['compile_s']:9.1f} {r['max_diff']:9.1e}", flush=True)
  return rows


if __name__ == "__main__":
  main()
