"""Whole-model inference: jitted MobileViG (JAX) vs the PyTorch reference, same machine, same run.

The PyTorch side is the official module tree (``mobilevis_jax/torch_models/mobilevig.py``) in eval
mode under ``torch.inference_mode``; the JAX side is ``jax.jit(model.apply)`` on the same weights
(imported with ``from_torch_state_dict``), so the two also agree numerically (max |diff| printed).
Each time is the median of several calls after a warm-up; compare the ratios, not the times.

    python experiments/bench/bench_mobilevig.py            # all four variants, batch 8, 224x224
    python experiments/bench/bench_mobilevig.py --quick    # smoke run: Ti, batch 1, 64x64
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mobilevis_jax.timing import median_ms

# The PyTorch reference lives with the tests; make the repository root importable.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import mobilevis_jax as mv  # noqa: E402
from mobilevis_jax import interop  # noqa: E402


def main(argv=None):
  import torch

  from mobilevis_jax.torch_models.mobilevig import build

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
  parser.add_argument("--models", nargs="*", default=None)
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--resolution", type=int, default=None)
  parser.add_argument("--reps", type=int, default=None)
  args = parser.parse_args(argv)
  models = args.models or (["mobilevig_ti"] if args.quick else mv.list_models("mobilevig*"))
  batch = args.batch or (1 if args.quick else 8)
  res = args.resolution or (64 if args.quick else 224)
  reps = args.reps or (2 if args.quick else 5)
  print(f"jax backend={jax.default_backend()} torch threads={torch.get_num_threads()} "
        f"batch={batch} res={res} reps={reps}")
  print(f"{'model':>14} | {'torch ms':>9} {'jax ms':>9} {'torch/jax':>9} | max|diff|")
  rows = []
  for name in models:
    ref = build(name).eval()
    variables = interop.from_torch_state_dict(
        name, {k: v.clone() for k, v in ref.state_dict().items()})
    model = mv.create_model(name)
    x = np.random.default_rng(0).normal(size=(batch, res, res, 3)).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    xj = jnp.asarray(x)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))

    def run_torch():
      with torch.inference_mode():
        return ref(xt)

    t_torch = median_ms(run_torch, reps=reps)
    t_jax = median_ms(lambda: jax.block_until_ready(apply(variables, xj)), reps=reps)
    diff = float(np.abs(np.asarray(apply(variables, xj)) - run_torch().numpy()).max())
    rows.append((name, t_torch, t_jax, diff))
    print(f"{name:>14} | {t_torch:9.2f} {t_jax:9.2f} {t_torch / t_jax:8.2f}x | {diff:.2e}")
  return rows


if __name__ == "__main__":
  main()
