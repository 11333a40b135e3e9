"""Wall-clock timing shared by the benchmarks under ``experiments/bench/``."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def median_ms(fn: Callable, *args: Any, reps: int) -> float:
  """Median milliseconds of ``fn(*args)`` over ``reps`` calls, after one untimed warm-up call.

  The warm-up absorbs JAX compilation (and PyTorch's allocator warm-up). JAX results are waited
  for with ``block_until_ready`` because dispatch is asynchronous; other return values (PyTorch
  CPU tensors) are passed through, since those calls are synchronous.
  """
  if reps < 1:
    raise ValueError(f"reps must be >= 1, got {reps}")
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))
