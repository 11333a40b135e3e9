"""Smoke run of experiments/bench/bench_models.py --quick: every mode times both sides."""
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
  rows = bench.main(["--quick", "--json", str(out)])
  assert json.loads(out.read_text()) == rows
  assert [r["mode"] for r in rows] == ["fwd", "fwd-fused", "train"]
  for r in rows:
    assert r["jax_ms"] > 0 and r["torch_ms"] > 0
    assert r["torch_ratio"] == pytest.approx(r["torch_ms"] / r["jax_ms"])
  printed = capsys.readouterr().out
  assert "kernel paths {'depthwise:" in printed and "summary" in printed
