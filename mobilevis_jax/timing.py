"""Wall-clock timing shared by the benchmarks under ``experiments/bench/``."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def sample_ms(fn: Callable, *args: Any, reps: int, warmup: int = 1) -> np.ndarray:
  """Milliseconds of each of ``reps`` calls of ``fn(*args)``, after ``warmup`` untimed calls.

  The warm-up absorbs JAX compilation (and PyTorch's allocator warm-up). JAX results are waited
  for with ``block_until_ready`` because dispatch is asynchronous; other return values (PyTorch
  CPU tensors, numpy arrays) are passed through, since those calls are synchronous.
  """
  if reps < 1:
    raise ValueError(f"reps must be >= 1, got {reps}")
  if warmup < 0:
    raise ValueError(f"warmup must be >= 0, got {warmup}")
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = np.empty(reps)
  for i in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times[i] = time.perf_counter() - t
  return 1e3 * times


def spread_ms(times: np.ndarray) -> dict[str, float]:
  """Median and 10th / 90th percentiles of ``times`` (as :func:`sample_ms` returns them)."""
  p10, median, p90 = np.percentile(np.asarray(times, dtype=np.float64), [10, 50, 90])
  return {"median_ms": float(median), "p10_ms": float(p10), "p90_ms": float(p90)}


def median_ms(fn: Callable, *args: Any, reps: int) -> float:
  """Median milliseconds of ``fn(*args)`` over ``reps`` calls, after one untimed warm-up call."""
  return float(np.median(sample_ms(fn, *args, reps=reps, warmup=1)))
