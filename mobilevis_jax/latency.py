"""Batch-1 inference latency of a registered model in several runtimes (``mobilevis latency``).

One measurement per runtime, on this machine's CPU, of the deployable form at the model's default
resolution (or ``resolution``), batch 1, after a warm-up: the median and the 10th / 90th
percentiles of ``runs`` timed calls (``mobilevis_jax.timing``).

=========  ==================================================================================
format     what runs
=========  ==================================================================================
jax        the jitted Flax model, fused where the family has a fused form (NHWC input)
torch      the packaged PyTorch module (``mobilevis_jax.torch_models``): fused, ParC kernels
           baked, eval, ``torch.inference_mode``, channels_last (NCHW input)
onnx       ONNX Runtime (CPU provider, ``intra_op_num_threads``) on ``interop.onnx_export``'s
           file (fused, NCHW, static batch 1)
tflite     the LiteRT interpreter (``ai_edge_litert``, else ``tf.lite``; its default XNNPACK
           delegate, ``num_threads``) on ``interop.tflite_export``'s fp32 file (fused)
=========  ==================================================================================

Threads: ``threads`` goes to ``torch.set_num_threads``, ONNX Runtime's ``intra_op_num_threads``
and LiteRT's ``num_threads``. XLA's CPU thread pool is fixed when JAX's backend starts: with
``threads=1`` before that, :func:`limit_jax_threads` turns off its multi-threaded Eigen; after
it, JAX runs with XLA's default pool and the row says ``xla``.

Weights are random (filled from the abstract shapes, no ``model.init`` compile): latency does not
depend on the values, as long as they are finite and not denormal.

:data:`PAPER_RESULTS` holds the papers' own latencies and top-1, with their devices and sources.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mobilevis_jax.models import registry
from mobilevis_jax.timing import sample_ms, spread_ms

FORMATS = ("jax", "torch", "onnx", "tflite")


@dataclasses.dataclass(frozen=True)
class PaperResult:
  """A model's latency and ImageNet-1k top-1 as its paper (or official README) reports them."""
  family: str
  latency_ms: float | None  # None: the paper gives no number for this model
  device: str
  top1: float
  source: str  # ../shared/reference/<file>.md, where the number and its conditions are recorded
  note: str = ""


_IPHONE12 = "iPhone 12, Core ML (iOS 16), batch 1, 224"
_IPHONE13 = "iPhone 13 mini NPU, Core ML, batch 1, 224"
_PARC_CPU = "CPU (README; device unstated), 224"
_RK3288 = "RK3288 ARM, ONNX -> MNN, mean of 100 runs, 256"
_NONE = "-"
_REPVIT, _MOBILEVIG = "../shared/reference/repvit.md", "../shared/reference/mobilevig.md"
_PN, _PARC = "../shared/reference/parameternet.md", "../shared/reference/parc.md"

