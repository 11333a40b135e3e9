"""A fresh model starts where the official one does: per-tensor init statistics against PyTorch.

For one variant of every family (plus ``ghostnet_100`` against timm and ``parameternet_600m``) a
freshly initialised JAX model is exported through the interop key mapping
(:func:`mobilevis_jax.interop.to_torch_state_dict`) and compared, key by key, with freshly built
PyTorch references (``mobilevis_jax/torch_models``; timm for GhostNet) initialised as the official code does
(../shared/reference/training.md, "Initialisation"). Per tensor, pooled over a few seeds on both
sides:

* the same kind: all zero, one constant (compared exactly), or random;
* random tensors: std within 10% (a looser ``5 / sqrt(N)`` bound for the few small tensors where
  sampling noise alone is larger), mean equal within 5 standard errors, the same shape of the
  distribution (excess kurtosis: uniform -1.2, normal 0, +-2 sigma truncated normal -0.64) for
  large tensors, and, where PyTorch's draw is uniform, every value inside its bound.

Some official trees in ``mobilevis_jax/torch_models`` are architecture-only (their parity tests overwrite
the weights); their official init passes are written out below from the official files.

Speed: ``jax.jit(model.init)`` compiles the whole forward pass, which takes minutes for
ParameterNet on CPU. Every initialiser a model draws from is recorded during an abstract
``jax.eval_shape(model.init)`` instead (``nn.Module.param`` / ``variable`` see the resolved
init function, shape and dtype), and only those draws are compiled into one function, run for
each seed with the ``rbg`` generator (a single XLA op per draw instead of unrolled threefry). The
distributions are the ones ``model.init`` samples; only the bit generator differs.
"""
from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import mobilevis_jax
from mobilevis_jax.interop import to_torch_state_dict

SEEDS = (0, 1, 2)
RESOLUTION = 32  # parameter shapes do not depend on the input size; 32 is the smallest all accept


# ----------------------------------------------------------------------------------------------
# JAX side: record the initialisers, draw them without compiling the forward pass
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _recording_initialisers():
  """Collect ``(collection, path, init_fn, args, kwargs, takes_key)`` of every variable created."""
  records = []
  orig_param, orig_variable = nn.Module.param, nn.Module.variable

  def param(self, name, init_fn, *args, **kwargs):
    if self.is_initializing():
      records.append(("params", tuple(self.scope.path) + (name,), init_fn, args, kwargs, True))
    return orig_param(self, name, init_fn, *args, **kwargs)

  def variable(self, col, name, init_fn=None, *args, **kwargs):
    if self.is_initializing() and col != "params" and init_fn is not None:
      records.append((col, tuple(self.scope.path) + (name,), init_fn, args, kwargs, False))
    return orig_variable(self, col, name, init_fn, *args, **kwargs)

  nn.Module.param, nn.Module.variable = param, variable
  try:
    yield records
  finally:
    nn.Module.param, nn.Module.variable = orig_param, orig_variable


def jax_state_dicts(name: str, layout: str, model_kwargs: dict) -> list[dict[str, np.ndarray]]:
  """Fresh JAX variables of ``name`` for every seed, as PyTorch state_dicts of ``layout``."""
  model = mobilevis_jax.create_model(name, **model_kwargs)
  x = jnp.zeros((1, RESOLUTION, RESOLUTION, 3), jnp.float32)
  with _recording_initialisers() as records:
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  want = traverse_util.flatten_dict(nn.unbox(dict(abstract)))
  records = [r for r in records if (r[0],) + r[1] in want]
  assert {(r[0],) + r[1] for r in records} == set(want), "some variables were not recorded"

  @jax.jit
  def draw(key):
    keys = jax.random.split(key, len(records))
    return {(col,) + path: (fn(k, *args, **kw) if takes_key else fn(*args, **kw))
            for k, (col, path, fn, args, kw, takes_key) in zip(keys, records)}

  out = []
  for seed in SEEDS:
    flat = draw(jax.random.key(seed, impl="rbg"))
    for k, v in flat.items():
      assert v.shape == want[k].shape, (k, v.shape, want[k].shape)
    variables = traverse_util.unflatten_dict({k: np.asarray(v) for k, v in flat.items()})
    out.append(to_torch_state_dict(name, variables, layout, **model_kwargs))
  return out


