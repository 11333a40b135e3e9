"""JAX's default PRNG (Threefry-2x32) with its bits drawn by numpy on the host, for the one-shot
initialisation program (`models.registry.init_variables`).

Why. The initialisation program is almost nothing but random-number generation: every parameter
leaf costs a `fold_in` (Flax derives one key per parameter) and a `random_bits`, each an unrolled
20-round Threefry that XLA:CPU fuses, emits and compiles on its own. For ParameterNet-600M (688
leaves) that program took 30 s to compile, at optimisation level 0, and 1.5 s to run. With the two
Threefry primitives computed by numpy behind `jax.pure_callback`, what XLA compiles is the
initialisers' arithmetic alone: 2.1 s, and 1.3 s to run (RESULTS.md, "Time to the first training
step"; `experiments/bench/bench_first_step.py`).

What. `HOST_THREEFRY` is a PRNG implementation (`jax.extend.random.define_prng_impl`) with
Threefry's key shape, seeding and `split`, and with `fold_in` and `random_bits` evaluated on the
host by a numpy Threefry-2x32 that reproduces JAX's bit for bit (JAX's `jax_threefry_partitionable`
layout, its default: the bits of a flat index `i` are Threefry of the counter pair `(i >> 32, i &
0xffffffff)`; tests/models/test_host_prng.py compares them with `jax.random.bits` and
`jax.random.fold_in`). A key of this implementation holds the same two words as the plain key it
wraps, so every draw made with it equals the plain key's draw.
"""

from __future__ import annotations

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)  # Threefry's key-schedule constant
_UINT = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


def threefry2x32(key: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Threefry-2x32 (20 rounds) of the counter pairs (x0, x1) under the 2-word `key`, in numpy
  (uint32 arithmetic wraps modulo 2**32, as the cipher needs)."""
  k0, k1 = np.uint32(key[0]), np.uint32(key[1])
  schedule = (k0, k1, k0 ^ k1 ^ _PARITY)
  with np.errstate(over='ignore'):
    x0 = x0.astype(np.uint32) + schedule[0]
    x1 = x1.astype(np.uint32) + schedule[1]
    for block in range(5):
      for r in _ROTATIONS[block % 2]:
        x0 = x0 + x1
        x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
      x0 = x0 + schedule[(block + 1) % 3]
      x1 = x1 + schedule[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


def _host_random_bits(key: np.ndarray, bit_width: int, shape: tuple[int, ...]) -> np.ndarray:
  size = int(np.prod(shape, dtype=np.int64))
  counter = np.arange(size, dtype=np.uint64)
  b0, b1 = threefry2x32(key, (counter >> np.uint64(32)).astype(np.uint32),
                        counter.astype(np.uint32))
  if bit_width == 64:
    bits = (b0.astype(np.uint64) << np.uint64(32)) | b1.astype(np.uint64)
  else:
    bits = (b0 ^ b1).astype(_UINT[bit_width])  # 8 / 16 bits: the low bits, as JAX's convert
  return bits.reshape(shape)


def _host_fold_in(key: np.ndarray, data: np.ndarray) -> np.ndarray:
  # JAX's threefry_fold_in: Threefry of the seed words of `data`, (0, data) for a uint32.
  y0, y1 = threefry2x32(key, np.zeros(1, np.uint32), np.asarray(data, np.uint32).reshape(1))
  return np.array([y0[0], y1[0]], np.uint32)


def _random_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
  if bit_width not in _UINT:
    raise TypeError(f'random bits of width {bit_width}: 8, 16, 32 or 64 only')
  dtype = jnp.dtype(_UINT[bit_width])
  if bit_width == 64 and not jax.config.jax_enable_x64:
    raise TypeError('64-bit random bits need jax_enable_x64')
  return jax.pure_callback(lambda k: _host_random_bits(np.asarray(k), bit_width, tuple(shape)),
                           jax.ShapeDtypeStruct(tuple(shape), dtype), key,
                           vmap_method='sequential')


def _fold_in(key: jax.Array, data: jax.Array) -> jax.Array:
  return jax.pure_callback(lambda k, d: _host_fold_in(np.asarray(k), np.asarray(d)),
                           jax.ShapeDtypeStruct((2,), jnp.uint32), key,
                           jnp.asarray(data, jnp.uint32), vmap_method='sequential')


_THREEFRY = jex_random.threefry_prng_impl
HOST_THREEFRY = jex_random.define_prng_impl(
    key_shape=_THREEFRY.key_shape, seed=_THREEFRY.seed, split=_THREEFRY.split,
    random_bits=_random_bits, fold_in=_fold_in, name='host_threefry2x32', tag='hfry')


def supported() -> bool:
  """Whether host keys draw what plain keys draw: JAX's default PRNG with its default
  (partitionable) bit layout, which is what the numpy cipher reproduces."""
  return (jax.config.jax_default_prng_impl == 'threefry2x32'
          and bool(jax.config.jax_threefry_partitionable))


def wrap(key: jax.Array) -> jax.Array:
  """A raw threefry key (uint32[2], `jax.random.PRNGKey`) as a host-threefry key."""
  return jax.random.wrap_key_data(key, impl=HOST_THREEFRY)
