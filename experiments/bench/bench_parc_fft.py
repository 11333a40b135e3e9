"""Direct ParC vs Fast-ParC (FFT): speed-up per feature size and the crossover ``auto`` uses.

For each n, one ParC-H on a (B, n, n, C) map (ParC-Net shapes: B=8 and C=96, the channel count of
one branch of ParC-Net-S stage 3) is jitted in three forms and timed in the same run:

* ``direct``: the spatial sum as a matmul with the circulant kernel matrix,
* ``conv``: the official formulation (wrap the map, VALID depthwise conv), for reference only up
  to ``--conv-max`` (it is very slow on XLA:CPU),
* ``fft``: rfft -> multiply by the conjugate kernel spectrum -> irfft,
* and, for a ParC-H + ParC-W pair, ``fft2``: the pair in one rfft2 vs two 1-D FFT ParCs.

Prints the FFT speed-up per n (direct time / FFT time) and the crossover: the smallest measured n
from which the FFT wins at every larger measured n. That number is what
``mobilevis_jax.layers.parc.FFT_CROSSOVER`` stores for the backend (the script says whether the
stored value agrees).

    python experiments/bench/bench_parc_fft.py            # full sweep, n = 7..128
    python experiments/bench/bench_parc_fft.py --quick    # seconds: smoke run
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from mobilevis_jax.layers import parc
from mobilevis_jax.timing import median_ms

FULL_SIZES = (7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96, 128)
QUICK_SIZES = (7, 16, 32)




def measure(sizes=FULL_SIZES, batch: int = 8, channels: int = 96, reps: int = 10,
            pair: bool = True, conv_max: int = 0) -> list[dict]:
  """Timings (ms) for each n: direct, fft, the official conv form (n <= ``conv_max``) and (if
  ``pair``) an H+W pair as 2x direct, 2x fft and one rfft2."""
  direct = jax.jit(lambda x, k: parc.circular_conv(x, k, 1, method="direct"))
  conv = jax.jit(lambda x, k: parc.circular_conv(x, k, 1, method="conv"))
  fft = jax.jit(lambda x, k: parc.circular_conv(x, k, 1, method="fft"))
  pair_fft = jax.jit(lambda x, kh, kw: parc.circular_conv(
      parc.circular_conv(x, kh, 1, method="fft"), kw, 2, method="fft"))
  pair_direct = jax.jit(lambda x, kh, kw: parc.circular_conv(
      parc.circular_conv(x, kh, 1, method="direct"), kw, 2, method="direct"))
  pair_fft2 = jax.jit(parc.circular_conv_hw)
  rows = []
  for n in sizes:
    kx, kk, kw_ = jax.random.split(jax.random.PRNGKey(n), 3)
    x = jax.random.normal(kx, (batch, n, n, channels), jnp.float32)
    kh = jax.random.normal(kk, (n, channels), jnp.float32)
    kw = jax.random.normal(kw_, (n, channels), jnp.float32)
    row = {"n": n, "direct_ms": median_ms(direct, x, kh, reps=reps),
           "fft_ms": median_ms(fft, x, kh, reps=reps),
           "conv_ms": median_ms(conv, x, kh, reps=reps) if n <= conv_max else float("nan")}
    if pair:
      row["pair_direct_ms"] = median_ms(pair_direct, x, kh, kw, reps=reps)
      row["pair_fft_ms"] = median_ms(pair_fft, x, kh, kw, reps=reps)
      row["pair_fft2_ms"] = median_ms(pair_fft2, x, kh, kw, reps=reps)
    rows.append(row)
  return rows


def crossover(rows: list[dict]) -> int | None:
  """Smallest measured n from which the FFT is faster at every larger measured n."""
  best = None
  for row in reversed(rows):
    if row["fft_ms"] < row["direct_ms"]:
      best = row["n"]
    else:
      break
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="3 sizes, small batch, 2 reps")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--channels", type=int, default=96)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--sizes", type=str, default=None,
                      help="comma-separated n to sweep (default: 7..128)")
  parser.add_argument("--conv-max", type=int, default=32,
                      help="largest n at which the official pad+conv form is also timed")
  args = parser.parse_args()
  if args.quick:
    rows = measure(QUICK_SIZES, batch=2, channels=16, reps=2, conv_max=16)
  else:
    sizes = tuple(int(v) for v in args.sizes.split(",")) if args.sizes else FULL_SIZES
    rows = measure(sizes, args.batch, args.channels, args.reps, conv_max=args.conv_max)
  backend = jax.default_backend()
  print(f"backend={backend} device={jax.devices()[0].device_kind} "
        f"batch={2 if args.quick else args.batch} channels={16 if args.quick else args.channels}")
  print(f"{'n':>5} {'conv ms':>9} {'direct ms':>10} {'fft ms':>9} {'fft speed-up':>12} | "
        f"{'pair direct':>11} {'pair fft':>9} {'pair rfft2':>10} {'rfft2 vs 2xfft':>14}")
  for r in rows:
    print(f"{r['n']:>5} {r['conv_ms']:>9.3f} {r['direct_ms']:>10.3f} {r['fft_ms']:>9.3f} "
          f"{r['direct_ms'] / r['fft_ms']:>11.2f}x | {r['pair_direct_ms']:>11.3f} "
          f"{r['pair_fft_ms']:>9.3f} {r['pair_fft2_ms']:>10.3f} "
          f"{r['pair_fft_ms'] / r['pair_fft2_ms']:>13.2f}x")
  measured = crossover(rows)
  stored = parc.FFT_CROSSOVER.get(backend)
  print(f"measured crossover: n = {measured}  (FFT faster from there on; None = never)")
  print(f"stored FFT_CROSSOVER[{backend!r}] = {stored}"
        + ("" if args.quick
           else ("  (agrees)" if stored == measured else "  (DIFFERS: update it)")))


if __name__ == "__main__":
  main()
