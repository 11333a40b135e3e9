"""``models.host_prng``: Threefry-2x32 on the host draws exactly what JAX's Threefry draws.

The one-shot initialisation program gets its random bits from the host (issue #10 part 7); any
difference from JAX's own bits would silently change every model's initialisation, so the bits,
the keys and the draws made through them are compared bit for bit.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilevis_jax.models import host_prng

pytestmark = pytest.mark.skipif(not host_prng.supported(),
                                reason="host Threefry reproduces the default partitionable layout")

SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 4, 5), (0,), (4, 0, 2), (1000, 33)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bit_width", [8, 16, 32])
def test_random_bits_equal_jax_threefry(shape, bit_width):
  for seed in (0, 1, 2**31 - 1):
    raw = jax.random.PRNGKey(seed)
    got = jax.jit(lambda k, bw=bit_width, s=shape: jax.random.bits(host_prng.wrap(k), s,
                                                                   jnp.dtype(f"uint{bw}")))(raw)
    want = jax.random.bits(raw, shape, jnp.dtype(f"uint{bit_width}"))
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_fold_in_split_and_draws_equal_jax_threefry():
  raw = jax.random.PRNGKey(42)
  host = host_prng.wrap(raw)
  for data in (0, 1, 12345, 2**32 - 1):
    np.testing.assert_array_equal(
        jax.random.key_data(jax.jit(jax.random.fold_in)(host, np.uint32(data))),
        jax.random.fold_in(raw, np.uint32(data)))
  np.testing.assert_array_equal(jax.random.key_data(jax.random.split(host, 3)),
                                jax.random.split(raw, 3))
  # The float draws the initialisers make, through the same transforms.
  for draw in (lambda k: jax.random.normal(k, (17, 9)),
               lambda k: jax.random.uniform(k, (5, 4), minval=-0.3, maxval=0.3),
               lambda k: jax.random.truncated_normal(k, -2.0, 2.0, (6, 6))):
    np.testing.assert_array_equal(jax.jit(draw)(host), jax.jit(draw)(raw))


def test_batched_keys_under_vmap():
  raws = jax.random.split(jax.random.PRNGKey(7), 4)
  got = jax.jit(jax.vmap(lambda k: jax.random.bits(host_prng.wrap(k), (3, 2))))(raws)
  want = jax.vmap(lambda k: jax.random.bits(k, (3, 2)))(raws)
  np.testing.assert_array_equal(got, want)
  folded = jax.jit(jax.vmap(lambda k, d: jax.random.key_data(
      jax.random.fold_in(host_prng.wrap(k), d))))(raws, jnp.arange(4, dtype=jnp.uint32))
  np.testing.assert_array_equal(folded, jax.vmap(jax.random.fold_in)(raws,
                                                                     jnp.arange(4, dtype=jnp.uint32)))


def test_cipher_known_answer():
  # Threefry-2x32, 20 rounds, from the Random123 known-answer tests (key and counter all zero /
  # all ones), independent of JAX.
  zero = host_prng.threefry2x32(np.zeros(2, np.uint32), np.zeros(1, np.uint32),
                                np.zeros(1, np.uint32))
  assert [hex(int(w[0])) for w in zero] == ["0x6b200159", "0x99ba4efe"]
  ones = np.full(1, 0xFFFFFFFF, np.uint32)
  full = host_prng.threefry2x32(np.full(2, 0xFFFFFFFF, np.uint32), ones, ones)
  assert [hex(int(w[0])) for w in full] == ["0x1cb996fc", "0xbb002be7"]


def test_bad_bit_width():
  with pytest.raises(TypeError, match="8, 16, 32 or 64"):
    host_prng._random_bits(jnp.zeros(2, jnp.uint32), 12, (3,))
