"""Where a jitted step's time goes, op by op: the profile behind a ``bench_models.py`` ratio.

Compiles one of ``bench_models.py``'s JAX programs (``--mode train``: forward + backward + AdamW;
``fwd``: the eval forward) for a model at its benchmark resolution, runs it ``--reps`` times
under ``jax.profiler.trace`` and sums the time of every XLA:CPU thunk (one per top-level HLO
instruction: a fusion, a convolution, a dot, a copy) per call. Each instruction is put in a class
read off its optimised HLO:

* ``conv``: contains a ``convolution`` (XLA's Eigen/oneDNN convolutions: the dense convs and
  their input/weight gradients);
* ``dot``: contains a ``dot`` (GEMMs: 1x1 convs written as matmuls, dense layers, per-sample
  einsums);
* ``tap-reduce``: a reduction that reads shifted windows (``slice``) of a map: on the ``shift``
  depthwise path, the kernel gradient, one such pass per tap;
* ``reduce``: any other reduction (BatchNorm statistics, pooling, losses, optimizer norms);
* ``taps``: an elementwise loop over shifted windows (the ``shift`` depthwise forward and its
  input gradient);
* ``elementwise``: the other loop fusions (activations, BatchNorm application, AdamW updates);
* ``data movement``: copies, transposes, pads, concatenates, slices on their own.

Printed: the per-class milliseconds per call and share of the thunks' total, then the slowest
instructions with their class and output shape. With ``--torch``, the same step of the
PyTorch reference (``bench_models.py``'s official-tree module, channels_last) under
``torch.profiler``: its slowest operators by self CPU time, so the two sides can be read next to
each other.

    python experiments/bench/profile_step.py --model ghostnet_100 --batch 32 --torch
    python experiments/bench/profile_step.py --model repvit_m1_1 --mode fwd --batch 1
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_models  # noqa: E402

CLASSES = ("conv", "dot", "tap-reduce", "reduce", "taps", "elementwise", "data movement", "other")
_MOVEMENT = {"copy", "transpose", "pad", "concatenate", "slice", "dynamic-slice",
             "dynamic-update-slice", "reshape", "bitcast", "broadcast", "gather", "scatter"}
# The reference models of bench_models.py, and its 2-stage RepViT smoke model.
TABLE = {**bench_models.MODELS, **bench_models.QUICK}
# name = type opcode(...); the type is a token or, for multi-output fusions, a tuple with spaces.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\(")


def parse_hlo(text: str) -> tuple[dict[str, list[str]], dict[str, tuple[str, str, str]]]:
  """``(computations, entry)``: each computation's opcodes, and each instruction of the entry
  computation (and of any computation it calls through while/conditional) as
  ``name -> (opcode, output type, called computation or '')``."""
  comps: dict[str, list[str]] = {}
  instrs: dict[str, tuple[str, str, str]] = {}
  current = None
  for line in text.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      current = head.group(1)
      comps[current] = []
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      name, out_type, opcode = m.groups()
      comps[current].append(opcode)
      called = re.search(r"calls=%?([\w.\-]+)", line)
      instrs[name] = (opcode, out_type, called.group(1) if called else "")
  return comps, instrs


def classify(opcode: str, called: str, comps: dict[str, list[str]]) -> str:
  body = set(comps.get(called, ())) if opcode == "fusion" else {opcode}
  if "convolution" in body:
    return "conv"
  if "dot" in body:
    return "dot"
  if "reduce" in body or "reduce-window" in body:
    return "tap-reduce" if "slice" in body else "reduce"
  if opcode == "fusion":
    if "slice" in body:
      return "taps"
    if body <= _MOVEMENT | {"parameter", "constant"}:
      return "data movement"
    return "elementwise"
  if opcode in _MOVEMENT:
    return "data movement"
  return "other"


def thunk_times(trace_dir: str, names: set[str]) -> dict[str, float]:
  """Summed microseconds per HLO instruction name in the perfetto trace under ``trace_dir``."""
  (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  total: dict[str, float] = collections.defaultdict(float)
  for e in events:
    if e.get("ph") == "X" and e.get("name") in names:
      total[e["name"]] += float(e.get("dur") or 0.0)
  return total


def profile_jax(name: str, mode: str, batch: int, reps: int, top: int) -> dict:
  res, _, _, jax_factory = TABLE[name]
  model = jax_factory()
  variables = bench_models.random_variables(model, res)
  rng = np.random.default_rng(batch)
  x = jnp.asarray(rng.standard_normal((batch, res, res, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 1000, size=batch), jnp.int32)
  if mode == "train":
    step, state = bench_models.make_jax_train_step(model, variables)
    compiled = step.lower(state, x, y).compile()
    holder = [state]

    def run():
      holder[0], loss = compiled(holder[0], x, y)
      return loss
  else:
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    compiled = fn.lower(variables, x).compile()

    def run():
      return compiled(variables, x)
  out = profile_compiled(compiled.as_text(), run, reps, top)
  return {"model": name, "mode": mode, "batch": batch, "resolution": res, "reps": reps, **out}


def profile_compiled(hlo_text: str, run, reps: int, top: int) -> dict:
  """Per-class and per-instruction milliseconds of ``run()`` (a call of the compiled program
  whose optimised HLO is ``hlo_text``), averaged over ``reps`` profiled calls after a warm-up."""
  comps, instrs = parse_hlo(hlo_text)
  jax.block_until_ready(run())  # warm-up: allocations, first-run costs
  with tempfile.TemporaryDirectory(prefix="mobilevis-profile-") as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      t0 = time.perf_counter()
      for _ in range(reps):
        jax.block_until_ready(run())
      wall_ms = (time.perf_counter() - t0) / reps * 1e3
    times = thunk_times(d, set(instrs))
  per_call = {k: v / reps / 1e3 for k, v in times.items()}  # ms per call
  by_class: dict[str, float] = collections.defaultdict(float)
  rows = []
  for instr, ms in per_call.items():
    opcode, out_type, called = instrs[instr]
    cls = classify(opcode, called, comps)
    by_class[cls] += ms
    rows.append({"instruction": instr, "class": cls, "ms": ms, "output": out_type})
  rows.sort(key=lambda r: -r["ms"])
  # wall_ms (under the profiler) against thunks_ms: what the profile does not see (dispatch,
  # the thunk executor's waits, the two threads' overlap).
  return {"thunks_ms": sum(by_class.values()), "wall_ms": wall_ms, "by_class": dict(by_class),
          "top": rows[:top], "thunks": len(per_call)}


def format_profile(out: dict) -> str:
  """The class table and the slowest instructions of :func:`profile_compiled`'s result."""
  lines = ["| class | ms per call | share |", "|---|---|---|"]
  for cls in CLASSES:
    ms = out["by_class"].get(cls, 0.0)
    if ms:
      lines.append(f"| {cls} | {ms:.1f} | {100 * ms / out['thunks_ms']:.1f}% |")
  lines.append(f"\nslowest {len(out['top'])} instructions:")
  for r in out["top"]:
    lines.append(f"  {r['ms']:9.2f} ms  {r['class']:<13} {r['instruction']:<28} "
                 f"{r['output'][:70]}")
  return "\n".join(lines)


