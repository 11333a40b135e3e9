"""Train-mode fidelity against the PyTorch references: one step, compared the way rounding allows.

A train-mode step through BatchNorm at a small batch is ill-conditioned: the backward pass divides
by batch standard deviations that can be tiny (pooled or 1x1 maps), so two correct float32
implementations can differ by far more than float32's epsilon. A fixed tolerance therefore cannot
tell a bug from rounding. Instead the PyTorch step is run twice, in float64 (the reference) and in
float32, and the JAX float32 step must be as close to the float64 reference as PyTorch's own
float32 step is, statistic by statistic (:func:`assert_as_close_as_torch`).

The statistics (:func:`compare`): the largest absolute difference of the outputs and of the BN
running statistics after the step, and the median and the largest per-tensor relative error of
the loss gradients (``|g - g_ref| / |g_ref|`` in the Frobenius norm, one value per parameter).

Helpers here are imported by the tests; torch is only imported inside the functions that need it.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mobilevis_jax import interop


@dataclasses.dataclass
class StepResult:
  """One train-mode step: outputs (one array per head), the loss, the gradient of every parameter
  and the BN running statistics after the step, both keyed by PyTorch state_dict name."""
  outputs: list[np.ndarray]
  loss: float
  grads: dict[str, np.ndarray]
  stats: dict[str, np.ndarray]


def _as_list(out) -> list:
  return list(out) if isinstance(out, (tuple, list)) else [out]


def disable_torch_dropout(model) -> None:
  """Dropout and drop path off in a train-mode PyTorch model (nn.Dropout, timm/ref DropPath)."""
  import torch
  for m in model.modules():
    if isinstance(m, torch.nn.Dropout):
      m.p = 0.0
    if hasattr(m, "drop_prob"):
      m.drop_prob = 0.0


def torch_train_step(model, x_nhwc: np.ndarray, labels: np.ndarray, dtype: Any) -> StepResult:
  """One train-mode forward/backward of a copy of ``model`` in ``dtype`` (torch.float32/64).

  The loss is the sum over heads of the mean cross-entropy on ``labels``; the model itself and
  its running statistics are left untouched.
  """
  import torch
  m = copy.deepcopy(model).to(dtype).train()
  disable_torch_dropout(m)
  m.zero_grad(set_to_none=True)
  x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))).to(dtype)
  y = torch.from_numpy(labels.astype(np.int64))
  outs = _as_list(m(x))
  loss = sum(torch.nn.functional.cross_entropy(o, y) for o in outs)
  loss.backward()
  grads = {k: (p.grad.detach().double().numpy() if p.grad is not None
               else np.zeros(tuple(p.shape))) for k, p in m.named_parameters()}
  stats = {k: b.detach().double().numpy() for k, b in m.named_buffers()
           if k.endswith(("running_mean", "running_var"))}
  return StepResult([o.detach().double().numpy() for o in outs], float(loss), grads, stats)


def make_jax_train_step(model) -> Callable:
  """A jitted ``(variables, x, labels) -> (outputs, loss, grads, new_batch_stats)`` in train mode
  with the same loss as :func:`torch_train_step` (no rngs: dropout must be built at rate 0)."""

  def loss_fn(params, batch_stats, x, labels):
    out, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                           mutable=["batch_stats"])
    outs = _as_list(out)
    loss = 0.0
    for o in outs:
      logp = jax.nn.log_softmax(o.astype(jnp.float32), axis=-1)
      loss = loss + -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
    return loss, (outs, upd["batch_stats"])

  @jax.jit
  def step(variables, x, labels):
    (loss, (outs, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"], variables["batch_stats"], x, labels)
    return outs, loss, grads, stats

  return step


def jax_train_step(step: Callable, name: str, variables: Mapping, x_nhwc: np.ndarray,
                   labels: np.ndarray, torch_model, layout: str = "official",
                   **model_kwargs) -> StepResult:
  """Run ``step`` (from :func:`make_jax_train_step`) and key its gradients and statistics by the
  PyTorch names, through the model's interop layout (the mapping checkpoints use)."""
  outs, loss, grads, stats = step(variables, jnp.asarray(x_nhwc), jnp.asarray(labels))
  sd = interop.to_torch_state_dict(name, {"params": grads, "batch_stats": stats}, layout=layout,
                                   **model_kwargs)
  param_keys = [k for k, _ in torch_model.named_parameters()]
  stat_keys = [k for k, _ in torch_model.named_buffers()
               if k.endswith(("running_mean", "running_var"))]
  return StepResult([np.asarray(o, np.float64) for o in outs], float(loss),
                    {k: np.asarray(sd[k], np.float64) for k in param_keys},
                    {k: np.asarray(sd[k], np.float64) for k in stat_keys})


