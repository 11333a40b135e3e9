"""Smoke run of the input-pipeline benchmark (no timing assertions)."""
import importlib.util
import pathlib

import mobilevis_jax.data  # noqa: F401  (first: it orders the native-library loads)


def test_bench_quick_runs_and_prints_a_ratio(capsys):
  path = pathlib.Path(__file__).parents[2] / "experiments" / "bench" / "bench_input_pipeline.py"
  spec = importlib.util.spec_from_file_location("bench_input_pipeline", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  assert bench.main(["--quick"]) == 0
  out = capsys.readouterr().out
  ratio = float(out.split("ratio ours/PIL per core  :")[1].split("x")[0])
  assert ratio > 0
