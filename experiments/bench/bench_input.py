"""Input backends (issue #13, part 3 a/b): tf.data vs grain vs a PIL/torchvision loader, and the
cost of a resume.

(a) Train throughput, images/s and images/s per core, of the ImageNet train transform at 224
    (RandomResizedCrop bicubic + flip + RandAugment ``rand-m9-mstd0.5-inc1`` + random erasing
    0.25 + normalisation), on the same JPEGs (fake ILSVRC2012 tars of ~500x375 images, prepared
    by TFDS's imagenet2012 builder twice: TFRecord for tf.data, ArrayRecord for grain): the
    tf.data backend and the grain backend using every core, and timm's/torchvision's transforms
    on PIL in one Python thread (timm's RandAugment and RandomErasing when timm is installed,
    else torchvision's), reading the same JPEG bytes. Ratios are per core, against tf.data.
(b) Time from building an iterator at a step (what a resume does) to its first batch: tf.data
    at step 0 and at the last step of the first epoch of a build of 20,000 small JPEGs (it
    skips the records before the position, up to an epoch: per-record cost measured here and
    scaled to one ImageNet-22K fall11 epoch, 14,197,122 records, as a labelled
    extrapolation); grain on a
    22K-sized index (a stand-in data source of 14,197,122 small JPEG records, so the layout
    arithmetic is the real one at that size) at step 0, 10^5 and 10^7.

    python experiments/bench/bench_input.py           # 256 images, 6 batches of 32
    python experiments/bench/bench_input.py --quick   # a smoke run
"""
from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np

IN22K_FALL11 = 14_197_122


def _cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _torch_transform(size: int):
  """The timm/torchvision train transform on PIL images (None without torchvision)."""
  try:
    from torchvision import transforms as T
  except ImportError:
    return None, "none"
  ops = [T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
         T.RandomHorizontalFlip()]
  try:
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.random_erasing import RandomErasing
    ops.append(rand_augment_transform("rand-m9-mstd0.5-inc1",
                                      {"translate_const": int(size * 0.45),
                                       "img_mean": (124, 116, 104)}))
    tail = [RandomErasing(0.25, mode="pixel", device="cpu")]
    kind = "timm"
  except ImportError:
    ops.append(T.RandAugment(2, 9))
    tail = [T.RandomErasing(0.25)]
    kind = "torchvision"
  ops += [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))] + tail
  return T.Compose(ops), kind


def _rate(it, batches: int, batch: int) -> float:
  next(it)  # tracing and the first fill are not throughput
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch / (time.perf_counter() - t)


def _first_batch_s(make) -> float:
  t = time.perf_counter()
  next(make())
  return time.perf_counter() - t