# ----------------------------------------------------------------------------------------------
# PyTorch side: the official init passes the architecture-only references leave out
# ----------------------------------------------------------------------------------------------
def _mobilevig_init(model):
  """SLDGroup/MobileViG ``MobileViG.model_init``: every Conv2d kaiming_normal_ (fan_in), bias 0."""
  from torch import nn as tnn
  for m in model.modules():
    if isinstance(m, tnn.Conv2d):
      tnn.init.kaiming_normal_(m.weight)
      if m.bias is not None:
        tnn.init.zeros_(m.bias)
  return model


def _cvnets_init(model):
  """ParC-Net's cvnets ``initialize_weights`` with its recipe's options (conv_init kaiming_normal,
  linear_init trunc_normal std 0.02): conv kaiming_normal_(fan_out) and bias 0, norms 1 / 0,
  Linear trunc_normal_(std=0.02) and bias 0. The meta kernels (weights of throw-away depthwise
  convs) and the randn position embeddings are bare parameters the pass never visits."""
  from torch import nn as tnn
  for m in model.modules():
    if isinstance(m, tnn.Conv2d):
      tnn.init.kaiming_normal_(m.weight, mode="fan_out")
      if m.bias is not None:
        tnn.init.zeros_(m.bias)
    elif isinstance(m, tnn.BatchNorm2d):
      tnn.init.ones_(m.weight)
      tnn.init.zeros_(m.bias)
    elif isinstance(m, tnn.Linear):
      tnn.init.trunc_normal_(m.weight, mean=0.0, std=0.02)
      tnn.init.zeros_(m.bias)
  return model


def _parc_resnet50_init(model):
  """Official ``ParC_resnet50.ResNet``: Conv2d kaiming_normal_(fan_out, relu) -- the ParC convs
  included, whose biases keep PyTorch's default --, BN 1 / 0, fc untouched (PyTorch default)."""
  from torch import nn as tnn
  for m in model.modules():
    if isinstance(m, tnn.Conv2d):
      tnn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, tnn.BatchNorm2d):
      tnn.init.constant_(m.weight, 1)
      tnn.init.constant_(m.bias, 0)
  return model


def _parc_mobilenetv2_init(model):
  """Official ``ParC_MobileNetV2``: Conv2d kaiming_normal_(fan_out) and bias 0, BN 1 / 0, Linear
  N(0, 0.01) and bias 0."""
  from torch import nn as tnn
  for m in model.modules():
    if isinstance(m, tnn.Conv2d):
      tnn.init.kaiming_normal_(m.weight, mode="fan_out")
      if m.bias is not None:
        tnn.init.zeros_(m.bias)
    elif isinstance(m, tnn.BatchNorm2d):
      tnn.init.ones_(m.weight)
      tnn.init.zeros_(m.bias)
    elif isinstance(m, tnn.Linear):
      tnn.init.normal_(m.weight, 0, 0.01)
      tnn.init.zeros_(m.bias)
  return model


def _torch_builders():
  import timm

  from mobilevis_jax.torch_models import mobilevig, parameternet, parc_convnets, parcnet, repvit
  return {
      # name: (layout, builder of a freshly initialised official model, JAX model kwargs)
      "repvit_m0_6": ("official", lambda: repvit.RepViT("repvit_m0_6", distillation=True),
                      dict(distillation=True)),
      "mobilevig_ti": ("official", lambda: _mobilevig_init(mobilevig.build("mobilevig_ti")), {}),
      "parameternet_600m": ("official", parameternet.parameternet_600m, {}),
      "ghostnet_100": ("timm", lambda: timm.create_model("ghostnet_100", pretrained=False), {}),
      "parcnet_xs": ("official", lambda: _cvnets_init(parcnet.ParCNetRef("xs")), {}),
      # The reference carries the official ConvNeXt init (trunc_normal(.02) everywhere, bias 0).
      "parc_convnext_xt": ("official", parc_convnets.parc_convnext_xt, {}),
      "parc_resnet50": ("official", lambda: _parc_resnet50_init(parc_convnets.parc_resnet50()), {}),
      "parc_mobilenetv2": ("official",
                           lambda: _parc_mobilenetv2_init(parc_convnets.parc_mobilenetv2()), {}),
  }


def torch_state_dicts(builder) -> list[dict[str, np.ndarray]]:
  import torch
  out = []
  for seed in SEEDS:
    torch.manual_seed(seed)
    with torch.no_grad():
      model = builder()
    out.append({k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()})
  return out


