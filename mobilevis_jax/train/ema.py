"""Exponential moving average of parameters and BatchNorm statistics (timm ModelEmaV2 semantics:
every step, ema <- decay * ema + (1 - decay) * current, buffers included)."""

from __future__ import annotations

from typing import Any

import jax


def ema_update(ema_tree: Any, new_tree: Any, decay: float) -> Any:
  """One EMA step over matching trees; leaves keep the EMA tree's dtype (float32)."""
  return jax.tree.map(lambda e, n: (decay * e + (1.0 - decay) * n.astype(e.dtype)).astype(e.dtype),
                      ema_tree, new_tree)
