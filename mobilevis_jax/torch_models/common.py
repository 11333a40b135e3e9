"""What more than one family's PyTorch module needs (torch only; no family imports another)."""
from __future__ import annotations

import torch
from torch import nn


def input_shapes(model: nn.Module, resolution: tuple[int, int],
                 kind: type[nn.Module]) -> dict[nn.Module, torch.Size]:
  """Input shape of every ``kind`` submodule of ``model`` for an ``(H, W)`` image batch.

  Found by one eval-mode forward pass of a zero batch with pre-hooks (the ParC families bake
  their kernels to these sizes); the hooks are removed and the train/eval mode restored after.
  """
  shapes = {}
  hooks = [m.register_forward_pre_hook(lambda mod, args: shapes.__setitem__(mod, args[0].shape))
           for m in model.modules() if isinstance(m, kind)]
  was_training = model.training
  try:
    with torch.no_grad():
      model.eval()(torch.zeros(1, 3, *resolution))
  finally:
    for hook in hooks:
      hook.remove()
    model.train(was_training)
  return shapes