# The papers' numbers (top-1: ImageNet-1k, 300 epochs for RepViT; the sources say which recipe).
PAPER_RESULTS: dict[str, PaperResult] = {
    "repvit_m0_6": PaperResult("repvit", 0.6, _IPHONE12, 74.1, _REPVIT, "README, '~0.6 ms'"),
    "repvit_m0_9": PaperResult("repvit", 0.9, _IPHONE12, 78.7, _REPVIT),
    "repvit_m1_0": PaperResult("repvit", 1.0, _IPHONE12, 80.0, _REPVIT),
    "repvit_m1_1": PaperResult("repvit", 1.1, _IPHONE12, 80.7, _REPVIT),
    "repvit_m1_5": PaperResult("repvit", 1.5, _IPHONE12, 82.3, _REPVIT),
    "repvit_m2_3": PaperResult("repvit", 2.3, _IPHONE12, 83.3, _REPVIT),
    "repvit_m1": PaperResult("repvit (legacy)", 0.9, _IPHONE12, 78.5, _REPVIT),
    "repvit_m2": PaperResult("repvit (legacy)", 1.1, _IPHONE12, 80.6, _REPVIT),
    "repvit_m3": PaperResult("repvit (legacy)", 1.3, _IPHONE12, 81.4, _REPVIT),
    "mobilevig_ti": PaperResult("mobilevig", 0.78, _IPHONE13, 75.7, _MOBILEVIG),
    "mobilevig_s": PaperResult("mobilevig", 0.82, _IPHONE13, 78.2, _MOBILEVIG,
                               "latency recalled, not confirmed by the abstract"),
    "mobilevig_m": PaperResult("mobilevig", 1.02, _IPHONE13, 80.6, _MOBILEVIG,
                               "latency recalled, not confirmed by the abstract"),
    "mobilevig_b": PaperResult("mobilevig", 2.30, _IPHONE13, 82.6, _MOBILEVIG),
    "parameternet_600m": PaperResult("parameternet", None, _NONE, 81.6, _PN,
                                     "IN-22k -> 1k (IN-1k only: 79.0); paper latency: Xeon "
                                     "8378C ONNX 1 thread, Fig. 4, numbers not retrieved"),
    "ghostnet_600m": PaperResult("parameternet", None, _NONE, 78.6, _PN, "IN-1k only"),
    "parameternet_300m": PaperResult("parameternet", None, _NONE, 79.1, _PN,
                                     "IN-22k -> 1k (IN-1k only: 77.2)"),
    "ghostnet_300m": PaperResult("parameternet", None, _NONE, 76.3, _PN, "IN-1k only"),
    "ghostnet_100": PaperResult("parameternet", None, _NONE, 73.9, _PN, "GhostNet v1 paper"),
    "ghostnet_130": PaperResult("parameternet", None, _NONE, 75.7, _PN, "GhostNet v1 paper"),
    "parcnet_s": PaperResult("parcnet", 353.0, _RK3288, 78.6, _PARC,
                             "DP chip: 98 ms; MobileViT-S 457 ms RK3288, 78.4"),
    "parc_convnext_xt": PaperResult("parc_convnets", 48.0, _PARC_CPU, 78.3, _PARC),
    "parc_resnet50": PaperResult("parc_convnets", 98.0, _PARC_CPU, 79.6, _PARC),
    "parc_mobilenetv2": PaperResult("parc_convnets", 27.0, _PARC_CPU, 71.1, _PARC),
}


def random_variables(name: str, resolution: int | None = None, seed: int = 0,
                     **model_kwargs: Any) -> dict:
  """Random variables of model ``name``, filled from the abstract shapes (no ``init`` compile).

  numpy arrays; weights are ``N(0, 1/fan_in)`` (activations stay of order one, so no denormals
  slow a run down), BatchNorm scales and running variances 1, biases and running means 0.
  """
  model = registry.create_model(name, **model_kwargs)
  shapes = registry.abstract_variables(
      model, resolution or registry.model_info(name).default_resolution)
  rng = np.random.default_rng(seed)

  # numpy leaves: hundreds of small device transfers would cost more than the fill itself.
  def fill(path, s):
    key = jax.tree_util.keystr(path)
    if key.endswith(("['var']", "['scale']")):
      return np.ones(s.shape, s.dtype)
    if key.endswith(("['mean']", "['bias']")) or len(s.shape) < 2:
      return np.zeros(s.shape, s.dtype)
    fan_in = int(np.prod(s.shape[:-1]))
    return (rng.standard_normal(s.shape, dtype=np.float32) / np.sqrt(fan_in)).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(fill, dict(shapes))


def limit_jax_threads(threads: int | None) -> str:
  """Ask XLA's CPU backend for one thread if ``threads == 1`` and it has not started yet.

  Returns what the JAX rows report as their thread count: ``'1'`` when the limit is in force,
  else ``'xla'`` (XLA's default pool, which a started backend keeps).
  """
  from jax._src import xla_bridge

  flag = "--xla_cpu_multi_thread_eigen=false"
  if flag in os.environ.get("XLA_FLAGS", ""):
    return "1"
  if threads != 1 or xla_bridge.backends_are_initialized():
    return "xla"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  return "1"


