"""``models.registry.init_variables`` (the trainer's one-shot init, issue #10 part 7): the same
parameters as ``jax.jit(model.init)`` up to float32 rounding, deterministic in the seed."""
import jax
import numpy as np

from mobilevis_jax.models.registry import init_variables
from tests.train.tiny_model import TinyCNN


def test_one_shot_init_equals_jit_init_and_is_reproducible():
  model = TinyCNN(num_classes=7)
  a = init_variables(model, jax.random.PRNGKey(0), 16)
  b = init_variables(model, jax.random.PRNGKey(0), 16)
  c = init_variables(model, jax.random.PRNGKey(1), 16)
  ref = jax.jit(lambda r: model.init({"params": r, "dropout": r}, np.zeros((1, 16, 16, 3),
                                     np.float32), train=False))(jax.random.PRNGKey(0))
  assert set(a) == {"params", "batch_stats"}
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(dict(ref))
  for x, y, z, r in zip(*(jax.tree_util.tree_leaves(t) for t in (a, b, c, dict(ref)))):
    np.testing.assert_array_equal(x, y)                   # same seed, same values
    np.testing.assert_allclose(x, r, rtol=1e-6, atol=1e-7)  # the same draws as jit(model.init)
    if x.size > 1 and np.std(r) > 0:                      # random tensors differ across seeds
      assert not np.array_equal(x, z)
