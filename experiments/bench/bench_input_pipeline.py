"""Train input pipeline throughput (images/s per CPU core) vs a PIL per-image baseline.

Both sides do the same work per image on ~500x375 JPEGs: decode, RandomResizedCrop (scale
0.08-1, ratio 3/4-4/3) to 224 bicubic, horizontal flip, ImageNet normalisation to float32.
Ours: the real path (fake ILSVRC2012 tars -> TFDS imagenet2012 builder -> train_iterator, with
tf.data using every core, fused decode+crop). Baseline: PIL in one Python thread, torchvision-style
(full decode, crop, resize, flip, numpy normalise), timed in the same run. Printed: images/s,
images/s per core, and the ratio (ours per core / PIL per core).

    python experiments/bench/bench_input_pipeline.py           # 512 images, 10 batches of 64
    python experiments/bench/bench_input_pipeline.py --quick   # seconds; a smoke run
"""
from __future__ import annotations

import argparse
import io
import math
import os
import random
import tempfile
import time

import numpy as np


def pil_pipeline(jpegs: list[bytes], size: int, rng: random.Random) -> np.ndarray:
  from PIL import Image
  mean = np.array([0.485, 0.456, 0.406], np.float32)
  std = np.array([0.229, 0.224, 0.225], np.float32)
  out = np.empty((len(jpegs), size, size, 3), np.float32)
  for n, data in enumerate(jpegs):
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    box = (0, 0, w, h)
    for _ in range(10):  # torchvision RandomResizedCrop.get_params
      area = w * h * rng.uniform(0.08, 1.0)
      ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
      cw, ch = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
      if 0 < cw <= w and 0 < ch <= h:
        top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
        box = (left, top, left + cw, top + ch)
        break
    img = img.resize((size, size), Image.BICUBIC, box=box)
    if rng.random() < 0.5:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    out[n] = (np.asarray(img, np.float32) / 255.0 - mean) / std
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
  p.add_argument("--images", type=int, default=512)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--batches", type=int, default=10)
  p.add_argument("--size", type=int, default=224)
  args = p.parse_args(argv)
  if args.quick:
    args.images, args.batch, args.batches, args.size = 32, 8, 3, 64

  from mobilevis_jax import data
  from mobilevis_jax.data import fake_archives, sources
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  with tempfile.TemporaryDirectory() as tmp:
    per_class = max(1, args.images // 4)
    layout = fake_archives.write_ilsvrc2012(os.path.join(tmp, "manual"), images_per_class=per_class,
                                            num_val=2, synsets=("n01440764", "n01443537",
                                                                "n01484850", "n01491361"))
    sources.prepare("imagenet2012", data_dir=os.path.join(tmp, "tfds"),
                    manual_dir=os.path.join(tmp, "manual"))
    n_train = sum(len(v) for v in layout["train"].values())
    cfg = data.default_data_config()
    cfg.name, cfg.data_dir, cfg.image_size = "imagenet2012", os.path.join(tmp, "tfds"), args.size
    cfg.shuffle_buffer = 256
    it = data.train_iterator(cfg, global_batch_size=args.batch, seed=0, process_index=0,
                             process_count=1)
    next(it)  # graph building and first fill are not throughput
    t = time.perf_counter()
    for _ in range(args.batches):
      next(it)
    ours = args.batches * args.batch / (time.perf_counter() - t)

    # The baseline decodes the same kind of files: the generator's 500x375 JPEGs.
    rng = np.random.default_rng(1)
    jpegs = [fake_archives.encode(fake_archives.random_image(rng)) for _ in range(
        min(n_train, args.batches * args.batch))]
    count = args.batches * args.batch
    t = time.perf_counter()
    done = 0
    prng = random.Random(0)
    while done < count:
      chunk = jpegs[: min(len(jpegs), count - done)]
      pil_pipeline(chunk, args.size, prng)
      done += len(chunk)
    pil = count / (time.perf_counter() - t)

  print(f"cores available: {cores}")
  print(f"ours (tf.data, all cores): {ours:8.1f} img/s  = {ours / cores:8.1f} img/s/core")
  print(f"PIL per-image (1 thread) : {pil:8.1f} img/s  = {pil:8.1f} img/s/core")
  print(f"ratio ours/PIL per core  : {ours / cores / pil:.2f}x  "
        f"(total throughput {ours / pil:.2f}x)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