def _jax_runner(name, variables, hw, threads, kwargs, workdir) -> tuple[Callable, str]:
  del workdir
  model = registry.create_model(name, **kwargs)
  try:
    model, variables = registry.fuse(model, variables)
  except (KeyError, ValueError, NotImplementedError):
    pass  # no fused form for this family: the model as it is
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  # On the device once: numpy leaves would be copied in at every call.
  variables = jax.device_put(variables)
  x = jnp.zeros((1, *hw, 3), jnp.float32)
  return (lambda: fn(variables, x)), limit_jax_threads(threads)


def _torch_runner(name, variables, hw, threads, kwargs, workdir) -> tuple[Callable, str]:
  del workdir
  import torch

  from mobilevis_jax.interop.export import deployable_torch_module
  # measure() has checked the variables and the resolution.
  module, _ = deployable_torch_module(name, variables, resolution=hw, fuse=True, check=False,
                                      **kwargs)
  module = module.to(memory_format=torch.channels_last)
  x = torch.zeros(1, 3, *hw).contiguous(memory_format=torch.channels_last)
  if threads:
    torch.set_num_threads(threads)

  def run():
    with torch.inference_mode():
      return module(x)

  return run, str(torch.get_num_threads())


def _onnx_runner(name, variables, hw, threads, kwargs, workdir) -> tuple[Callable, str]:
  # The other exporters' module: imported here, so that `mobilevis latency --format jax` does not
  # need onnx (the [export] extra).
  import onnxruntime as ort

  from mobilevis_jax.interop.onnx_export import export_onnx
  path = os.path.join(workdir, f"{name}.onnx")
  export_onnx(name, variables, path, resolution=hw, fuse=True, layout="nchw", dynamic_batch=False,
              **kwargs)
  options = ort.SessionOptions()
  options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default (all cores)
  options.inter_op_num_threads = 1
  options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  (inp,) = session.get_inputs()
  feed = {inp.name: np.zeros((1, 3, *hw), np.float32)}
  return (lambda: session.run(None, feed)), str(threads or "ort")


def _tflite_interpreter(path: str, threads: int | None):
  try:
    from ai_edge_litert.interpreter import Interpreter
  except ImportError:
    import tensorflow as tf
    Interpreter = tf.lite.Interpreter
  # Both interpreters apply the XNNPACK delegate to float models by default.
  return Interpreter(model_path=path, num_threads=threads or None)


def _tflite_runner(name, variables, hw, threads, kwargs, workdir) -> tuple[Callable, str]:
  from mobilevis_jax.interop.tflite_export import export_tflite
  path = os.path.join(workdir, f"{name}.tflite")
  export_tflite(name, variables, path, resolution=hw, fuse=True, **kwargs)
  interpreter = _tflite_interpreter(path, threads)
  interpreter.allocate_tensors()
  (inp,) = interpreter.get_input_details()
  out = interpreter.get_output_details()[0]["index"]
  x = np.zeros(inp["shape"], inp["dtype"])

  def run():
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(out)

  return run, str(threads or "litert")


_RUNNERS = {"jax": _jax_runner, "torch": _torch_runner, "onnx": _onnx_runner,
            "tflite": _tflite_runner}


def check_formats(formats: str | Iterable[str]) -> tuple[str, ...]:
  """The formats asked for (``'all'`` is every one), or a ValueError naming the unknown one."""
  if isinstance(formats, str):
    formats = FORMATS if formats == "all" else tuple(f.strip() for f in formats.split(","))
  formats = tuple(formats)
  for f in formats:
    if f not in FORMATS:
      raise ValueError(f"unknown latency format {f!r}; available: {', '.join(FORMATS)}, all")
  if not formats:
    raise ValueError("no latency format given")
  return formats