# ----------------------------------------------------------------------------------------------
# The per-tensor comparison
# ----------------------------------------------------------------------------------------------
def _kind(samples: list[np.ndarray]) -> tuple[str, float | None]:
  first = samples[0].reshape(-1)[0] if samples[0].size else 0.0
  if all(np.all(s == 0) for s in samples):
    return "zero", 0.0
  if all(np.all(s == first) for s in samples):
    return "const", float(first)
  return "random", None


def _moments(samples: list[np.ndarray]) -> dict:
  x = np.concatenate([s.reshape(-1) for s in samples]).astype(np.float64)
  mean, std = x.mean(), x.std()
  # Kurtosis of the values winsorised at 6 sigma: the shape of the bulk. Inverse-CDF truncated
  # normals (torch's trunc_normal_ as JAX's) put ~1e-7 of their draws on the +-2 bound, when the
  # uniform draw hits -1 exactly; one such value at 100 sigma would dominate the raw kurtosis.
  kurt = float(np.mean(np.clip((x - mean) / std, -6, 6) ** 4) - 3.0) if std > 0 else 0.0
  return dict(n=x.size, mean=float(mean), std=float(std), maxabs=float(np.abs(x).max()), kurt=kurt)


def compare_tensor(ours: list[np.ndarray], ref: list[np.ndarray]) -> tuple[list[str], dict]:
  """Problems (empty when ours is drawn like ref) and the statistics of both, per tensor."""
  kind_o, const_o = _kind(ours)
  kind_r, const_r = _kind(ref)
  row = dict(kind=f"{kind_o}/{kind_r}")
  if ours[0].shape != ref[0].shape:
    return [f"shape {ours[0].shape} vs {ref[0].shape}"], row
  if kind_o != kind_r:
    row.update({f"{k}_o": v for k, v in _moments(ours).items()})
    row.update({f"{k}_r": v for k, v in _moments(ref).items()})
    return [f"kind {kind_o} vs {kind_r}"], row
  if kind_r != "random":
    row.update(const_o=const_o, const_r=const_r)
    return ([] if np.float32(const_o) == np.float32(const_r) else
            [f"constant {const_o!r} vs {const_r!r}"]), row
  mo, mr = _moments(ours), _moments(ref)
  row.update({f"{k}_o": v for k, v in mo.items()})
  row.update({f"{k}_r": v for k, v in mr.items()})
  n = min(mo["n"], mr["n"])
  problems = []
  # Tensors of >= 1024 elements pooled over 3 seeds give a 10% bound; below that sampling noise
  # alone (relative std error ~ 1/sqrt(2N) per side) needs the 5-sigma bound.
  std_tol = max(0.10, 5.0 / math.sqrt(n))
  if abs(mo["std"] / mr["std"] - 1.0) > std_tol:
    problems.append(f"std {mo['std']:.4g} vs {mr['std']:.4g} (tol {std_tol:.0%})")
  if abs(mo["mean"] - mr["mean"]) > 5.0 * mr["std"] * math.sqrt(2.0 / n):
    problems.append(f"mean {mo['mean']:.3g} vs {mr['mean']:.3g}")
  # Floor 0.1: float32 inverse-CDF draws have slightly short tails (-0.03 at 2M values), while
  # the shapes to tell apart differ by >= 0.6 (normal 0, 2-sigma truncated -0.64, uniform -1.2).
  if n >= 4096 and abs(mo["kurt"] - mr["kurt"]) > max(0.1, 6.0 * math.sqrt(24.0 / n)):
    problems.append(f"shape (excess kurtosis) {mo['kurt']:.2f} vs {mr['kurt']:.2f}")
  if mr["kurt"] < -0.9 and n >= 256:  # a uniform draw: U(-b, b) has std b / sqrt(3)
    bound = math.sqrt(3.0) * mr["std"] * (1.0 + std_tol)
    if mo["maxabs"] > bound:
      problems.append(f"max |w| {mo['maxabs']:.4g} outside the uniform bound {bound:.4g}")
  return problems, row


