"""ParC operator: resampling, direct / official-conv / FFT forms, fused rfft2, ParCConv module."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilevis_jax.layers import parc

SIZES = (1, 2, 7, 8, 14, 16, 32, 56)


def numpy_circular(x, kernel, axis, dense=False):
  """The definition, y[i] = sum_k w[k] x[(i + k) mod n], with np.roll."""
  n = x.shape[axis]
  out = 0.0
  for k in range(n):
    shifted = np.roll(x, -k, axis=axis)  # shifted[i] = x[(i + k) mod n]
    if dense:
      out = out + np.einsum("bhwc,co->bhwo", shifted, kernel[k])
    else:
      out = out + shifted * kernel[k]
  return out


def rand(key, shape):
  return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32)


# --- resampling --------------------------------------------------------------------------------
@pytest.mark.parametrize("size_in,size_out", [(32, 40), (32, 28), (16, 7), (8, 1), (1, 5), (7, 7),
                                              (2, 9)])
def test_resample_matches_torch_bilinear_align_corners(size_in, size_out):
  torch = pytest.importorskip("torch")
  v = np.asarray(rand(size_in * 100 + size_out, (size_in, 6)))
  ref = torch.nn.functional.interpolate(torch.tensor(v.T[None, :, :, None]), [size_out, 1],
                                        mode="bilinear", align_corners=True)
  ref = ref[0, :, :, 0].numpy().T
  out = np.asarray(parc.resample_1d(jnp.asarray(v), size_out, axis=0))
  np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)


def test_resample_along_other_axis_and_errors():
  v = rand(0, (1, 1, 8, 3))
  out = parc.resample_1d(v, 15, axis=2)
  assert out.shape == (1, 1, 15, 3)
  # align_corners keeps both end points and puts sample 2i of the 15 exactly on input sample i.
  np.testing.assert_allclose(out[0, 0, ::2], v[0, 0], atol=1e-6)
  with pytest.raises(ValueError, match=">= 1"):
    parc.resample_1d(v, 0, axis=2)


# --- the operator ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["direct", "conv", "fft"])
def test_circular_conv_matches_definition(method):
  x = rand(1, (2, 7, 5, 4))
  for axis in (1, 2):
    for dense in (False, True):
      n = x.shape[axis]
      kernel = rand(2, (n, 4, 3) if dense else (n, 4))
      out = jax.jit(lambda x, k: parc.circular_conv(x, k, axis, method=method, dense=dense))(x, kernel)
      ref = numpy_circular(np.asarray(x), np.asarray(kernel), axis, dense)
      np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=0)


def test_alignment_is_tap0_on_output_i():
  # A unit impulse at tap k shifts the signal by k: y[i] = x[i + k].
  x = jnp.arange(6.0).reshape(1, 6, 1, 1)
  kernel = jnp.zeros((6, 1)).at[2, 0].set(1.0)
  y = parc.circular_conv(x, kernel, 1, method="fft")
  np.testing.assert_allclose(np.asarray(y).ravel(), [2, 3, 4, 5, 0, 1], atol=1e-5)


def _values_and_grads(method, axis, dense=False):
  """Jitted output and gradients (w.r.t. input and kernel) of a non-linear readout."""
  def loss(x, k):
    return jnp.sum(jnp.sin(parc.circular_conv(x, k, axis, method=method, dense=dense)))
  return jax.jit(lambda x, k: (parc.circular_conv(x, k, axis, method=method, dense=dense),
                               jax.grad(loss, argnums=(0, 1))(x, k)))


def assert_close_scaled(a, b, tol=1e-5):
  """max |a - b| <= tol * max(1, max |b|): float32 FFT rounding grows with the magnitude."""
  a, b = np.asarray(a), np.asarray(b)
  assert np.max(np.abs(a - b)) <= tol * max(1.0, float(np.max(np.abs(b)))), np.max(np.abs(a - b))


@pytest.mark.parametrize("n", SIZES)
def test_fft_equals_direct_values_and_gradients(n):
  x, kh = rand(n, (2, n, n, 5)), rand(n + 1, (n, 5))
  y_d, g_d = _values_and_grads("direct", 1)(x, kh)
  y_f, g_f = _values_and_grads("fft", 1)(x, kh)
  assert_close_scaled(y_f, y_d)
  for a, b in zip(g_f, g_d):
    assert_close_scaled(a, b)


@pytest.mark.parametrize("dense", [False, True])
def test_fft_equals_direct_non_square(dense):
  for h, w in ((7, 12),):  # each axis in turn: H-kernel length 7, W-kernel length 12
    x = rand(h * w, (2, h, w, 3))
    for axis, n in ((1, h), (2, w)):
      kernel = rand(n, (n, 3, 4) if dense else (n, 3))
      y_d, g_d = _values_and_grads("direct", axis, dense)(x, kernel)
      y_f, g_f = _values_and_grads("fft", axis, dense)(x, kernel)
      assert_close_scaled(y_f, y_d)
      for a, b in zip(g_f, g_d):
        assert_close_scaled(a, b)


@pytest.mark.parametrize("shape", [(7, 12), (1, 5)])
def test_rfft2_pair_equals_two_1d_convs(shape):
  h, w = shape
  x, kh, kw = rand(0, (2, h, w, 3)), rand(1, (h, 3)), rand(2, (w, 3))
  seq = lambda x, kh, kw: parc.circular_conv(parc.circular_conv(x, kh, 1, method="direct"), kw, 2,
                                             method="direct")
  np.testing.assert_allclose(np.asarray(parc.circular_conv_hw(x, kh, kw)),
                             np.asarray(seq(x, kh, kw)), atol=1e-5, rtol=0)
  loss = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), (0, 1, 2)))
  for a, b in zip(loss(parc.circular_conv_hw)(x, kh, kw), loss(seq)(x, kh, kw)):
    assert_close_scaled(a, b)


def test_operand_errors_are_explicit():
  x = rand(0, (1, 8, 6, 4))
  with pytest.raises(ValueError, match="kernel length 6 != feature length 8"):
    parc.circular_conv(x, rand(1, (6, 4)), 1)
  with pytest.raises(ValueError, match="axis must be 1"):
    parc.circular_conv(x, rand(1, (4, 4)), 3)
  with pytest.raises(ValueError, match="input channels"):
    parc.circular_conv(x, rand(1, (8, 5)), 1)
  with pytest.raises(ValueError, match="method must be one of"):
    parc.circular_conv(x, rand(1, (8, 4)), 1, method="winograd")
  with pytest.raises(ValueError, match="dense kernel"):
    parc.circular_conv(x, rand(1, (8, 4)), 1, dense=True)


def test_auto_uses_the_stored_crossover(monkeypatch, caplog):
  backend = jax.default_backend()
  calls = []
  monkeypatch.setattr(parc, "_fft", lambda *a: calls.append("fft") or parc._direct(*a))
  monkeypatch.setitem(parc.FFT_CROSSOVER, backend, 8)
  parc.circular_conv(rand(0, (1, 8, 3, 2)), rand(1, (8, 2)), 1, method="auto")
  parc.circular_conv(rand(0, (1, 7, 3, 2)), rand(1, (7, 2)), 1, method="auto")
  assert calls == ["fft"]
  monkeypatch.setitem(parc.FFT_CROSSOVER, backend, None)  # measured: the FFT never wins
  parc.circular_conv(rand(0, (1, 64, 3, 2)), rand(1, (64, 2)), 1, method="auto")
  assert calls == ["fft"]
  # A backend without a measurement (e.g. TPU) falls back to the exact direct form, and says so.
  monkeypatch.delitem(parc.FFT_CROSSOVER, backend)
  parc._warn_no_crossover.cache_clear()
  with caplog.at_level("WARNING", logger=parc.__name__):
    parc.circular_conv(rand(0, (1, 8, 3, 2)), rand(1, (8, 2)), 1, method="auto")
  assert calls == ["fft"]
  assert "no measured FFT crossover" in caplog.text and "'direct'" in caplog.text


# --- the module --------------------------------------------------------------------------------
def test_parc_conv_resamples_h_and_w_kernels_independently():
  """On a non-square map the H-kernel is resampled to H and the W-kernel to W."""
  x = rand(0, (2, 12, 20, 3))
  for axis, n in (("H", 12), ("W", 20)):
    conv = parc.ParCConv(axis, meta_kernel_size=16, use_pe=True, use_bias=True, method="direct")
    variables = conv.init(jax.random.PRNGKey(1), x)
    p = variables["params"]
    y = conv.apply(variables, x)
    ax = 1 if axis == "H" else 2
    kernel = parc.resample_1d(p["kernel"].reshape(16, 3), n, 0)
    pe = parc.resample_1d(p["pe"], n, ax)
    ref = numpy_circular(np.asarray(x + pe), np.asarray(kernel), ax) + np.asarray(p["bias"])
    np.testing.assert_allclose(np.asarray(y), ref, atol=2e-5, rtol=0)
    assert p["kernel"].shape == ((16, 1, 1, 3) if axis == "H" else (1, 16, 1, 3))


def test_parc_conv_dense_shapes_and_init():
  conv = parc.ParCConv("H", 14, dense=True, features=6, use_bias=True)
  variables = conv.init(jax.random.PRNGKey(0), jnp.zeros((1, 14, 14, 4)))
  k = variables["params"]["kernel"]
  assert k.shape == (14, 1, 4, 6) and variables["params"]["bias"].shape == (6,)
  # PyTorch's default init: U(+-1/sqrt(fan_in)), fan_in = Cin * K.
  assert float(jnp.max(jnp.abs(k))) <= 1 / np.sqrt(14 * 4) + 1e-7
  y = conv.apply(variables, rand(1, (1, 14, 14, 4)))
  assert y.shape == (1, 14, 14, 6)


def test_parc_conv_errors():
  x = jnp.zeros((1, 10, 10, 4))
  with pytest.raises(ValueError, match="resample=False"):
    parc.ParCConv("H", 14, resample=False).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="axis must be 'H' or 'W'"):
    parc.ParCConv("D", 10).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="depthwise ParCConv keeps the channel count"):
    parc.ParCConv("H", 10, features=8).init(jax.random.PRNGKey(0), x)


class _Pair(nn.Module):
  first: str
  fused: bool

  @nn.compact
  def __call__(self, x):
    second = "W" if self.first == "H" else "H"
    a = parc.ParCConv(self.first, 8, use_pe=True, use_bias=True, method="direct", name="a")
    b = parc.ParCConv(second, 6, use_pe=True, use_bias=True, method="direct", name="b")
    return parc.parc_hw_fused(x, a, b) if self.fused else b(a(x))


@pytest.mark.parametrize("first", ["H", "W"])
def test_fused_pair_with_pe_and_bias_equals_sequential(first):
  x = rand(0, (2, 10, 7, 4))
  variables = _Pair(first, False).init(jax.random.PRNGKey(1), x)
  np.testing.assert_allclose(np.asarray(_Pair(first, True).apply(variables, x)),
                             np.asarray(_Pair(first, False).apply(variables, x)), atol=2e-5, rtol=0)
