"""Inference speed of RepViT: jitted JAX vs the PyTorch reference, same machine, same run.

Both sides run the same weights (random, with random BN statistics; imported into JAX with
``from_torch_state_dict``), in eval mode, unfused and fused (``mobilevis_jax.fuse`` vs the
official ``replace_batchnorm`` re-implemented in ``mobilevis_jax/torch_models/repvit.py``). PyTorch
runs under ``torch.inference_mode``; JAX is ``jax.jit(model.apply)`` with the output blocked on.
Each time is the median of several calls after a warm-up (which includes JAX's compile). Compare
the ratios, not the absolute times: the machine may be shared.

    python experiments/bench/bench_repvit.py            # RepViT-M1.1, 224x224, batch 1 and 32
    python experiments/bench/bench_repvit.py --quick    # smoke run: M0.6, 64x64, batch 1 and 2
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
from mobilevis_jax.interop import from_torch_state_dict  # noqa: E402


def main(argv=None) -> list[dict]:
  import torch

  from mobilevis_jax.torch_models import repvit as R
  from tests.helpers import randomize_repvit_

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
  parser.add_argument("--model", default=None, help="registered RepViT name (default repvit_m1_1)")
  parser.add_argument("--batches", type=int, nargs="*", default=None)
  parser.add_argument("--resolution", type=int, default=None)
  parser.add_argument("--reps", type=int, default=None)
  args = parser.parse_args(argv)
  name = args.model or ("repvit_m0_6" if args.quick else "repvit_m1_1")
  if name not in R.ROW_TABLES:
    raise ValueError(f"{name!r} is not a RepViT variant (choose from {sorted(R.ROW_TABLES)})")
  batches = args.batches or ([1, 2] if args.quick else [1, 32])
  res = args.resolution or (64 if args.quick else 224)
  reps = args.reps or (2 if args.quick else 10)

  ref = randomize_repvit_(R.RepViT(name, distillation=True), resolution=res).eval()
  ref_fused = R.fuse_model(ref)
  variables = from_torch_state_dict(name, ref.state_dict(), distillation=True)
  model = mv.create_model(name, distillation=True)
  fused_model, fused_vars = mv.fuse(model, variables)
  forward = {
      "unfused": (ref, jax.jit(lambda v, x: model.apply(v, x, train=False)), variables),
      "fused": (ref_fused, jax.jit(lambda v, x: fused_model.apply(v, x)), fused_vars),
  }
  print(f"{name}: jax backend={jax.default_backend()} torch threads={torch.get_num_threads()} "
        f"res={res} reps={reps}")
  print(f"{'form':>8} {'batch':>6} | {'torch ms':>9} {'jax ms':>9} {'torch/jax':>9} | max|diff|")
  rows = []
  for batch in batches:
    x = torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(batch))
    x_jax = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    for form, (torch_model, jax_fn, v) in forward.items():
      with torch.inference_mode():
        t_torch = median_ms(lambda: torch_model(x), reps=reps)
        y_torch = torch_model(x).numpy()
      t_jax = median_ms(lambda: jax_fn(v, x_jax).block_until_ready(), reps=reps)
      diff = float(np.max(np.abs(np.asarray(jax_fn(v, x_jax)) - y_torch)))
      rows.append(dict(form=form, batch=batch, torch_ms=t_torch, jax_ms=t_jax,
                       ratio=t_torch / t_jax, max_abs_diff=diff))
      print(f"{form:>8} {batch:>6} | {t_torch:9.2f} {t_jax:9.2f} {t_torch / t_jax:9.2f} | "
            f"{diff:.1e}")
  return rows


if __name__ == "__main__":
  main()