def vanishing_gradients(want: StepResult, rtol: float = 1e-8) -> set[str]:
  """Parameters whose reference gradient is zero in exact arithmetic, up to float64 rounding:
  e.g. the bias of a BN that feeds another train-mode BN (a per-channel shift it removes). Their
  float32 gradients are pure rounding noise, so a relative error means nothing there."""
  top = max(float(np.linalg.norm(g)) for g in want.grads.values())
  return {k for k, g in want.grads.items() if float(np.linalg.norm(g)) <= rtol * top}


def relative_errors(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Per-tensor ``|got - want| / |want|`` (Frobenius)."""
  if set(got) != set(want):
    raise KeyError(f"different tensors: {sorted(set(got) ^ set(want))[:10]}")
  out = {}
  for k, w in want.items():
    g = got[k]
    if g.shape != w.shape:
      raise ValueError(f"{k}: shape {g.shape} vs {w.shape}")
    out[k] = float(np.linalg.norm(g - w)) / max(float(np.linalg.norm(w)), 1e-300)
  return out


def compare(got: StepResult, want: StepResult) -> dict[str, float]:
  """The statistics of ``got`` against the reference ``want`` (see the module docstring).

  ``grad_rel_*`` cover the parameters with a non-vanishing reference gradient;
  ``vanishing_grad_max`` is the largest gradient norm ``got`` has where the reference's vanishes,
  relative to the largest reference gradient norm (rounding noise: ~1e-7 in float32).
  """
  if len(got.outputs) != len(want.outputs):
    raise ValueError(f"{len(got.outputs)} outputs vs {len(want.outputs)}")
  zero = vanishing_gradients(want)
  rel = relative_errors({k: v for k, v in got.grads.items() if k not in zero},
                        {k: v for k, v in want.grads.items() if k not in zero})
  rel = np.array(list(rel.values()))
  top = max(float(np.linalg.norm(g)) for g in want.grads.values())
  return {
      "outputs_max_abs": max(float(np.abs(g - w).max()) for g, w in zip(got.outputs, want.outputs)),
      "bn_stats_max_abs": max((float(np.abs(got.stats[k] - w).max()) for k, w in want.stats.items()),
                              default=0.0),
      "grad_rel_median": float(np.median(rel)),
      "grad_rel_max": float(rel.max()),
      "vanishing_grad_max": max((float(np.linalg.norm(got.grads[k])) / top for k in zero),
                                default=0.0),
  }


def worst_gradients(got: StepResult, want: StepResult, n: int = 6) -> list[tuple[str, float]]:
  """The ``n`` parameters with the largest gradient relative error (for failure messages)."""
  zero = vanishing_gradients(want)
  rel = relative_errors({k: v for k, v in got.grads.items() if k not in zero},
                        {k: v for k, v in want.grads.items() if k not in zero})
  return sorted(rel.items(), key=lambda kv: -kv[1])[:n]


# Statistics compared as "within factor x PyTorch float32"; vanishing gradients are rounding
# noise of different summation orders, so they only need to stay at noise level.
RATIO_KEYS = ("outputs_max_abs", "bn_stats_max_abs", "grad_rel_median", "grad_rel_max")
VANISHING_GRAD_TOL = 1e-4


def assert_as_close_as_torch(ours: StepResult, torch32: StepResult, torch64: StepResult,
                             factor: float = 3.0) -> dict:
  """Require every statistic of ``ours`` vs float64 to be within ``factor`` x PyTorch float32's.

  Returns both sets of statistics. The reference must not be degenerate: its outputs must vary
  and gradients must not all vanish, otherwise agreeing with it would prove nothing.
  """
  assert max(float(np.std(o)) for o in torch64.outputs) > 1e-2, "degenerate reference outputs"
  # (conv biases feeding a train-mode BN vanish: MobileViG has many, so only require some left)
  # (a small network needs all but one gradient left)
  left = len(torch64.grads) - len(vanishing_gradients(torch64))
  assert left >= min(10, len(torch64.grads) - 1), "vanishing gradients"
  s_ours, s_torch = compare(ours, torch64), compare(torch32, torch64)
  bad = {k: (s_ours[k], s_torch[k]) for k in RATIO_KEYS if s_ours[k] > factor * s_torch[k]}
  if s_ours["vanishing_grad_max"] > VANISHING_GRAD_TOL:
    bad["vanishing_grad_max"] = (s_ours["vanishing_grad_max"], VANISHING_GRAD_TOL)
  assert not bad, (
      f"JAX float32 is more than {factor}x further from the float64 step than PyTorch float32 "
      f"(ours, torch): {bad}; worst gradients: {worst_gradients(ours, torch64)}")
  return {"ours": s_ours, "torch32": s_torch}
