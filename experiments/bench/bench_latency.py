"""Batch-1 CPU latency of every registered model, per runtime, next to the papers' latencies.

For each model at its default resolution, batch 1, ``--threads`` threads: the median (and
p10-p90) of ``--runs`` timed calls after ``--warmup`` in jitted JAX (the baseline, timed in the
same run), the packaged PyTorch module (eager, fused/baked, channels_last, inference_mode) and,
where their exporters and runtimes are importable, ONNX Runtime and LiteRT (XNNPACK)
(``mobilevis_jax.latency``). Ratios are runtime / JAX (above 1: slower than JAX). The papers'
numbers (``mobilevis_jax.latency.PAPER_RESULTS``, from ``../shared/reference/*.md``) are on their
own devices (iPhones, an ARM board): they are shown for scale, not as a ratio.

    python experiments/bench/bench_latency.py --quick          # 3 models, few runs
    python experiments/bench/bench_latency.py                  # every model, 1 thread
    python experiments/bench/bench_latency.py --threads 2 --formats jax,torch,onnx,tflite

Weights are random (timing does not depend on them). Run with ``--threads 1`` before anything
else starts JAX, so that XLA's pool is limited too (the JAX rows then say ``1``).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from mobilevis_jax import latency  # noqa: E402
from mobilevis_jax.models import list_models  # noqa: E402

QUICK_MODELS = ("repvit_m0_6", "ghostnet_050", "mobilevig_ti")


def _cell(row: dict | None) -> str:
  if row is None:
    return "-"
  return f"{row['median_ms']:.1f} ({row['p10_ms']:.1f}-{row['p90_ms']:.1f})"


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_MODELS)}, 5 runs")
  p.add_argument("--models", default="*", help="shell pattern over model names")
  p.add_argument("--formats", default="auto",
                 help="comma-separated formats; auto (default): jax, torch and whichever of onnx "
                      "and tflite can run here")
  p.add_argument("--threads", type=int, default=1)
  p.add_argument("--runs", type=int, default=30)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--json", default=None, help="also write every row to this file")
  args = p.parse_args(argv)
  threads_jax = latency.limit_jax_threads(args.threads)  # before JAX starts its backend

  if args.formats == "auto":
    formats = [f for f in latency.FORMATS if latency.unavailable(f) is None]
  else:
    formats = list(latency.check_formats(args.formats))
  for f in latency.FORMATS:
    if f not in formats:
      print(f"# {f}: not measured ({latency.unavailable(f) or 'not asked for'})")
  models = [m for m in list_models() if fnmatch.fnmatchcase(m, args.models)]
  runs, warmup = args.runs, args.warmup
  if args.quick:
    models, runs, warmup = [m for m in QUICK_MODELS if m in models], 5, 2
  print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"threads {args.threads} (JAX: {threads_jax}), batch 1, {runs} runs after {warmup} "
        f"warm-up, median (p10-p90) ms")

  others = [f for f in formats if f != "jax"]
  head = (["model", "res"] + [f"{f} ms" for f in formats] + [f"{f}/jax" for f in others]
          + ["paper ms (device)", "paper top-1"])
  print("| " + " | ".join(head) + " |")
  print("|" + "---|" * len(head))
  all_rows = []
  for name in models:
    t0 = time.perf_counter()
    try:
      rows = latency.measure(name, formats, threads=args.threads, runs=runs, warmup=warmup)
    except Exception as e:  # one model's failure is reported, the table goes on
      print(f"| {name} | failed: {type(e).__name__}: {str(e)[:150]} |", flush=True)
      continue
    all_rows += rows
    by = {r["format"]: r for r in rows}
    base = by.get("jax")
    ratios = [f"{by[f]['median_ms'] / base['median_ms']:.2f}" if base and f in by else "-"
              for f in others]
    paper = latency.PAPER_RESULTS.get(name)
    paper_ms = (f"{paper.latency_ms:g} ({paper.device.split(',')[0]})"
                if paper and paper.latency_ms else "-")
    cells = ([name, rows[0]["resolution"]] + [_cell(by.get(f)) for f in formats] + ratios
             + [paper_ms, f"{paper.top1:g}" if paper else "-"])
    print("| " + " | ".join(cells) + f" |  <!-- {time.perf_counter() - t0:.0f} s -->", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(all_rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
