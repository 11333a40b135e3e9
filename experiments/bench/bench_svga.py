"""SVGA vs the Vision-GNN KNN graph: aggregation alone and a whole Grapher + FFN block.

Reproduces the argument of MobileViG's Sec. 3: SVGA's fixed graph (rolls, subtractions, maxima)
against ViG's per-block KNN graph (normalise, pairwise distances, top-k, gather). Settings are the
four pyramid scales of MobileViG / PViG (7x7/C=256, 14x14/C=240, 28x28/C=96, 56x56/C=48); the KNN
side uses ViG's k=9 and its key pooling ratio per scale (1, 1, 2, 4). Everything is jitted; each
number is the median of several timed calls after a warm-up, and only ratios (KNN time / SVGA
time, from this one run) are meant to be compared across machines.

    python experiments/bench/bench_svga.py            # batch 8, all four settings
    python experiments/bench/bench_svga.py --quick    # smoke run: batch 1, two small settings
"""
from __future__ import annotations

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mobilevis_jax.layers import knn_graph, svga
from mobilevis_jax.timing import median_ms

# (height = width, channels, ViG key pooling ratio at that scale)
SETTINGS = [(7, 256, 1), (14, 240, 1), (28, 96, 2), (56, 48, 4)]




class GraphBlock(nn.Module):
  """Grapher + FFN, the unit MobileViG repeats at 1/32 scale, with a pluggable graph conv."""
  graph_conv: type | functools.partial

  @nn.compact
  def __call__(self, x):
    x = svga.Grapher(graph_conv=self.graph_conv, name="grapher")(x, False)
    return svga.FFN(name="ffn")(x, False)


def random_variables(module, x, seed=0):
  """numpy-filled variables (skips compiling init's RNG programs, which is slow on small CPUs)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), x)
  return jax.tree_util.tree_map_with_path(
      lambda p, a: jnp.ones(a.shape) if p[-1].key == "var"
      else jnp.asarray(rng.normal(0, 0.05, a.shape), jnp.float32), shapes)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--reps", type=int, default=None)
  args = parser.parse_args(argv)
  batch = args.batch or (1 if args.quick else 8)
  reps = args.reps or (2 if args.quick else 10)
  settings = SETTINGS[:2] if args.quick else SETTINGS
  print(f"backend={jax.default_backend()} batch={batch} reps={reps} "
        "(median ms; ratio = KNN / SVGA)")
  print("floor = one jitted elementwise op on the same map (x * 2): the least any fused op costs")
  print(f"{'map':>7} {'C':>4} {'r':>2} | {'floor':>7} {'SVGA agg':>9} {'KNN agg':>9} {'ratio':>6} "
        f"{'KNN/floor':>9} | {'SVGA blk':>9} {'KNN blk':>9} {'ratio':>6}")
  rows = []
  for size, channels, ratio in settings:
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, channels))
    svga_agg = jax.jit(functools.partial(svga.svga_aggregate, k=2))
    knn_agg = jax.jit(functools.partial(knn_graph.knn_aggregate, num_neighbors=9,
                                        reduce_ratio=ratio))
    t_floor = median_ms(jax.jit(lambda x: x * 2.0), x, reps=reps)
    t_svga = median_ms(svga_agg, x, reps=reps)
    t_knn = median_ms(knn_agg, x, reps=reps)

    svga_block = GraphBlock(functools.partial(svga.MRConv4d, k=2))
    knn_block = GraphBlock(functools.partial(knn_graph.KnnGraphConv, num_neighbors=9,
                                             reduce_ratio=ratio))
    variables = random_variables(svga_block, x)   # same parameter layout for both blocks
    b_svga = median_ms(jax.jit(svga_block.apply), variables, x, reps=reps)
    b_knn = median_ms(jax.jit(knn_block.apply), variables, x, reps=reps)
    rows.append((size, channels, ratio, t_svga, t_knn, b_svga, b_knn, t_floor))
    print(f"{size:>3}x{size:<3} {channels:>4} {ratio:>2} | {t_floor:7.3f} {t_svga:9.3f} "
          f"{t_knn:9.3f} {t_knn / t_svga:5.1f}x {t_knn / t_floor:8.1f}x | {b_svga:9.3f} "
          f"{b_knn:9.3f} {b_knn / b_svga:5.2f}x", flush=True)
  return rows


if __name__ == "__main__":
  main()
