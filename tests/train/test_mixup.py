"""Mixup / CutMix (jax.numpy and numpy versions) against their defining properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilevis_jax.train.losses import smoothed_one_hot
from mobilevis_jax.train.mixup import mixup_cutmix, mixup_cutmix_np

B, H, W, K = 8, 16, 12, 10


def _id_images():
  # Image i is filled with the value i + 1, so every pixel tells which image it came from.
  return np.broadcast_to(np.arange(1, B + 1, dtype=np.float32)[:, None, None, None],
                         (B, H, W, 3)).copy()


LABELS = np.array([0, 1, 2, 3, 4, 5, 6, 7], np.int32)

# One compiled function per setting, shared by the tests (compiling dominates their run time).
_cutmix_jit = jax.jit(lambda r, x, y: mixup_cutmix(r, x, y, num_classes=K, mixup_alpha=0.0,
                                                   cutmix_alpha=1.0, label_smoothing=0.1))


def _check_cutmix(images, mixed, soft, smoothing):
  np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-5)
  for i in range(B):
    own = float(np.mean(mixed[i] == images[i, 0, 0, 0]))
    partner = float(np.mean(mixed[i] == images[B - 1 - i, 0, 0, 0]))
    assert own + partner == pytest.approx(1.0)
    off = smoothing / K
    # The label weight of each source image equals the area it keeps in the mixed image.
    assert soft[i, LABELS[i]] == pytest.approx(off + (1 - smoothing) * own, abs=1e-5)
    assert soft[i, LABELS[B - 1 - i]] == pytest.approx(off + (1 - smoothing) * partner, abs=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_cutmix_labels_reflect_areas_jnp(seed):
  images = _id_images()
  mixed, soft = _cutmix_jit(jax.random.PRNGKey(seed), jnp.asarray(images), jnp.asarray(LABELS))
  _check_cutmix(images, np.asarray(mixed), np.asarray(soft), 0.1)


@pytest.mark.parametrize("seed", range(4))
def test_cutmix_labels_reflect_areas_np(seed):
  images = _id_images()
  mixed, soft = mixup_cutmix_np(np.random.default_rng(seed), images, LABELS, num_classes=K,
                                mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1)
  _check_cutmix(images, mixed, soft, 0.1)
  assert np.array_equal(images, _id_images())  # input untouched


@pytest.mark.parametrize("impl", ["jnp", "np"])
def test_mixup_is_the_convex_combination_of_the_labels(impl):
  images = _id_images()
  kw = dict(num_classes=K, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0)
  if impl == "jnp":
    mixed, soft = jax.jit(lambda r, x, y: mixup_cutmix(r, x, y, **kw))(
        jax.random.PRNGKey(3), jnp.asarray(images), jnp.asarray(LABELS))
    mixed, soft = np.asarray(mixed), np.asarray(soft)
  else:
    mixed, soft = mixup_cutmix_np(np.random.default_rng(3), images, LABELS, **kw)
  np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-6)
  lam = soft[0, 0]
  assert 0.0 < lam < 1.0
  np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5)


def test_switch_prob_and_lambda_statistics_agree_between_jnp_and_np():
  images = _id_images()
  kw = dict(num_classes=K, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5,
            label_smoothing=0.1)
  fn = jax.jit(jax.vmap(lambda r: mixup_cutmix(r, jnp.asarray(images), jnp.asarray(LABELS), **kw)))

  def is_cutmix(mixed):  # cutmix keeps only the two source values; mixup blends them
    return bool(np.all(np.isin(mixed[0], [images[0, 0, 0, 0], images[-1, 0, 0, 0]])))
  rng = np.random.default_rng(0)
  n = 200
  mixed_all = np.asarray(fn(jax.random.split(jax.random.PRNGKey(0), n))[0])
  jnp_cut = [is_cutmix(m) for m in mixed_all]
  np_cut = [is_cutmix(mixup_cutmix_np(rng, images, LABELS, **kw)[0]) for _ in range(n)]
  # Binomial(200, 0.5): 5 sigma is about +-0.18.
  assert abs(np.mean(jnp_cut) - 0.5) < 0.18 and abs(np.mean(np_cut) - 0.5) < 0.18


def test_smoothing_and_errors():
  t = smoothed_one_hot(jnp.array([2]), 4, 0.1)
  np.testing.assert_allclose(np.asarray(t), [[0.025, 0.025, 0.925, 0.025]], atol=1e-7)
  with pytest.raises(ValueError, match="even"):
    mixup_cutmix_np(np.random.default_rng(0), np.zeros((3, 4, 4, 3)), np.zeros(3, int),
                    num_classes=K)
  with pytest.raises(ValueError, match="B, H, W, C"):
    mixup_cutmix(jax.random.PRNGKey(0), jnp.zeros((4, 4, 3)), jnp.zeros(4, int), num_classes=K)
