"""ImageNet-22K preparation: Apache Beam (DirectRunner, N worker processes) vs the single process.

Both prepare the same fake extracted per-synset tars
(``fake_archives.write_imagenet21k_synset_tars``, ~500x375 JPEGs) into ArrayRecord with the
``imagenet22k`` builder, timed in the same run. Beam pays a fixed start-up (worker processes
importing TensorFlow/TFDS, pipeline stages), so each side is timed on two sizes (``S`` and ``2S``
synsets): the difference is the marginal cost of ``S`` synsets, which is what a 14M-image build
pays; the totals are printed too. Printed ratios: single / Beam time (above 1: Beam faster), total
and marginal.

    python experiments/bench/bench_prepare_22k.py                 # 24 / 48 synsets x 100 images
    python experiments/bench/bench_prepare_22k.py --workers 8 --synsets 64
    python experiments/bench/bench_prepare_22k.py --quick         # a smoke run
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time


def _prepare(manual_dir: str, data_dir: str, workers: int) -> float:
  from mobilevis_jax.data import sources
  beam = {"beam_runner": "DirectRunner", "num_workers": workers} if workers else {}
  t = time.perf_counter()
  sources.prepare("imagenet22k", data_dir=data_dir, manual_dir=manual_dir,
                  file_format="array_record", **beam)
  return time.perf_counter() - t


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
  p.add_argument("--synsets", type=int, default=24, help="S: the small size (the large is 2S)")
  p.add_argument("--images", type=int, default=100, help="images per synset")
  p.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes")
  args = p.parse_args(argv)
  size = (500, 375)
  if args.quick:
    args.synsets, args.images, size = 2, 4, (64, 48)
  import mobilevis_jax.data  # noqa: F401  (first: it orders the native-library loads)
  from mobilevis_jax.data import fake_archives
  logging.getLogger("apache_beam").setLevel(logging.WARNING)
  root = tempfile.mkdtemp(prefix="bench22k_")
  times = {}
  for n in (args.synsets, 2 * args.synsets):
    manual = os.path.join(root, f"tars{n}")
    synsets = [f"n{10_000_000 + i:08d}" for i in range(n)]
    fake_archives.write_imagenet21k_synset_tars(manual, synsets=synsets,
                                                images_per_class=args.images, size=size)
    images = n * args.images + 2  # + the CMYK and PNG specimens of the first synset
    for name, workers in (("single", 0), ("beam", args.workers)):
      times[name, n] = _prepare(manual, os.path.join(root, f"{name}{n}"), workers)
      print(f"{name:6s} {n:4d} synsets ({images} images): {times[name, n]:7.2f} s", flush=True)
  s, b = args.synsets, 2 * args.synsets
  marg = {k: times[k, b] - times[k, s] for k in ("single", "beam")}
  marg_images = s * args.images
  print(f"Beam DirectRunner, {args.workers} workers, on {os.cpu_count()} CPU cores")
  for k in ("single", "beam"):
    rate = f"{marg_images / marg[k]:7.1f} images/s" if marg[k] > 0 else "below the noise"
    print(f"marginal {k:6s}: {marg[k]:7.2f} s per {s} synsets ({rate})")
  print(f"ratio single/beam total ({b} synsets): {times['single', b] / times['beam', b]:.2f}x")
  if min(marg.values()) > 0:
    print(f"ratio single/beam marginal         : {marg['single'] / marg['beam']:.2f}x")
  else:
    print("ratio single/beam marginal         : n/a (sizes too small to time; raise --synsets)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
