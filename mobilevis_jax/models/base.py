"""The model surface every family's classifier shares: the ``forward_features`` /
``forward_head`` split of ``__call__`` (CONTRIBUTING.md, "Model API"), written once.

A family's model class derives from :class:`Classifier`, declares a ``features_only`` field and
implements ``_head(x, train, pre_logits=False)``: everything after the last stage (pooling, any
1x1 expansion, the classifier). Its ``__call__`` ends with ``return self._head(x, train)``, so
``forward_head`` creates the same submodules under the same names and reads the same variables.
"""
from __future__ import annotations

import flax.linen as nn
import jax

# What a head returns: logits, or (logits, dist_logits) for a distillation head in train mode.
HeadOutput = jax.Array | tuple[jax.Array, jax.Array]


class Classifier(nn.Module):
  """Base of the families' model classes (no fields: each subclass declares its own)."""

  def forward_features(self, x: jax.Array, train: bool = False) -> jax.Array:
    """The map before pooling: the last ``features_only`` output (stride 32)."""
    return self.clone(parent=self.scope, features_only=True)(x, train)[-1]

  @nn.compact
  def forward_head(self, x: jax.Array, train: bool = False, pre_logits: bool = False
                   ) -> HeadOutput:
    """Classify a :meth:`forward_features` map as ``__call__`` does; ``pre_logits`` stops before
    the classifier. (Same submodule names as ``__call__``, so the same variables.)"""
    if self.features_only:
      raise ValueError("a features_only model has no head")
    return self._head(x, train, pre_logits)

  def _head(self, x: jax.Array, train: bool, pre_logits: bool = False) -> HeadOutput:
    raise NotImplementedError(f"{type(self).__name__} does not define its head")
