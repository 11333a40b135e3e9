"""What the ONNX and LiteRT export tests share: the models, their resolutions, random variables.

Variables are drawn by shape (``jax.eval_shape`` of ``init``, then numpy random numbers), not by
a jitted ``init``, which would cost a compile per model. Weights are fan-in scaled, BatchNorm
scales, biases and running statistics random and away from the identity, so every exported
tensor matters to the logits.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

import mobilevis_jax as mv
from mobilevis_jax.models import registry
from tests.helpers import abstract_variables

# The smallest model of every family (two for ParameterNet: dynamic and static GhostNet), at a
# tiny resolution it accepts; the ParC families at 64x96 (non-square, ParC kernels resampled
# along both axes), MobileViG at 64 (its stride-32 grid stays 2x2).
CASES: dict[str, tuple[tuple[int, int], dict]] = {
    "repvit_m0_6": ((32, 32), {"distillation": True}),
    "mobilevig_ti": ((64, 64), {}),
    "parameternet_300m": ((32, 32), {}),
    "ghostnet_050": ((32, 32), {}),
    "parcnet_xs": ((64, 96), {}),
    "parc_mobilenetv2": ((64, 96), {}),
    "parc_convnext_xt": ((64, 64), {}),
    "parc_resnet50": ((32, 32), {}),
    "regnety_002": ((32, 32), {}),
}


# jax2onnx's conversion time grows with the square of the graph size, and the per-sample dynamic
# convolutions with a symbolic batch make ParameterNet's graph large: a dynamic-batch export of
# parameternet_300m did not finish in 8 min on the loaded 2-core CI machine, a batch-1 one takes
# ~2 min. The parity tests export ParameterNet with a fixed batch of 1 (the API default stays
# dynamic).
ONNX_STATIC_BATCH = ("parameternet_300m", "parameternet_600m")

# The per-family ONNX module leaves these two out of its cases (their conversions are the slow
# ones of their family); ``test_export_zoo`` exports them with the rest of the zoo.
ONNX_LEFT_OUT = ("parc_convnext_xt", "parc_resnet50")

# The tiny resolution each family's zoo models are exported at: what CASES uses for the family
# (ParC families non-square, MobileViG at 64 so its stride-32 grid stays 2x2).
ZOO_RESOLUTION: dict[str, tuple[int, int]] = {
    "repvit": (32, 32),
    "mobilevig": (64, 64),
    "parameternet": (32, 32),
    "parcnet": (64, 96),
    "parc_convnets": (64, 96),
    "regnet": (32, 32),
}


def own_models() -> list[str]:
  """Every registered model built by this package (the ones the exporters must handle)."""
  return [n for n in mv.list_models()
          if registry.model_info(n).factory.__module__.startswith("mobilevis_jax.")]


def zoo_cases() -> dict[str, tuple[tuple[int, int], dict]]:
  """Every registered model not in :data:`CASES`, at its family's tiny resolution."""
  cases = {}
  for name in own_models():
    if name not in CASES:
      family = registry.model_info(name).family
      assert family in ZOO_RESOLUTION, f"{name}: no export resolution for family {family!r}"
      cases[name] = (ZOO_RESOLUTION[family], {})
  return cases


def family_cases() -> list[str]:
  """The model names of :data:`CASES`, checked to cover every registered family."""
  families = {registry.model_info(n).family for n in own_models()}
  covered = {registry.model_info(n).family for n in CASES}
  assert covered == families, f"families without an export test: {sorted(families - covered)}"
  return sorted(CASES)


def _abstract_and_expert_fan_ins(name: str, resolution: tuple[int, int], **kwargs
                                 ) -> tuple[dict, dict[tuple, int]]:
  """The abstract variables of ``name`` and the fan-in of each ``DynamicConv``'s expert kernels,
  by its parameter path, from one trace by shape.

  An expert bank is stored flat, ``[M, Cout * Cin/g * kh * kw]``, so its fan-in cannot be read
  off the leaf's shape; it is recorded while the model is traced.
  """
  from mobilevis_jax.layers.conv import _pair
  from mobilevis_jax.layers.dynamic_conv import DynamicConv
  fan_ins = {}

  def record(next_fun, args, call_kwargs, context):
    module = context.module
    if isinstance(module, DynamicConv) and context.method_name == "__call__":
      kh, kw = _pair(module.kernel_size)
      fan_ins[tuple(module.path)] = args[0].shape[-1] // module.groups * kh * kw
    return next_fun(*args, **call_kwargs)

  with nn.intercept_methods(record):
    abstract = abstract_variables(name, resolution, **kwargs)
  return abstract, fan_ins


