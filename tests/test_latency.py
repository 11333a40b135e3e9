"""``mobilevis latency`` / ``mobilevis_jax.latency`` and the timing helpers it uses.

Timings are printed, never asserted: the tests check that each runtime runs the deployable model
and that the table and rows say what was measured (formats, resolution, threads, a spread that
brackets the median). The ONNX Runtime and LiteRT runners need the ONNX / LiteRT exporters
(``mobilevis_jax.interop.onnx_export`` / ``tflite_export``) and skip until those exist.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

import mobilevis_jax as mv
from mobilevis_jax import cli, latency, timing

MODEL, RES = "ghostnet_050", "32"


def test_sample_and_spread():
  calls = []
  times = timing.sample_ms(lambda: calls.append(1), reps=7, warmup=3)
  assert len(calls) == 10 and times.shape == (7,) and (times >= 0).all()
  s = timing.spread_ms(np.arange(1.0, 11.0))
  assert s == pytest.approx({"median_ms": 5.5, "p10_ms": 1.9, "p90_ms": 9.1})
  with pytest.raises(ValueError, match="reps must be >= 1"):
    timing.sample_ms(lambda: None, reps=0)
  with pytest.raises(ValueError, match="warmup must be >= 0"):
    timing.sample_ms(lambda: None, reps=1, warmup=-1)


def test_random_variables_are_finite_and_shaped():
  import jax

  from tests.helpers import abstract_variables
  v = latency.random_variables(MODEL, resolution=32)
  shapes = abstract_variables(MODEL, 32)
  got = jax.tree_util.tree_flatten_with_path(v)[0]
  want = jax.tree_util.tree_flatten_with_path(shapes)[0]
  assert [jax.tree_util.keystr(p) for p, _ in got] == [jax.tree_util.keystr(p) for p, _ in want]
  for (path, a), (_, s) in zip(got, want, strict=True):
    assert a.shape == s.shape and np.isfinite(np.asarray(a)).all()
    if jax.tree_util.keystr(path).endswith("['var']"):
      assert (np.asarray(a) == 1).all()


@pytest.fixture(scope="module")
def cli_rows(tmp_path_factory):
  torch = pytest.importorskip("torch")
  out = tmp_path_factory.mktemp("latency") / "rows.json"
  import contextlib
  import io
  buf = io.StringIO()
  threads = torch.get_num_threads()
  torch.set_num_threads(2)
  try:
    with contextlib.redirect_stdout(buf):
      assert cli.main(["latency", "--model", MODEL, "--format", "jax,torch", "--resolution", RES,
                       "--runs", "4", "--warmup", "1", "--threads", "1", "--json", str(out)]) == 0
    threads_after = torch.get_num_threads()
  finally:
    torch.set_num_threads(threads)
  return buf.getvalue(), json.loads(out.read_text()), threads_after


def test_cli_prints_the_table(cli_rows):
  printed, rows, _ = cli_rows
  print(printed)
  assert [r["format"] for r in rows] == ["jax", "torch"]
  for r in rows:
    assert (r["model"], r["resolution"], r["runs"]) == (MODEL, "32x32", 4)
    assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
  assert rows[1]["threads"] == "1"  # torch.set_num_threads(1)
  assert rows[0]["threads"] in ("1", "xla")  # '1' only if JAX's backend had not started
  lines = printed.strip().splitlines()
  assert lines[0].startswith("| model | format | resolution | threads | runs | median ms")
  assert re.match(rf"\| {MODEL} \| jax \| 32x32 \| .* \| 1\.00 \|$", lines[2])
  ratio = float(lines[3].rsplit("|", 2)[1])
  assert ratio == pytest.approx(rows[1]["median_ms"] / rows[0]["median_ms"], abs=0.01)


def test_torch_threads_are_restored(cli_rows):
  # The torch row ran on 1 thread; the process's setting (2) is back afterwards.
  assert cli_rows[1][1]["threads"] == "1" and cli_rows[2] == 2


@pytest.mark.parametrize("argv, message", [
    (["--format", "pickle"], "unknown latency format 'pickle'; available: jax, torch, onnx"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--resolution", "32x"], "resolution must be H or HxW"),
])
def test_cli_bad_input(argv, message):
  with pytest.raises(SystemExit, match=re.escape(message)):
    cli.main(["latency", "--model", MODEL, *argv])


def test_cli_unknown_model():
  with pytest.raises(SystemExit, match="unknown model 'ghostnet_05'.*ghostnet_050"):
    cli.main(["latency", "--model", "ghostnet_05"])


def test_measure_bad_input():
  with pytest.raises(ValueError, match="runs must be >= 1"):
    latency.measure(MODEL, "jax", runs=0)
  with pytest.raises(ValueError, match="no latency format"):
    latency.check_formats(())
  assert latency.check_formats("all") == latency.FORMATS


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_missing_runtime_is_named(fmt):
  why = latency.unavailable(fmt)
  if why is None:
    pytest.skip(f"{fmt} is available here")
  with pytest.raises(SystemExit, match=f"latency of {MODEL}: {fmt} needs"):
    cli.main(["latency", "--model", MODEL, "--format", fmt])


@pytest.mark.parametrize("fmt, exporter", [("onnx", "mobilevis_jax.interop.onnx_export"),
                                           ("tflite", "mobilevis_jax.interop.tflite_export")])
def test_exported_runtimes(fmt, exporter):
  pytest.importorskip(exporter)
  if latency.unavailable(fmt):
    pytest.skip(latency.unavailable(fmt))
  (row,) = latency.measure(MODEL, fmt, threads=1, runs=3, warmup=1, resolution=32)
  assert (row["format"], row["threads"], row["resolution"]) == (fmt, "1", "32x32")
  assert 0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]


def test_paper_results_name_registered_models():
  names = set(mv.list_models())
  for name, r in latency.PAPER_RESULTS.items():
    assert name in names, name
    assert 60 < r.top1 < 90 and (r.latency_ms is None or r.latency_ms > 0)
    assert re.fullmatch(r"\.\./shared/reference/\w+\.md", r.source), r.source
  assert {r.family for r in latency.PAPER_RESULTS.values() if r.latency_ms} >= {
      "repvit", "mobilevig", "parcnet", "parc_convnets"}
