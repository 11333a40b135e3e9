"""Activations with the exact PyTorch definitions.

``jax.nn.gelu`` defaults to the tanh approximation; PyTorch's ``nn.GELU()`` is the erf form, and
the difference (~1e-3) breaks 1e-4 logit parity, so models must use :func:`gelu` from here.

:func:`tanh_gelu_when_traced` switches :func:`gelu` to the tanh form inside a context, for
targets without an erf kernel: LiteRT's full-integer int8 (the erf decomposes into a DIV/SELECT
chain that has no int8 kernels; the tanh form is MUL/ADD/TANH, all int8).
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp

_TANH_GELU: contextvars.ContextVar[bool] = contextvars.ContextVar("tanh_gelu", default=False)


def gelu(x: jax.Array) -> jax.Array:
  """``torch.nn.GELU()``: the exact erf form (tanh inside :func:`tanh_gelu_when_traced`)."""
  return jax.nn.gelu(x, approximate=_TANH_GELU.get())


@contextlib.contextmanager
def tanh_gelu_when_traced() -> Iterator[None]:
  """Functions traced inside the context use the tanh approximation of GELU (~1e-3 off)."""
  token = _TANH_GELU.set(True)
  try:
    yield
  finally:
    _TANH_GELU.reset(token)

relu = jax.nn.relu
silu = jax.nn.silu


def relu6(x: jax.Array) -> jax.Array:
  return jnp.clip(x, 0.0, 6.0)


def hard_sigmoid(x: jax.Array) -> jax.Array:
  """``torch.nn.Hardsigmoid`` / GhostNet's ``hard_sigmoid``: relu6(x + 3) / 6."""
  return relu6(x + 3.0) / 6.0


def hard_swish(x: jax.Array) -> jax.Array:
  """``torch.nn.Hardswish``: x * relu6(x + 3) / 6."""
  return x * hard_sigmoid(x)
