"""RandAugment ops against timm's PIL implementation, op by op, on a real photograph."""
import numpy as np
import pytest
from PIL import Image

from mobilevis_jax.data import randaugment as ra  # first: it orders the native-library loads

tf = pytest.importorskip("tensorflow")
timm_aa = pytest.importorskip("timm.data.auto_augment")


@pytest.fixture(scope="module")
def photo():
  from sklearn.datasets import load_sample_image
  return Image.fromarray(load_sample_image("china.jpg")).resize((96, 64), Image.BICUBIC)


def _timm_args(name, magnitude):
  """timm's level -> argument for a positive sign (``_randomly_negate`` not taken)."""
  level = magnitude / 10.0
  table = {
      "Rotate": (level * 30.0,), "ShearX": (level * 0.3,), "ShearY": (level * 0.3,),
      "TranslateXRel": (level * 0.45,), "TranslateYRel": (level * 0.45,),
      "PosterizeIncreasing": (4 - int(level * 4),), "SolarizeIncreasing": (256 - int(level * 256),),
      "SolarizeAdd": (min(128, int(level * 110)),),
      "ColorIncreasing": (1.0 + level * 0.9,), "ContrastIncreasing": (1.0 + level * 0.9,),
      "BrightnessIncreasing": (1.0 + level * 0.9,), "SharpnessIncreasing": (1.0 + level * 0.9,),
  }
  return table.get(name, ())


def _timm_op(name, img, magnitude):
  fn = timm_aa.NAME_TO_OP[name]
  return np.asarray(fn(img, *_timm_args(name, magnitude), fillcolor=ra.FILL,
                       resample=Image.BILINEAR), np.float32)


def _ours(name, img, magnitude, negate=False):
  x = tf.constant(np.asarray(img, np.float32))
  return ra.apply_op(name, x, tf.constant(float(magnitude)), tf.constant(negate)).numpy()


GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@pytest.mark.parametrize("name", ra.INCREASING_OPS)
def test_op_matches_timm_at_m9(photo, name):
  ours, ref = _ours(name, photo, 9.0), _timm_op(name, photo, 9.0)
  diff = np.abs(ours - ref)
  if name in GEOMETRIC:
    # Bilinear resampling rules differ slightly at the image border; the interior must agree.
    assert diff.mean() < 2.0, (name, diff.mean())
    assert np.median(diff) <= 1.0, name
  else:
    # Integer look-up / blend ops: at most one grey level off (float vs fixed-point rounding).
    assert diff.max() <= 1.0 + 1e-4, (name, diff.max())
    assert (diff > 0).mean() < 0.05, (name, (diff > 0).mean())


@pytest.mark.parametrize("name", ra.INCREASING_OPS)
def test_magnitude_zero_identity_exactly_where_timm_is(photo, name):
  src = np.asarray(photo, np.float32)
  timm_identity = np.array_equal(_timm_op(name, photo, 0.0), src)
  ours = _ours(name, photo, 0.0)
  assert np.array_equal(ours, src) == timm_identity, (name, timm_identity)


def test_negative_sign_mirrors_the_op(photo):
  # Rotating by +a then reading the mirror image equals rotating the mirror by -a.
  pos = _ours("Rotate", photo, 9.0, negate=False)
  neg = _ours("Rotate", photo.transpose(Image.FLIP_LEFT_RIGHT), 9.0, negate=True)
  assert np.abs(pos[:, ::-1] - neg).mean() < 1.5


def test_parse_and_errors():
  spec = ra.parse_randaugment("rand-m9-mstd0.5-inc1")
  assert (spec.magnitude, spec.magnitude_std, spec.num_layers, spec.prob, spec.increasing) == (
      9.0, 0.5, 2, 0.5, True)
  assert spec.ops == ra.INCREASING_OPS
  with pytest.raises(ValueError, match="unknown section"):
    ra.parse_randaugment("rand-m9-q3")
  with pytest.raises(ValueError, match="must start"):
    ra.parse_randaugment("autoaug-m9")


def test_randaugment_full_policy_is_seeded(photo):
  spec = ra.parse_randaugment("rand-m9-mstd0.5-inc1")
  x = tf.constant(np.asarray(photo, np.float32))
  outs = [ra.randaugment(x, tf.constant([0, s], tf.int64), spec).numpy() for s in (1, 1, 2, 3, 4)]
  assert np.array_equal(outs[0], outs[1])
  assert sum(not np.array_equal(o, np.asarray(photo, np.float32)) for o in outs[2:]) >= 1
  assert all(o.min() >= 0 and o.max() <= 255 and np.array_equal(o, np.round(o)) for o in outs)
