"""Model registry: names -> factory functions, plus the per-family hooks (fuse, profile).

Factories live in the family files and register themselves with :func:`register_model`; importing
``mobilevis_jax.models`` imports every family, so the registry is complete after
``import mobilevis_jax``. A model's family is the stem of the module that registers it
(``mobilevis_jax.models.repvit`` -> ``'repvit'``), the same stem its interop file
(``interop/repvit.py``), its tests (``tests/models/test_repvit.py``), its PyTorch reference
(``tests/torch_refs/repvit.py``) and its benchmark (``bench_repvit.py``) carry.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

INPUT_CONVENTIONS = ("imagenet", "parc_bgr")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What the rest of the codebase needs to know about a registered model."""
  name: str
  family: str
  default_resolution: int
  layouts: tuple[str, ...]
  input_convention: str
  factory: Callable[..., nn.Module]


_MODELS: dict[str, ModelInfo] = {}
_FUSERS: dict[type, Callable] = {}
_PROFILE_HOOKS: dict[str, Callable] = {}


def family_of(module_name: str) -> str:
  """The family a module belongs to: its stem (``'mobilevis_jax.interop.repvit'`` -> ``'repvit'``)."""
  return module_name.rsplit(".", 1)[-1]


def register_model(default_resolution: int = 224, layouts=("official",),
                   input_convention: str = "imagenet", name: str | None = None):
  """Decorator registering ``factory(num_classes=1000, **kw) -> nn.Module``.

  The model is registered under ``name``, or the factory's ``__name__`` when not given (so that
  variant tables can register generated factories explicitly), in the family named by the
  factory's module.
  """
  if input_convention not in INPUT_CONVENTIONS:
    raise ValueError(f"input_convention must be one of {INPUT_CONVENTIONS}")

  def wrap(factory):
    model_name = name or factory.__name__
    family = family_of(factory.__module__)
    if model_name in _MODELS:
      raise ValueError(f"model {model_name!r} is registered twice")
    _MODELS[model_name] = ModelInfo(model_name, family, default_resolution, tuple(layouts),
                                    input_convention, factory)
    return factory

  return wrap


def _unknown(name: str) -> KeyError:
  close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.5)
  hint = f" Did you mean: {', '.join(close)}?" if close else ""
  return KeyError(f"unknown model {name!r}.{hint} (list_models() shows all {len(_MODELS)})")


def model_info(name: str) -> ModelInfo:
  try:
    return _MODELS[name]
  except KeyError:
    raise _unknown(name) from None


def create_model(name: str, **kwargs: Any) -> nn.Module:
  """Build a registered model, e.g. ``create_model('repvit_m1_1', num_classes=10)``."""
  return model_info(name).factory(**kwargs)


def list_models(pattern: str = "*") -> list[str]:
  """Registered names matching a shell-style pattern, sorted (``list_models('repvit*')``)."""
  return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))


def register_fuse(model_class: type):
  """Decorator registering ``fn(model, variables) -> (fused_model, fused_variables)``."""

  def wrap(fn):
    _FUSERS[model_class] = fn
    return fn

  return wrap


def register_profile_hook(fn: Callable) -> Callable:
  """Decorator for ``fn(model_name, counts, params, *, resolution) -> dict`` of the family of ``fn``'s
  module; :func:`mobilevis_jax.profile` merges the returned dict into its result (official-profiler
  conventions next to the true counts)."""
  _PROFILE_HOOKS[family_of(fn.__module__)] = fn
  return fn


def profile_hook(family: str | None) -> Callable | None:
  return _PROFILE_HOOKS.get(family) if family else None


def can_fuse(name_or_model) -> bool:
  model = create_model(name_or_model) if isinstance(name_or_model, str) else name_or_model
  return type(model) in _FUSERS


def fuse(name_or_model, variables, **model_kwargs):
  """Structural re-parameterisation: ``fused_model, fused_variables = fuse(name, variables)``.

  ``name_or_model`` is a registered name (built with ``model_kwargs``, which must match how the
  variables were created) or the module instance itself.
  """
  if isinstance(name_or_model, str):
    model = create_model(name_or_model, **model_kwargs)
  else:
    if model_kwargs:
      raise ValueError("model_kwargs are only used when a model name is given")
    model = name_or_model
  fuser = _FUSERS.get(type(model))
  if fuser is None:
    raise ValueError(f"{type(model).__name__} has no structural re-parameterisation "
                     f"(families with one: {sorted(c.__name__ for c in _FUSERS)})")
  return fuser(model, variables)


def abstract_variables(model: nn.Module, resolution: int, batch: int = 1):
  """Shapes of ``model.init`` at ``resolution`` without allocating or computing anything."""
  x = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32)
  return jax.eval_shape(lambda rng, x: model.init(rng, x, train=False), jax.random.PRNGKey(0), x)


# XLA options for a program that runs once. ``model.init`` is almost nothing but random-number
# generation (one threefry expansion per initialiser: hundreds of them), and its compile time is
# dominated by LLVM optimising that code; optimisation level 0 compiles it 2.3x faster
# (ghostnet_100 on CPU, ``experiments/bench/bench_first_step.py``) for a program that runs for
# well under a second either way. Only applied on CPU, where it was measured.
ONE_SHOT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                             "xla_llvm_disable_expensive_passes": True}


def init_variables(model: nn.Module, rng: jax.Array, resolution: int, batch: int = 1) -> dict:
  """``model.init`` on a zero batch (``train=False``; ``'params'`` and ``'dropout'`` rngs), compiled
  as a one-shot program, with an empty ``batch_stats`` collection when the model has none.

  Draws every parameter with the model's own initialisers and is deterministic in ``rng``; the
  values equal ``jax.jit(model.init)``'s up to float32 rounding of the initialisers' arithmetic
  (~1e-8: the unoptimised code contracts fewer multiply-adds).
  """
  def init(rng):
    x = jnp.zeros((batch, resolution, resolution, 3), jnp.float32)
    variables = dict(model.init({"params": rng, "dropout": rng}, x, train=False))
    variables.setdefault("batch_stats", {})
    return variables

  if isinstance(rng, jax.core.Tracer):  # called inside a transformation: trace it into that
    return init(rng)
  lowered = jax.jit(init).lower(rng)
  options = ONE_SHOT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
  return lowered.compile(compiler_options=options)(rng)
