"""Model registry: names -> factory functions, plus the per-family hooks (fuse, profile).

Factories live in the family files and register themselves with :func:`register_model`; importing
``mobilevis_jax.models`` imports every family, so the registry is complete after
``import mobilevis_jax``. A model's family is the stem of the module that registers it
(``mobilevis_jax.models.repvit`` -> ``'repvit'``), the same stem its interop file
(``interop/repvit.py``), its tests (``tests/models/test_repvit.py``), its PyTorch reference
(``mobilevis_jax/torch_models/repvit.py``) and its benchmark (``bench_repvit.py``) carry.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobilevis_jax.models import host_prng

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

  @property
  def pretrained_cfg(self) -> PretrainedCfg | None:
    """Preprocessing and reference numbers of the model's weights (``models/pretrained_cfgs.py``;
    None for a model registered outside the package)."""
    return _PRETRAINED_CFGS.get(self.name)


@dataclasses.dataclass(frozen=True)
class PretrainedCfg:
  """What evaluating a model's released weights needs, as timm's ``pretrained_cfg`` has it.

  Attributes:
    input_size: (3, H, W) of the evaluation crop.
    mean, std: per-channel normalisation, in the channel order the model sees
    (``input_convention``).
    crop_pct: eval resize to ``floor(H / crop_pct)`` on the shorter side, then centre crop H.
    interpolation: eval resize kernel, ``'bicubic'`` or ``'bilinear'``.
    input_convention: ``'imagenet'`` (RGB, /255, then mean/std) or ``'parc_bgr'`` (ParC-Net's cv2
      convention: BGR, /255, mean 0 std 1).
    num_classes: classes of the released weights (21841 for ImageNet-22K pre-training).
    distillation: whether the released checkpoints carry a second (distillation) head.
    top1: paper ImageNet-1K top-1 (%), None where none was published.
    latency_ms: paper latency and the device it was measured on, None where none was published.
    timm_differences: ``(field, value)`` pairs where timm's cfg differs from the official one.
    source: where each value comes from (official eval code vs timm, where they differ).
  """
  input_size: tuple[int, int, int] = (3, 224, 224)
  mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
  std: tuple[float, float, float] = (0.229, 0.224, 0.225)
  crop_pct: float = 0.875
  interpolation: str = "bicubic"
  input_convention: str = "imagenet"
  num_classes: int = 1000
  distillation: bool = False
  top1: float | None = None
  latency_ms: tuple[float, str] | None = None
  timm_differences: tuple[tuple[str, Any], ...] = ()
  source: str = ""

  def timm(self) -> PretrainedCfg:
    """The same cfg with timm's values where timm differs (e.g. RepViT's crop_pct 0.95)."""
    return dataclasses.replace(self, **dict(self.timm_differences), timm_differences=())

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


_MODELS: dict[str, ModelInfo] = {}
# Filled by models/pretrained_cfgs.py (imported by models/__init__ after the families), so the
# registry never imports the table that builds on it.
_PRETRAINED_CFGS: dict[str, PretrainedCfg] = {}
_FUSERS: dict[type, Callable] = {}
_PROFILE_HOOKS: dict[str, Callable] = {}


def family_of(module_name: str) -> str:
  """The family a module belongs to: its stem (``'mobilevis_jax.interop.repvit'`` ->
  ``'repvit'``)."""
  return module_name.rsplit(".", 1)[-1]


def register_model(default_resolution: int = 224, layouts: Sequence[str] = ("official",),
                   input_convention: str = "imagenet",
                   name: str | None = None) -> Callable[[Callable], Callable]:
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


def create_model(name: str, pretrained: str | None = None, *,
                 out_indices: Sequence[int] | None = None, **kwargs: Any) -> nn.Module:
  # `mobilevis_jax.create_model` is `mobilevis_jax.pretrained.create_model`, which loads weights
  # and then builds through this function; the registry itself never reads checkpoints (that
  # would make models import interop and the top level).
  """Build a registered model, e.g. ``create_model('repvit_m1_1', num_classes=10)``.

  Args:
    name: a registered name (``list_models()``).
    pretrained: path of a ``.safetensors``/``.pth`` file (official or timm layout, detected from its
      keys) or of an orbax checkpoint of this project. The model is then returned *bound* to the
      loaded weights (``flax.linen.Module.bind``): ``model(x)`` runs it, ``model.variables`` holds
      the weights and ``model.unbind()`` gives ``(module, variables)`` back for training. With a
      ``num_classes`` other than the checkpoint's, the classifier is re-initialised (see
      :func:`mobilevis_jax.pretrained.load_pretrained`).
    out_indices: with ``features_only=True``, which of the feature maps to return (timm's
      ``out_indices``; negative indices count from the end). :func:`feature_info` describes them.
    **kwargs: the factory's arguments (``num_classes``, ``distillation``, ``features_only``, ...).
  """
  if pretrained is not None:
    raise TypeError("models.registry.create_model builds untrained models; load weights with "
                    "mobilevis_jax.create_model(name, pretrained=PATH)")
  model = model_info(name).factory(**kwargs)
  if out_indices is not None:
    if not kwargs.get("features_only"):
      raise ValueError("out_indices selects feature maps: pass features_only=True as well")
    model = FeatureSelect(model, _normalise_indices(out_indices, len(feature_info(name, **kwargs))))
  return model


class FeatureSelect(nn.Module):
  """A ``features_only`` backbone returning only the maps at ``out_indices``.

  The backbone runs in this module's own scope, so the variables are exactly the backbone's (a
  checkpoint of the backbone loads unchanged).
  """
  backbone: nn.Module
  out_indices: tuple[int, ...]

  def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
    features = self.backbone.clone(parent=self.scope)(x, train)
    return [features[i] for i in self.out_indices]


def _normalise_indices(out_indices: Sequence[int], n: int) -> tuple[int, ...]:
  out = []
  for i in out_indices:
    if not -n <= int(i) < n:
      raise ValueError(f"out_indices {tuple(out_indices)}: the model has {n} feature maps")
    out.append(int(i) % n)
  return tuple(out)


def feature_info(name: str, out_indices: Sequence[int] | None = None,
                 resolution: int | None = None, **kwargs: Any) -> list[dict]:
  """timm's ``feature_info``: one dict per map that ``features_only=True`` returns.

  ``num_chs`` (channels), ``reduction`` (input size / map size) and ``module`` (the Flax path of
  the module that produces the map, ``/``-separated below the top level). Computed from abstract
  shapes (``jax.eval_shape``): nothing is allocated or run.
  """
  kwargs = {k: v for k, v in kwargs.items() if k != "features_only"}
  model = model_info(name).factory(features_only=True, **kwargs)
  resolution = resolution or model_info(name).default_resolution
  calls: list[tuple[tuple[str, ...], Any]] = []

  def record(next_fun, args, kw, context):
    out = next_fun(*args, **kw)
    if context.method_name == "__call__" and context.module is not model:
      calls.append((tuple(context.module.path), out))
    return out

  def features(x):
    with nn.intercept_methods(record):
      feats, _ = model.init_with_output(jax.random.PRNGKey(0), x, train=False)
    # The producer of a map is the outermost module that returned that very array (a stage and
    # its last block return the same one).
    for f in feats:
      paths = [p for p, out in calls if out is f]
      names.append("/".join(min(paths, key=len)) if paths else "")
    return feats

  names: list[str] = []
  x = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  shapes = jax.eval_shape(features, x)
  rows = [{"num_chs": int(s.shape[-1]), "reduction": resolution // int(s.shape[1]), "module": m}
          for s, m in zip(shapes, names)]
  if out_indices is not None:
    rows = [rows[i] for i in _normalise_indices(out_indices, len(rows))]
  return rows


def list_models(pattern: str = "*") -> list[str]:
  """Registered names matching a shell-style pattern, sorted (``list_models('repvit*')``)."""
  return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))


def register_fuse(model_class: type) -> Callable[[Callable], Callable]:
  """Decorator registering ``fn(model, variables) -> (fused_model, fused_variables)``."""

  def wrap(fn):
    _FUSERS[model_class] = fn
    return fn

  return wrap


def register_profile_hook(fn: Callable) -> Callable:
  """Decorator for ``fn(model_name, counts, params, *, resolution) -> dict`` of the family of
  ``fn``'s module; :func:`mobilevis_jax.profile` merges the returned dict into its result
  (official-profiler conventions next to the true counts)."""
  _PROFILE_HOOKS[family_of(fn.__module__)] = fn
  return fn


def profile_hook(family: str | None) -> Callable | None:
  return _PROFILE_HOOKS.get(family) if family else None


def can_fuse(name_or_model: str | nn.Module) -> bool:
  model = create_model(name_or_model) if isinstance(name_or_model, str) else name_or_model
  return type(model) in _FUSERS


def fuse(name_or_model: str | nn.Module, variables: dict,
         **model_kwargs: Any) -> tuple[nn.Module, dict]:
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


def abstract_variables(model: nn.Module, resolution: int, batch: int = 1) -> dict:
  """Shapes of ``model.init`` at ``resolution`` without allocating or computing anything."""
  x = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32)
  return jax.eval_shape(lambda rng, x: model.init(rng, x, train=False), jax.random.PRNGKey(0), x)


# XLA options for a program that runs once. ``model.init`` is almost nothing but random-number
# generation and the initialisers' arithmetic, and its compile time was dominated by LLVM
# optimising that code; optimisation level 0 compiled it 2.3x faster (ghostnet_100 on CPU,
# ``experiments/bench/bench_first_step.py``) for a program that runs for well under a second
# either way. (Since then the random bits come from the host on CPU, see ``lower_init``.) Only
# applied on CPU, where it was measured.
ONE_SHOT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                             "xla_llvm_disable_expensive_passes": True}


def _init(model: nn.Module, rng: jax.Array, resolution: int, batch: int,
          host_rng: bool = False) -> dict:
  x = jnp.zeros((batch, resolution, resolution, 3), jnp.float32)
  key = host_prng.wrap(rng) if host_rng else rng
  variables = dict(model.init({"params": key, "dropout": key}, x, train=False))
  variables.setdefault("batch_stats", {})
  return variables


def lower_init(model: nn.Module, rng: jax.Array, resolution: int,
               batch: int = 1) -> jax.stages.Lowered:
  """The program of `init_variables`, lowered (its `out_info` is the variables' shapes), for
  callers that compile it themselves, e.g. concurrently with the train step (the trainer)."""
  # On CPU the random bits come from the host (`host_prng`): the same bits, and a program that
  # compiles in a fraction of the time (only the initialisers' arithmetic is left to XLA).
  host_rng = jax.default_backend() == "cpu" and host_prng.supported()
  return jax.jit(functools.partial(_init, model, resolution=resolution, batch=batch,
                                   host_rng=host_rng)).lower(rng)


def compile_init(lowered: jax.stages.Lowered) -> jax.stages.Compiled:
  """`lower_init`'s program compiled as a one-shot program (`ONE_SHOT_COMPILER_OPTIONS` on CPU)."""
  options = ONE_SHOT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
  return lowered.compile(compiler_options=options)


def init_variables(model: nn.Module, rng: jax.Array, resolution: int, batch: int = 1) -> dict:
  """``model.init`` on a zero batch (``train=False``; ``'params'`` and ``'dropout'`` rngs), compiled
  as a one-shot program, with an empty ``batch_stats`` collection when the model has none.

  Draws every parameter with the model's own initialisers and is deterministic in ``rng``; the
  values equal ``jax.jit(model.init)``'s up to float32 rounding of the initialisers' arithmetic
  (~1e-8: the unoptimised code contracts fewer multiply-adds). On CPU the random bits are drawn
  on the host (`models.host_prng`, bit for bit JAX's Threefry), which leaves XLA only the
  initialisers' arithmetic to compile.
  """
  if isinstance(rng, jax.core.Tracer):  # called inside a transformation: trace it into that
    return _init(model, rng, resolution, batch)
  return compile_init(lower_init(model, rng, resolution, batch))(rng)
