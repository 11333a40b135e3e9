"""fp32 vs int8 LiteRT top-1 of a trained model, fused and unfused (issue #11, item 3).

Re-parameterised models are known to quantise badly (a fused RepViT block adds three branches'
weight ranges into one kernel). This measures it on a training work directory: the model is
exported with ``mobilevis_jax.interop.tflite_export.export_tflite`` as float32 and as
full-integer int8 (activation ranges calibrated on ``--calibration-count`` train images through
the eval transform, as ``mobilevis export --format tflite --quantize int8`` does), fused and
unfused, and each file is evaluated on the whole eval split in the LiteRT interpreter, next to the
jitted JAX model on the same images.

    PYTHONPATH=$PWD python -m mobilevis_jax train --workdir /tmp/c_digits        # README (1)
    PYTHONPATH=$PWD python experiments/bench/bench_int8.py --workdir /tmp/c_digits

The data section is the packaged ``default`` recipe's (``--config`` names another); the export
resolution is its ``image_size``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def eval_split(cfg, split: str) -> tuple[np.ndarray, np.ndarray]:
  """All images and labels of ``split`` through the eval transform."""
  from mobilevis_jax import data
  cfg = cfg.copy_and_resolve_references()
  cfg.eval_split = split
  images, labels = [], []
  for batch in data.eval_iterator(cfg, global_batch_size=64, process_index=0, process_count=1):
    keep = np.asarray(batch["mask"]) > 0
    images.append(np.asarray(batch["image"])[keep])
    labels.append(np.asarray(batch["label"])[keep])
  return np.concatenate(images), np.concatenate(labels)


def tflite_logits(path: str, images: np.ndarray) -> np.ndarray:
  from mobilevis_jax.interop import tflite_export
  with open(path, "rb") as f:
    it = tflite_export.interpreter(f.read())
  return np.concatenate([tflite_export.run(it, images[i:i + 1]) for i in range(len(images))])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="training work directory (or variables dir)")
  p.add_argument("--config", default="default", help="recipe whose data section to use")
  p.add_argument("--calibration-count", type=int, default=128)
  p.add_argument("--split", default=None, help="eval split (default: the recipe's eval_split)")
  args = p.parse_args()

  import jax

  from mobilevis_jax.data.calibration import calibration_images
  from mobilevis_jax.interop.tflite_export import export_tflite
  from mobilevis_jax.models import registry
  from mobilevis_jax.train.checkpoint import restore_variables
  from mobilevis_jax.train.config import load_config

  cfg = load_config(args.config)
  variables, meta = restore_variables(args.workdir)
  name, kwargs = meta["model_name"], dict(meta.get("model_kwargs", {}))
  kwargs.pop("parc_method", None)
  res = int(cfg.data.image_size)
  split = args.split or cfg.data.eval_split
  images, labels = eval_split(cfg.data, split)
  calib = calibration_images(args.calibration_count, image_size=res, data_config=cfg.data,
                             split=cfg.data.train_split,
                             normalization=registry.model_info(name).input_convention)
  model = registry.create_model(name, **kwargs)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  jax_top1 = float((np.asarray(logits).argmax(-1) == labels).mean())

  rows = []
  with tempfile.TemporaryDirectory() as d:
    for fuse in (True, False):
      row = {"form": "fused" if fuse and registry.can_fuse(model) else "unfused"}
      for q in (None, "int8"):
        path = os.path.join(d, f"{row['form']}-{q or 'fp32'}.tflite")
        t = time.time()
        info = export_tflite(name, variables, path, resolution=res, fuse=fuse, quantize=q,
                             calibration=calib if q else None, **kwargs)
        row[f"{q or 'fp32'}_s"] = time.time() - t
        row[f"{q or 'fp32'}_kb"] = info["bytes"] / 1024
        row[f"{q or 'fp32'}_logits"] = out = tflite_logits(path, images)
        row[q or "fp32"] = float((out.argmax(-1) == labels).mean())
      f32, i8 = row["fp32_logits"], row["int8_logits"]
      # More sensitive than top-1 on an easy dataset: how far int8 moves the logits.
      row["agree"] = float((f32.argmax(-1) == i8.argmax(-1)).mean())
      row["err"] = float(np.abs(i8 - f32).max() / np.abs(f32).max())
      row["mean_err"] = float(np.abs(i8 - f32).mean() / np.abs(f32).mean())
      rows.append(row)

  print(f"{name} {kwargs} at {res}x{res}, {meta.get('step')} steps; {split}: {len(labels)} "
        f"images; int8 calibrated on {args.calibration_count} {cfg.data.train_split} images; "
        f"JAX top-1 {100 * jax_top1:.2f}%")
  print("| form | fp32 top-1 | int8 top-1 | int8 - fp32 | int8/fp32 top-1 agree | "
        "max / mean rel. logit error | fp32 KiB | int8 KiB |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['form']} | {100 * r['fp32']:.2f}% | {100 * r['int8']:.2f}% | "
          f"{100 * (r['int8'] - r['fp32']):+.2f} pt | {100 * r['agree']:.2f}% | "
          f"{r['err']:.3f} / {r['mean_err']:.3f} | {r['fp32_kb']:.0f} | {r['int8_kb']:.0f} |")


if __name__ == "__main__":
  main()
