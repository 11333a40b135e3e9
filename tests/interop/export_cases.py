"""What the ONNX and LiteRT export tests share: the models, their resolutions, random variables.

Variables are drawn by shape (``jax.eval_shape`` of ``init``, then numpy random numbers), not by
a jitted ``init``, which would cost a compile per model. Weights are fan-in scaled, BatchNorm
scales, biases and running statistics random and away from the identity, so every exported
tensor matters to the logits.
"""
from __future__ import annotations

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


def family_cases() -> list[str]:
  """The model names of :data:`CASES`, checked to cover every registered family."""
  own = [n for n in mv.list_models()
         if registry.model_info(n).factory.__module__.startswith("mobilevis_jax.")]
  families = {registry.model_info(n).family for n in own}
  covered = {registry.model_info(n).family for n in CASES}
  assert covered == families, f"families without an export test: {sorted(families - covered)}"
  return sorted(CASES)


def random_variables(name: str, resolution: tuple[int, int], seed: int = 0, **kwargs) -> dict:
  """Random variables of ``name(**kwargs)`` by shape (numpy arrays)."""
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    key, shape = jax.tree_util.keystr(path), leaf.shape
    if key.startswith("['batch_stats']"):
      if key.endswith("['var']"):
        return (0.5 + rng.rand(*shape)).astype(np.float32)
      return (0.1 * rng.randn(*shape)).astype(np.float32)
    if len(shape) > 1:
      return (rng.randn(*shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))).astype(np.float32)
    if key.endswith("['scale']"):
      return (1.0 + 0.2 * rng.randn(*shape)).astype(np.float32)
    return (0.1 * rng.randn(*shape)).astype(np.float32)

  abstract = abstract_variables(name, resolution, **kwargs)
  return jax.tree_util.tree_map_with_path(fill, {k: abstract[k] for k in abstract})


def jax_logits(name: str, variables: dict, x: np.ndarray, **kwargs) -> np.ndarray:
  """The eval logits of the unfused JAX model: what every export must reproduce."""
  model = registry.create_model(name, **kwargs)
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
  """max |got - want| / max |want|."""
  return float(np.abs(got - want).max() / np.abs(want).max())