class _FakeSource:
  """A 22K-sized random-access source: every record the same small JPEG (only the index
  arithmetic and one batch of work are timed)."""

  def __init__(self, n: int, jpeg: bytes) -> None:
    self._n, self._ex = n, {"image": jpeg, "label": 7, "file_name": b"fake.JPEG"}

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> dict:
    return self._ex


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
  p.add_argument("--images", type=int, default=256)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--batches", type=int, default=6)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--resume-records", type=int, default=20_000,
                 help="records of the (b) tf.data build")
  args = p.parse_args(argv)
  if args.quick:
    args.images, args.batch, args.batches, args.size = 16, 4, 2, 64
    args.resume_records = 200

  from mobilevis_jax import data
  from mobilevis_jax.data import config as config_lib
  from mobilevis_jax.data import fake_archives, grain_pipeline, sources
  cores = _cores()
  print(f"cores available: {cores}")
  with tempfile.TemporaryDirectory() as tmp:
    manual = os.path.join(tmp, "manual")
    synsets = ("n01440764", "n01443537", "n01484850", "n01491361")
    fake_archives.write_ilsvrc2012(manual, images_per_class=max(1, args.images // 4), num_val=2,
                                   synsets=synsets)
    dirs = {fmt: os.path.join(tmp, fmt) for fmt in ("tfrecord", "array_record")}
    for fmt, d in dirs.items():
      sources.prepare("imagenet2012", data_dir=d, manual_dir=manual, file_format=fmt)

    def cfg_for(fmt: str, backend: str):
      c = config_lib.imagenet_deit_config(image_size=args.size)
      c.repeated_aug = 1  # the plain stream: the same sampler for all three loaders
      c.data_dir, c.file_format, c.backend, c.shuffle_buffer = dirs[fmt], fmt, backend, 256
      return c

    kw = dict(global_batch_size=args.batch, seed=0, process_index=0, process_count=1,
              num_devices=1)
    # --- (a) throughput ---
    tfd = _rate(data.train_iterator(cfg_for("tfrecord", "tfdata"), **kw), args.batches, args.batch)
    grn = _rate(grain_pipeline.train_iterator(cfg_for("array_record", "grain"), **kw),
                args.batches, args.batch)
    transform, kind = _torch_transform(args.size)
    src = grain_pipeline._open_source(cfg_for("array_record", "grain"), "train")[1]
    jpegs = [src[i]["image"] for i in range(len(src))]
    pil = None
    if transform is not None:
      import torch
      from PIL import Image
      torch.set_num_threads(1)
      count = args.batches * args.batch
      t = time.perf_counter()
      for n in range(count):
        transform(Image.open(io.BytesIO(jpegs[n % len(jpegs)])).convert("RGB"))
      pil = count / (time.perf_counter() - t)
    print(f"(a) ImageNet train transform at {args.size} (RRC bicubic + flip + RandAugment m9 + "
          f"erasing 0.25), {len(jpegs)} JPEGs of ~500x375:")
    print(f"  tf.data, all cores      : {tfd:8.1f} img/s = {tfd / cores:7.1f} img/s/core (1.00x)")
    print(f"  grain, all cores        : {grn:8.1f} img/s = {grn / cores:7.1f} img/s/core "
          f"({grn / tfd:.2f}x)")
    if pil is not None:
      print(f"  PIL + {kind} (1 thread): {pil:8.1f} img/s = {pil:7.1f} img/s/core "
            f"({pil / (tfd / cores):.2f}x)")

    # --- (b) restore to first batch ---
    # tf.data: a build of many small records (16x12 JPEGs), so the skip dominates the noise.
    many = os.path.join(tmp, "many_manual")
    fake_archives.write_ilsvrc2012(many, images_per_class=max(1, args.resume_records // 4),
                                   num_val=2, synsets=synsets, size=(16, 12))
    sources.prepare("imagenet2012", data_dir=os.path.join(tmp, "many"), manual_dir=many)
    small = cfg_for("tfrecord", "tfdata")
    small.data_dir = os.path.join(tmp, "many")
    small.randaugment, small.random_erasing, small.image_size = "", 0.0, 32
    n_train = data.dataset_info(small)["splits"]["train"]
    late = n_train // args.batch - 1

    def median_first(make) -> float:
      return float(np.median([_first_batch_s(make) for _ in range(3)]))
    t0 = median_first(lambda: data.train_iterator(small, **kw))
    t_late = median_first(lambda: data.train_iterator(small, start_step=late, **kw))
    skipped = late * args.batch
    per_record = max(t_late - t0, 0.0) / max(skipped, 1)
    print(f"(b) time from building the iterator at a step to its first batch (batch "
          f"{args.batch}, 32 px, no RandAugment; median of 3):")
    print(f"  tf.data, {n_train}-record TFRecord build: step 0 {t0:.3f} s, step {late} "
          f"(skips {skipped} records) {t_late:.3f} s -> {per_record * 1e6:.1f} us/record; "
          f"one 22K epoch ({IN22K_FALL11:,} records) extrapolated: "
          f"{per_record * IN22K_FALL11:.0f} s")
    gcfg = cfg_for("array_record", "grain")
    gcfg.randaugment, gcfg.random_erasing, gcfg.image_size = "", 0.0, 32
    fake = _FakeSource(IN22K_FALL11, jpegs[0])

    def grain_at(step):
      lay = grain_pipeline._Layout(gcfg, num_examples=IN22K_FALL11, global_batch_size=args.batch,
                                   num_devices=1, process_index=0, process_count=1, seed=0)
      return grain_pipeline.GrainTrainIterator(
          gcfg, grain_pipeline._Records(fake, False), lay, dataset="fake22k", split="train",
          start_step=step)
    next(grain_at(0))  # tracing, once per process
    times = {s: median_first(lambda s=s: grain_at(s)) for s in (0, 10**5, 10**7)}
    print(f"  grain, {IN22K_FALL11:,}-record index: " + ", ".join(
        f"step {s:,} {v:.3f} s" for s, v in times.items())
        + f" (step 10^7 / step 0: {times[10**7] / times[0]:.2f}x)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
