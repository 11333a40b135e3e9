"""PyTorch modules of every registered model (the ``[torch]`` extra).

Our own PyTorch code with the official module trees and state_dict key names (timm's for the
GhostNets and RegNetY, whose layout is timm's): one file per family, with the family stems of
``mobilevis_jax.models``. They are the parity references of the test suite and what
``mobilevis export --format torch`` deploys to:

    >>> from mobilevis_jax import torch_models
    >>> module = torch_models.create_model('repvit_m0_6', fused=True)   # untrained
    >>> module = torch_models.load('repvit_m0_6.safetensors')            # an exported model

torch is imported here and nowhere else in the package; ``import mobilevis_jax`` never imports
this subpackage.
"""
from __future__ import annotations

try:
  import torch  # noqa: F401
except ImportError as e:
  raise ImportError(
      "mobilevis_jax.torch_models needs PyTorch: pip install 'mobilevis_jax[torch]'") from e

from mobilevis_jax.torch_models.registry import (
  BAKED_FAMILIES,
  FUSABLE_FAMILIES,
  bake_,
  check_output_path,
  create_model,
  family,
  layout,
  list_models,
  load,
  read_header,
  save,
)

__all__ = ["BAKED_FAMILIES", "FUSABLE_FAMILIES", "bake_", "check_output_path", "create_model",
           "family", "layout", "list_models", "load", "read_header", "save"]