def profile_torch(name: str, mode: str, batch: int, reps: int, top: int) -> list[dict]:
  import torch
  from torch.profiler import ProfilerActivity, profile
  res, ref_builder, _, _ = TABLE[name]
  factory, _ = ref_builder(name)
  rng = np.random.default_rng(batch)
  x = torch.from_numpy(rng.standard_normal((batch, 3, res, res)).astype(np.float32))
  y = torch.from_numpy(rng.integers(0, 1000, size=batch).astype(np.int64))
  run = (bench_models.torch_train_step(factory(), x, y) if mode == "train"
         else bench_models.torch_forward(factory(), x))
  run()
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(reps):
      run()
  rows = [{"op": e.key, "self_ms": e.self_cpu_time_total / reps / 1e3, "calls": e.count // reps}
          for e in prof.key_averages()]
  rows.sort(key=lambda r: -r["self_ms"])
  return rows[:top]


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", required=True, choices=sorted(TABLE))
  p.add_argument("--mode", default="train", choices=("train", "fwd"))
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--top", type=int, default=15)
  p.add_argument("--torch", action="store_true", help="also profile the PyTorch reference")
  p.add_argument("--json", default=None, help="also write the result to this file")
  args = p.parse_args(argv)
  if args.batch < 1 or args.reps < 1:
    p.error("--batch and --reps must be >= 1")
  out = profile_jax(args.model, args.mode, args.batch, args.reps, args.top)
  print(f"# {args.model} @{out['resolution']} {args.mode} batch {args.batch}: "
        f"{out['thunks_ms']:.1f} ms of XLA thunks per call ({out['thunks']} thunks), "
        f"{out['wall_ms']:.1f} ms wall under the profiler")
  print(format_profile(out))
  if args.torch:
    out["torch_top"] = profile_torch(args.model, args.mode, args.batch, args.reps, args.top)
    print(f"\nPyTorch, slowest {args.top} operators by self CPU time (ms per call):")
    for r in out["torch_top"]:
      print(f"  {r['self_ms']:9.2f} ms  x{r['calls']:<4} {r['op']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