def random_variables(name: str, resolution: tuple[int, int], seed: int = 0, **kwargs) -> dict:
  """Random variables of ``name(**kwargs)`` by shape (numpy arrays)."""
  rng = np.random.RandomState(seed)
  abstract, expert_fan_ins = _abstract_and_expert_fan_ins(name, resolution, **kwargs)

  def fill(path, leaf):
    key, shape = jax.tree_util.keystr(path), leaf.shape
    if key.startswith("['batch_stats']"):
      if key.endswith("['var']"):
        return (0.5 + rng.rand(*shape)).astype(np.float32)
      return (0.1 * rng.randn(*shape)).astype(np.float32)
    if key.endswith("['experts']"):
      # Each expert scaled by its conv's fan-in, so the per-sample mixture of experts keeps the
      # activations' scale (scaled by the bank's leading M instead, ParameterNet-600M's logits
      # reached 4e35 and LiteRT's float32 overflowed to NaN).
      module_path = tuple(k.key for k in path[1:-1])
      return (rng.randn(*shape) / np.sqrt(expert_fan_ins[module_path])).astype(np.float32)
    if len(shape) > 1:
      return (rng.randn(*shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))).astype(np.float32)
    if key.endswith("['scale']"):
      return (1.0 + 0.2 * rng.randn(*shape)).astype(np.float32)
    return (0.1 * rng.randn(*shape)).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(fill, {k: abstract[k] for k in abstract})
  return _calibrated(name, variables, resolution, seed, **kwargs)


def _calibrated(name: str, variables: dict, resolution: tuple[int, int], seed: int,
                **kwargs) -> dict:
  """``variables`` with every BatchNorm's running statistics taken from a random batch.

  Random running statistics let the activations grow block after block in a deep residual
  network (RepViT-M1's random logits reached 1.6e6, and the float32 rounding of a fused graph
  then exceeded 1e-4 of them); statistics of the layer's real input keep them O(1), as in a
  trained network. Each BatchNorm gets its input's batch mean and, as variance, its second
  moment about zero (variance + mean^2): BatchNorm1d heads see pooled features of noise images
  whose batch variance alone is tiny, and dividing by it would amplify rounding ~1e3x.

  One train-mode pass returns ``m * old + (1 - m) * batch`` per statistic; two passes, from
  ``old = 0`` and ``old = 1``, give both the momentum ``m`` and the batch value, whatever the
  layer's momentum, with one compile.
  """
  stats = variables.get("batch_stats")
  if not stats:
    return variables
  model = registry.create_model(name, **kwargs)
  x = np.random.RandomState(seed + 1).rand(8, *resolution, 3).astype(np.float32)

  @jax.jit
  def updated(old):
    _, new = model.apply({**variables, "batch_stats": old}, x, train=True,
                         mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(seed)})
    return new["batch_stats"]

  from_0 = jax.device_get(updated(jax.tree.map(np.zeros_like, stats)))
  from_1 = jax.device_get(updated(jax.tree.map(np.ones_like, stats)))
  batch = jax.tree.map(lambda a, b: a / (1.0 + a - b), from_0, from_1)

  def module_stats(leaves: dict) -> dict:
    if "mean" in leaves and "var" in leaves and not isinstance(leaves["mean"], dict):
      mean, var = leaves["mean"], leaves["var"]
      return {**leaves, "var": (var + np.square(mean)).astype(np.float32),
              "mean": mean.astype(np.float32)}
    return {k: module_stats(v) if isinstance(v, dict) else v for k, v in leaves.items()}

  return {**variables, "batch_stats": module_stats(dict(batch))}


def jax_logits(name: str, variables: dict, x: np.ndarray, **kwargs) -> np.ndarray:
  """The eval logits of the unfused JAX model: what every export must reproduce."""
  model = registry.create_model(name, **kwargs)
  logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
  # A parity check against exploded logits would compare float32 overflow, not the graphs.
  peak = float(np.abs(logits).max())
  assert np.isfinite(logits).all() and 1e-3 < peak < 1e6, f"{name}: random logits peak {peak:.3g}"
  return logits


def onnx_logits(source, x: np.ndarray, dynamic: bool = True) -> np.ndarray:
  """ONNX Runtime's logits for ``x`` (in the graph's input layout) of ``source``, a file path or
  an open ``InferenceSession``; a fixed-batch (``dynamic=False``) graph is fed one image at a
  time."""
  if hasattr(source, "run"):
    sess = source
  else:
    import onnxruntime as ort
    sess = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
  if not dynamic:
    return np.concatenate([sess.run(None, {"images": x[i:i + 1]})[0] for i in range(len(x))])
  return sess.run(None, {"images": x})[0]


def litert_logits(path, x: np.ndarray) -> np.ndarray:
  """The LiteRT interpreter's logits of the ``.tflite`` file at ``path``, one NHWC image at a
  time (the files have a batch of 1)."""
  from mobilevis_jax.interop import tflite_export
  with open(path, "rb") as f:
    it = tflite_export.interpreter(f.read())
  return np.concatenate([tflite_export.run(it, x[i:i + 1]) for i in range(len(x))])


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
  """max |got - want| / max |want|."""
  return float(np.abs(got - want).max() / np.abs(want).max())
