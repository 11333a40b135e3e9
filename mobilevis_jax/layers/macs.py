"""Trace-time multiply-accumulate counting, the lowest layer of :func:`mobilevis_jax.profile`.

It lives in ``layers/`` because the custom operators here (ParC, dynamic convolution, graph
aggregation) report their own MACs while they are traced, and ``layers/`` may import nothing above
itself. ``mobilevis_jax.profiling.profile`` opens a :func:`counting` context around an abstract
trace of a model and turns the counts into its report.

* every ``nn.Conv`` call: output elements x (kernel height x width x input channels / groups);
* every ``nn.Dense`` call: output elements x input features;
* anything a custom op reports with :func:`add_macs` under a tag of its choosing. Tags starting
  with ``_`` are side counts (what some official profiler counts that is not a MAC).
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import flax.linen as nn

_COUNTS: contextvars.ContextVar[collections.Counter | None] = contextvars.ContextVar(
    "mac_counts", default=None)


def add_macs(n: int, tag: str) -> None:
  """Report ``n`` multiply-accumulates for a custom op (a no-op unless inside :func:`counting`)."""
  counts = _COUNTS.get()
  if counts is not None:
    counts[tag] += int(n)


def _interceptor(next_fun, args, kwargs, context) -> Any:
  out = next_fun(*args, **kwargs)
  if context.method_name != "__call__" or _COUNTS.get() is None:
    return out
  module = context.module
  if isinstance(module, nn.Conv) and not isinstance(module, nn.ConvTranspose):
    x = args[0]
    taps = math.prod(module.kernel_size)
    add_macs(math.prod(out.shape) * taps * x.shape[-1] // module.feature_group_count, "conv")
  elif isinstance(module, nn.Dense):
    add_macs(math.prod(out.shape) * args[0].shape[-1], "dense")
  return out


@contextlib.contextmanager
def counting() -> Iterator[collections.Counter]:
  """Collect the MACs of everything traced inside the context, by tag."""
  counts: collections.Counter = collections.Counter()
  token = _COUNTS.set(counts)
  try:
    with nn.intercept_methods(_interceptor):
      yield counts
  finally:
    _COUNTS.reset(token)