# What each format needs, besides jax: (importable modules, any one of which suffices)*.
_NEEDS = {"jax": (), "torch": (("torch",),),
          "onnx": (("onnxruntime",), ("mobilevis_jax.interop.onnx_export",)),
          "tflite": (("ai_edge_litert", "tensorflow"), ("mobilevis_jax.interop.tflite_export",))}


def unavailable(fmt: str) -> str | None:
  """Why format ``fmt`` cannot run in this environment (a missing package), or None."""
  import importlib.util

  def found(module: str) -> bool:
    try:
      return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
      return False

  for alternatives in _NEEDS[check_formats((fmt,))[0]]:
    if not any(found(m) for m in alternatives):
      return f"{fmt} needs {' or '.join(alternatives)}"
  return None


@contextlib.contextmanager
def _torch_threads_restored():
  try:
    import torch
  except ImportError:
    yield
    return
  before = torch.get_num_threads()
  try:
    yield
  finally:
    torch.set_num_threads(before)


def measure(name: str, formats: str | Iterable[str] = ("jax", "torch"), *,
            threads: int | None = 1, runs: int = 50, warmup: int = 5,
            resolution: int | str | tuple[int, int] | None = None,
            variables: Mapping | None = None, **model_kwargs: Any) -> list[dict]:
  """Batch-1 latency of model ``name`` in each of ``formats``.

  Args:
    name: a registered model name.
    formats: some of ``FORMATS`` (a tuple, or a comma-separated string; ``'all'``: every one).
    threads: threads for the runtimes (see the module docstring); None: each runtime's default.
    runs: timed calls per format; ``warmup``: untimed calls before them (compilation, allocator).
    resolution: input ``H`` or ``'HxW'`` (default: the model's).
    variables: the model's Flax variables; default: random ones (:func:`random_variables`).
    **model_kwargs: the model's arguments (``num_classes``, ...).

  Returns:
    One row per format: model, format, resolution, threads, runs, median_ms, p10_ms, p90_ms.
  """
  from mobilevis_jax.interop.export import _check_resolution, _check_variables, parse_resolution

  formats = check_formats(formats)
  if runs < 1 or warmup < 0:
    raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
  if threads is not None and threads < 1:
    raise ValueError(f"threads must be >= 1, got {threads}")
  hw = parse_resolution(resolution, name)
  model = registry.create_model(name, **model_kwargs)
  if variables is None:
    variables = random_variables(name, **model_kwargs)
  else:
    _check_variables(name, model, variables, model_kwargs)
  _check_resolution(name, model, variables, hw)  # before any runtime is set up
  rows = []
  with tempfile.TemporaryDirectory(prefix="mobilevis-latency-") as workdir, \
      _torch_threads_restored():
    for fmt in formats:
      run, used_threads = _RUNNERS[fmt](name, variables, hw, threads, model_kwargs, workdir)
      times = sample_ms(run, reps=runs, warmup=warmup)
      rows.append({"model": name, "format": fmt, "resolution": f"{hw[0]}x{hw[1]}",
                   "threads": used_threads, "runs": runs, **spread_ms(times)})
  return rows


def format_table(rows: list[dict], baseline: str = "jax") -> str:
  """A markdown table of :func:`measure` rows, with each row's median over the ``baseline``
  format's median of the same model (``x{baseline}``: above 1 means slower than it)."""
  base = {r["model"]: r["median_ms"] for r in rows if r["format"] == baseline}
  lines = [f"| model | format | resolution | threads | runs | median ms | p10 ms | p90 ms | "
           f"/ {baseline} |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ratio = (f"{r['median_ms'] / base[r['model']]:.2f}" if r["model"] in base else "-")
    lines.append(f"| {r['model']} | {r['format']} | {r['resolution']} | {r['threads']} | "
                 f"{r['runs']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f} | {r['p90_ms']:.2f} | "
                 f"{ratio} |")
  return "\n".join(lines)
