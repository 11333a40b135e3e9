"""Whole-model inference speed: jitted Flax ParC-Net vs the PyTorch reference, same run.

Times the eval-mode forward of ``parcnet_*`` in JAX (jitted, each ParC method) and of the
PyTorch reference in ``mobilevis_jax/torch_models/parcnet.py`` (eager, ``torch.no_grad``) with the
same weights, and prints the JAX/PyTorch time ratio (< 1: JAX faster).

    python experiments/bench/bench_parcnet.py                    # parcnet_s, 256 px, batch 8
    python experiments/bench/bench_parcnet.py --quick            # seconds: xs, 64 px, batch 1
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import mobilevis_jax  # noqa: E402
from mobilevis_jax.interop import from_torch_state_dict  # noqa: E402
from mobilevis_jax.timing import median_ms  # noqa: E402
from mobilevis_jax.torch_models.parcnet import ParCNetRef  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--model", default="parcnet_s",
                      choices=["parcnet_xs", "parcnet_s", "parcnet_h"])
  parser.add_argument("--resolution", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args()
  name, res, batch, reps = args.model, args.resolution, args.batch, args.reps
  methods = ("direct", "fft", "fft2", "auto")
  if args.quick:
    name, res, batch, reps, methods = "parcnet_xs", 64, 1, 2, ("direct",)
  ref = ParCNetRef(name.split("_")[1]).eval()
  variables = from_torch_state_dict(name, ref.state_dict())
  x = np.random.default_rng(0).uniform(0, 1, (batch, res, res, 3)).astype(np.float32)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    t_torch = median_ms(lambda: ref(xt), reps=reps)
  print(f"{name} {res}px batch {batch}; jax backend {jax.default_backend()}, "
        f"torch threads {torch.get_num_threads()}")
  print(f"pytorch reference (eager): {t_torch:9.1f} ms")
  xj = jnp.asarray(x)
  for m in methods:
    model = mobilevis_jax.create_model(name, parc_method=m)
    fwd = jax.jit(lambda v, x, model=model: model.apply(v, x))
    t = median_ms(fwd, variables, xj, reps=reps)
    print(f"jax jit, parc_method={m:<6}: {t:9.1f} ms   ratio jax/torch = {t / t_torch:.2f}")


if __name__ == "__main__":
  main()