def compare_state_dicts(ours: list[dict], ref: list[dict]) -> tuple[list[str], list[str]]:
  """``(failures, table)``: failing keys with their reasons, and one printable row per tensor."""
  keys_o = {k for k in ours[0] if not k.endswith("num_batches_tracked")}
  keys_r = {k for k in ref[0] if not k.endswith("num_batches_tracked")}
  failures = [f"{k}: only in the JAX export" for k in sorted(keys_o - keys_r)]
  failures += [f"{k}: only in the PyTorch model" for k in sorted(keys_r - keys_o)]
  table = [f"{'key':58s} {'shape':>18s} {'kind':>13s} {'std ours/ref':>21s} "
           f"{'mean ours/ref':>21s} {'kurt ours/ref':>13s}  problems"]
  for k in [k for k in ref[0] if k in keys_o]:
    problems, row = compare_tensor([sd[k] for sd in ours], [sd[k] for sd in ref])
    if "std_o" in row:
      stats = (f"{row['std_o']:10.4g} {row['std_r']:10.4g} {row['mean_o']:10.3g} "
               f"{row['mean_r']:10.3g} {row['kurt_o']:6.2f} {row['kurt_r']:6.2f}")
    elif "const_o" in row:
      stats = f"{'const ' + repr(row['const_o']):>21s} {'const ' + repr(row['const_r']):>21s} {'':13s}"
    else:
      stats = ""
    table.append(f"{k:58s} {str(tuple(ref[0][k].shape)):>18s} {row['kind']:>13s} {stats}  "
                 f"{'; '.join(problems) or 'ok'}")
    if problems:
      failures.append(f"{k}: {'; '.join(problems)}")
  return failures, table


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
FAMILY_CASES = ["repvit_m0_6", "mobilevig_ti", "parameternet_600m", "ghostnet_100", "parcnet_xs",
                "parc_convnext_xt", "parc_resnet50", "parc_mobilenetv2"]


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_fresh_init_matches_official_per_tensor(name):
  pytest.importorskip("torch")
  pytest.importorskip("timm")
  layout, builder, model_kwargs = _torch_builders()[name]
  ours = jax_state_dicts(name, layout, model_kwargs)
  ref = torch_state_dicts(builder)
  failures, table = compare_state_dicts(ours, ref)
  if failures:
    pytest.fail(f"{name}: {len(failures)} of {len(ref[0])} tensors are initialised unlike the "
                f"official model:\n  " + "\n  ".join(failures) + "\n\nAll tensors:\n"
                + "\n".join(table), pytrace=False)


def test_comparison_flags_each_kind_of_mismatch():
  """The statistics catch what the issue measured: a +-2 sigma truncation (std 12% low), zero vs
  fan-in uniform biases, lecun-normal vs PyTorch-uniform kernels, a wrong constant, extra keys."""
  rng = np.random.default_rng(0)
  n, seeds = (64, 3, 3, 3), 3
  bound = 1.0 / math.sqrt(3 * 9)

  def draw(f):
    return [f().astype(np.float32) for _ in range(seeds)]

  uniform = lambda: rng.uniform(-bound, bound, n)
  normal = lambda: rng.normal(0.0, 0.02, n)

  def cut_at_2_sigma():
    x = rng.normal(0.0, 1.0, 4 * math.prod(n))
    return (0.02 * x[np.abs(x) <= 2.0][:math.prod(n)]).reshape(n)

  assert not compare_tensor(draw(uniform), draw(uniform))[0]
  assert not compare_tensor(draw(normal), draw(normal))[0]
  assert not compare_tensor([np.ones(8, np.float32)] * 3, [np.ones(8, np.float32)] * 3)[0]
  assert "std" in compare_tensor(draw(cut_at_2_sigma), draw(normal))[0][0]
  assert "kind zero vs random" in compare_tensor([np.zeros(16, np.float32)] * 3,
                                                 draw(lambda: rng.uniform(-0.1, 0.1, 16)))[0]
  lecun = lambda: rng.normal(0.0, bound, n)  # same std as the uniform, different shape
  problems = compare_tensor(draw(lecun), draw(uniform))[0]
  assert any("kurtosis" in p for p in problems) and any("uniform bound" in p for p in problems)
  assert "constant" in compare_tensor([np.zeros(4, np.float32) + 1e-5] * 3,
                                      [np.zeros(4, np.float32) + 1e-6] * 3)[0][0]
  failures, table = compare_state_dicts([{"a": np.ones(3), "b": np.ones(2)}] * 3,
                                        [{"a": np.ones(3) * 2, "c": np.ones(2)}] * 3)
  assert failures == ["b: only in the JAX export", "c: only in the PyTorch model",
                      "a: constant 1.0 vs 2.0"]
  assert len(table) == 2 and "constant 1.0 vs 2.0" in table[1]
