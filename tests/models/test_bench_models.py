"""Smoke run of experiments/bench/bench_models.py --quick: every mode times both sides, at two
batch sizes in one run."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_bench_models_quick(tmp_path, capsys):
  pytest.importorskip("torch")
  spec = importlib.util.spec_from_file_location(
      "bench_models", os.path.join(ROOT, "experiments", "bench", "bench_models.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = tmp_path / "rows.json"
  # Two batch sizes: the train row of the first must leave the variables to the second's rows
  # (its step donates a copy of them, not the caller's arrays).
  rows = bench.main(["--quick", "--batches", "2", "3", "--json", str(out)])
  assert json.loads(out.read_text()) == rows
  assert [(r["batch"], r["mode"]) for r in rows] == [
      (b, m) for b in (2, 3) for m in ("fwd", "fwd-fused", "train")]
  for r in rows:
    assert r["jax_ms"] > 0 and r["torch_ms"] > 0
    assert r["torch_ratio"] == pytest.approx(r["torch_ms"] / r["jax_ms"])
  printed = capsys.readouterr().out
  assert "kernel paths {" in printed and "'depthwise:" in printed and "summary" in printed


def _load(name: str):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "experiments", "bench", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_profile_step_accounts_for_the_step(tmp_path, capsys):
  pytest.importorskip("torch")
  profile = _load("profile_step")
  out = profile.main(["--model", "repvit_tiny", "--batch", "2", "--reps", "2", "--top", "5",
                      "--torch", "--json", str(tmp_path / "p.json")])
  assert json.loads((tmp_path / "p.json").read_text()) == json.loads(json.dumps(out))
  by_class = out["by_class"]
  assert set(by_class) <= set(profile.CLASSES)
  assert sum(by_class.values()) == pytest.approx(out["thunks_ms"]) and out["thunks_ms"] > 0
  # A train step of a conv net has convolutions (or GEMMs), BatchNorm reductions and the
  # shift depthwise path's kernel-gradient tap reductions.
  assert by_class.get("conv", 0) + by_class.get("dot", 0) > 0
  assert by_class.get("reduce", 0) > 0 and by_class.get("tap-reduce", 0) > 0
  assert len(out["top"]) == 5 and out["top"][0]["ms"] >= out["top"][-1]["ms"]
  assert out["torch_top"] and all(r["self_ms"] >= 0 for r in out["torch_top"])
  printed = capsys.readouterr().out
  assert "| class | ms per call | share |" in printed and "PyTorch, slowest 5" in printed


def test_profile_classes_read_the_optimised_hlo():
  profile = _load("profile_step")
  hlo = """HloModule m

%fused_a (p: f32[4,6,6,8]) -> f32[8] {
  %p = f32[4,6,6,8]{3,2,1,0} parameter(0)
  %s = f32[4,4,4,8]{3,2,1,0} slice(%p), slice={[0:4], [1:5], [1:5], [0:8]}
  %c = f32[] constant(0)
  ROOT %r = f32[8]{0} reduce(%s, %c), dimensions={0,1,2}, to_apply=%add
}

%fused_b (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %m = f32[8]{0} multiply(%p, %p)
}

ENTRY %main (x: f32[4,6,6,8]) -> f32[8] {
  %x = f32[4,6,6,8]{3,2,1,0} parameter(0)
  %fusion.1 = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_a
  %copy.2 = f32[4,6,6,8]{3,2,1,0} copy(%x)
  %fusion.4 = (f32[8]{0}, f32[8]{0}) fusion(%fusion.1), kind=kLoop, calls=%fused_b
  ROOT %fusion.3 = f32[8]{0} fusion(%fusion.1), kind=kLoop, calls=%fused_b
}
"""
  comps, instrs = profile.parse_hlo(hlo)
  assert instrs["fusion.1"] == ("fusion", "f32[8]{0}", "fused_a")
  assert profile.classify(*_op(instrs["fusion.1"]), comps) == "tap-reduce"
  assert profile.classify(*_op(instrs["fusion.3"]), comps) == "elementwise"
  assert profile.classify(*_op(instrs["copy.2"]), comps) == "data movement"
  # A multi-output fusion's type is a tuple, spaces included.
  assert instrs["fusion.4"] == ("fusion", "(f32[8]{0}, f32[8]{0})", "fused_b")


def _op(instr):
  opcode, _, called = instr
  return opcode, called


def test_bench_dynamic_conv_quick_profile(capsys):
  bench = _load("bench_dynamic_conv")
  bench.main(["--quick", "--profile"])
  printed = capsys.readouterr().out
  assert printed.count("| class | ms per call | share |") == 2 * len(bench.QUICK_LAYERS)
  assert "batch 4, auto" in printed and "batch 4, static" in printed
