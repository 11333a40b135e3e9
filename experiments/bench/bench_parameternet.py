"""Whole-model forward: the JAX port against the PyTorch reference, dynamic against static.

For ParameterNet-600M, its static twin GhostNet-600M and GhostNet 1.0x, times one forward pass
(eval mode) of the jitted JAX model and of the PyTorch reference
(``mobilevis_jax/torch_models``' official
module tree for the 600M models, timm for GhostNet) on this machine, and prints

* ``torch/jax``: how the port compares with the PyTorch reference (same machine, same run);
* ``dyn/static``: what ParameterNet's dynamic convs cost in latency over the same network with
  static convs, in each framework (the paper: +5% MACs; the reference notes measured +49% in
  PyTorch eager at batch 1 on one thread).

Median of several calls after a warm-up; torch runs under ``torch.no_grad`` on one thread
unless ``--torch-threads`` says otherwise (JAX uses XLA's own CPU thread pool). Weights are random
(timing does not depend on them).

    python experiments/bench/bench_parameternet.py            # 224x224, batch 1 and 8
    python experiments/bench/bench_parameternet.py --quick    # smoke run: a 3-group half-width
                                                              # slice at 32x32
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mobilevis_jax.timing import median_ms

# for mobilevis_jax.torch_models
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from mobilevis_jax.models import create_model  # noqa: E402
from mobilevis_jax.models.parameternet import PARAMETERNET_TABLE, GhostNet  # noqa: E402


def random_variables(model, x):
  """Random weights from the abstract shapes: compiling ``model.init`` of a ParameterNet (88 expert
  banks) takes minutes on CPU, and timing does not depend on the values."""
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
  rng = np.random.default_rng(0)

  def fill(path, s):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return jnp.ones(s.shape, s.dtype)  # BN running variance must be positive
    return jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def jax_forward(model, resolution: int, batch: int):
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, resolution, resolution, 3))
  variables = random_variables(model, x)
  fn = jax.jit(lambda v, x: model.apply(v, x))
  return lambda: jax.block_until_ready(fn(variables, x))


def torch_forward(model, resolution: int, batch: int):
  import torch
  model.eval()
  x = torch.randn(batch, 3, resolution, resolution)

  def run():
    with torch.no_grad():
      return model(x)

  return run


def pairs(quick: bool):
  """(label, JAX model, PyTorch model factory) triples."""
  import timm

  from mobilevis_jax.torch_models import parameternet as refs
  if quick:  # three config groups of the ParameterNet table at half width: compiles in seconds
    rows, table = refs.PARAMETERNET_ROWS[3:6], PARAMETERNET_TABLE[3:6]
    return [
        ("parameternet (3 groups)", GhostNet(table=table, width=0.5, act="hard_swish",
                                             dynamic=True),
         lambda: refs.ParameterNet(rows, width=0.5, dynamic=True)),
        ("static twin (3 groups)", GhostNet(table=table, width=0.5, act="hard_swish"),
         lambda: refs.ParameterNet(rows, width=0.5, dynamic=False)),
    ]
  return [
      ("parameternet_600m", create_model("parameternet_600m"), refs.parameternet_600m),
      ("ghostnet_600m", create_model("ghostnet_600m"), refs.ghostnet_600m),
      ("ghostnet_100", create_model("ghostnet_100"), lambda: timm.create_model("ghostnet_100")),
  ]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
  parser.add_argument("--torch-threads", type=int, default=1,
                      help="torch intra-op threads (1: stable numbers on a shared machine)")
  args = parser.parse_args(argv)
  import torch
  torch.set_num_threads(args.torch_threads)
  resolution = 32 if args.quick else 224
  batches = (1,) if args.quick else (1, 8)
  reps = 3 if args.quick else 10

  rows = {}
  print(f"{'model':28s} {'batch':>5s} {'jax ms':>8s} {'torch ms':>9s} {'torch/jax':>9s}")
  for label, jax_model, torch_factory in pairs(args.quick):
    torch_model = torch_factory()
    for b in batches:
      tj = median_ms(jax_forward(jax_model, resolution, b), reps=reps)
      tt = median_ms(torch_forward(torch_model, resolution, b), reps=reps)
      rows[(label, b)] = (tj, tt)
      print(f"{label:28s} {b:5d} {tj:8.2f} {tt:9.2f} {tt / tj:9.2f}")
  dyn, static = [label for label, _, _ in pairs(args.quick)][:2]
  for b in batches:
    (dj, dt), (sj, st) = rows[(dyn, b)], rows[(static, b)]
    print(f"dyn/static latency at batch {b}: jax {dj / sj:.2f}, torch {dt / st:.2f}")


if __name__ == "__main__":
  main()
