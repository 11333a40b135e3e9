"""Per-op timing of every kernel path of ``layers/kernels.py``: the measurements behind
KERNEL_TABLE.

For depthwise convolutions at the families' shapes (RepViT's 3x3 at 56x56, ConvNeXt's 7x7,
stride-2 downsampling), ParC-Net's grouped convolutions and the 1x1 dense convolutions of every
family (ResNet's bottleneck shapes), times the jitted forward and the
jitted forward + backward (gradients w.r.t. input and kernel) of each implementation, and
PyTorch's ``F.conv2d`` (channels_last, same groups) as the baseline, in this one run. Prints
median ms and ``xla / path`` speed-ups.

    python experiments/bench/bench_kernels.py            # batch 1 and 32
    python experiments/bench/bench_kernels.py --quick    # batch 1, small shapes
    python experiments/bench/bench_kernels.py --only pw1x1 --batches 32   # the 1x1 rows
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from mobilevis_jax.layers import kernels
from mobilevis_jax.timing import median_ms

# (label, H=W, Cin, Cout, kernel, stride, groups; groups=None means depthwise; a 1x1 kernel with
# groups=1 is the pointwise op)
SHAPES = [
    ("dw3x3 56 c64 (RepViT s1)", 56, 64, 64, 3, 1, None),
    ("dw3x3 14 c256 (RepViT s3)", 14, 256, 256, 3, 1, None),
    ("dw3x3/2 56 c128 (downsample)", 56, 128, 128, 3, 2, None),
    ("dw7x7 56 c48 (ConvNeXt s1)", 56, 48, 48, 7, 1, None),
    ("grp3x3 32 c96 g48 (ParC-Net)", 32, 96, 96, 3, 1, 48),
    ("grp1x1 16 c144 g48 (ParC-Net)", 16, 144, 144, 1, 1, 48),
    ("pw1x1 56 64->256 (ResNet s1)", 56, 64, 256, 1, 1, 1),
    ("pw1x1 28 512->128 (ResNet s2)", 28, 512, 128, 1, 1, 1),
    ("pw1x1 14 256->1024 (ResNet s3)", 14, 256, 1024, 1, 1, 1),
]
QUICK = [("dw3x3 16 c16", 16, 16, 16, 3, 1, None), ("grp3x3 8 c16 g4", 8, 16, 16, 3, 1, 4),
         ("pw1x1 8 16->32", 8, 16, 32, 1, 1, 1)]


def main(argv=None):
  import torch
  import torch.nn.functional as F
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--batches", type=int, nargs="+", default=None)
  parser.add_argument("--reps", type=int, default=None)
  parser.add_argument("--only", default=None, help="only the shapes whose label contains this")
  args = parser.parse_args(argv)
  shapes = QUICK if args.quick else SHAPES
  if args.only:
    shapes = [sh for sh in shapes if args.only in sh[0]]
    if not shapes:
      parser.error(f"no shape label contains {args.only!r}")
  batches = args.batches or ([1] if args.quick else [1, 32])
  reps = args.reps or (2 if args.quick else 5)
  print(f"backend={jax.default_backend()} torch threads={torch.get_num_threads()} reps={reps}")
  print(f"{'shape':<30} {'batch':>5} {'pass':<8} | {'torch':>8} " + " ".join(
      f"{i:>8}" for i in ("xla", "alt")) + f" | {'alt':>6} {'xla/alt':>7} {'torch/alt':>9}")
  rows = []
  for label, hw, cin, cout, k, s, g in shapes:
    groups = cin if g is None else g
    op = "depthwise" if g is None else ("pointwise" if (g, k) == (1, 1) else "grouped")
    alt = [i for i in kernels.IMPLS[op] if i != "xla"][0]
    p = (k - 1) // 2
    pad = ((p, p), (p, p))
    for b in batches:
      rng = np.random.default_rng(0)
      x = rng.standard_normal((b, hw, hw, cin)).astype(np.float32)
      w = (rng.standard_normal((k, k, cin // groups, cout)) / k).astype(np.float32)
      xj, wj = jnp.asarray(x), jnp.asarray(w)
      xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).contiguous(
          memory_format=torch.channels_last)
      wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
      for pass_ in ("fwd", "fwd+bwd"):
        t = {}
        for impl in ("xla", alt):
          f = lambda x, w, impl=impl: kernels.conv_general_dilated(
              x, w, (s, s), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"),
              feature_group_count=groups, impl=impl)
          if pass_ == "fwd+bwd":
            f = jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2), argnums=(0, 1))
          t[impl] = median_ms(jax.jit(f), xj, wj, reps=reps)
        if pass_ == "fwd":
          with torch.inference_mode():
            t["torch"] = median_ms(lambda: F.conv2d(xt, wt, None, s, p, 1, groups), reps=reps)
        else:
          xg, wg = xt.clone().requires_grad_(), wt.clone().requires_grad_()

          def torch_fb():
            xg.grad = wg.grad = None
            (F.conv2d(xg, wg, None, s, p, 1, groups) ** 2).sum().backward()
            return wg.grad

          t["torch"] = median_ms(torch_fb, reps=reps)
        rows.append(dict(shape=label, batch=b, pass_=pass_, alt=alt, **t))
        print(f"{label:<30} {b:>5} {pass_:<8} | {t['torch']:8.2f} {t['xla']:8.2f} {t[alt]:8.2f} | "
              f"{alt:>6} {t['xla'] / t[alt]:6.2f}x {t['torch'] / t[alt]:8.2f}x", flush=True)
  return rows


if __name__ == "__main__":
  main()
