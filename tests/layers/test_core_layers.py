"""The shared layers against PyTorch's definitions (and the re-param algebra against brute
force)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilevis_jax import layers
from mobilevis_jax.layers import reparam

torch = pytest.importorskip("torch")


def _apply(module, x, train, **kw):
  v = module.init(jax.random.PRNGKey(0), x, train)
  return module.apply(v, x, train, mutable=["batch_stats"] if train else False, **kw), v


def test_batchnorm_matches_torch_train_and_eval():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, (4, 5, 6, 7)).astype(np.float32)
  bn = layers.BatchNorm()
  (y, upd), _ = _apply(bn, jnp.asarray(x), True)
  tbn = torch.nn.BatchNorm2d(7).train()
  ty = tbn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
  np.testing.assert_allclose(np.asarray(y), ty, atol=1e-5)
  # Running variance uses the unbiased batch variance, as in PyTorch.
  np.testing.assert_allclose(upd["batch_stats"]["var"], tbn.running_var.numpy(), rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], tbn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  tbn.eval()
  v = {"params": {"scale": jnp.ones(7), "bias": jnp.zeros(7)}, "batch_stats": upd["batch_stats"]}
  y_eval = bn.apply(v, jnp.asarray(x), False)
  ty_eval = tbn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
  np.testing.assert_allclose(np.asarray(y_eval), ty_eval, atol=1e-5)


def test_batchnorm_1d_on_vectors():
  x = np.random.default_rng(1).normal(size=(8, 5)).astype(np.float32)
  (y, _), _ = _apply(layers.BatchNorm(), jnp.asarray(x), True)
  ty = torch.nn.BatchNorm1d(5).train()(torch.from_numpy(x)).detach().numpy()
  np.testing.assert_allclose(np.asarray(y), ty, atol=1e-5)


def test_sync_batch_stats_averages_over_devices():
  """Under shard_map with sync BN, per-device batches normalise with the global statistics."""
  from jax.sharding import Mesh
  from jax.sharding import PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(6, 3, 3, 4)).astype(np.float32))
  bn = layers.BatchNorm()
  v = bn.init(jax.random.PRNGKey(0), x, False)

  def step(x):
    with layers.sync_batch_stats("data"):
      return bn.apply(v, x, True, mutable=["batch_stats"])[0]

  y_sync = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(x)
  y_plain = bn.apply(v, x, True, mutable=["batch_stats"])[0]
  np.testing.assert_allclose(y_sync, y_plain, atol=1e-6)


@pytest.mark.parametrize("stride,size,groups", [(1, 7, 1), (2, 8, 1), (2, 9, 4), (2, 8, 8)])
def test_conv2d_padding_matches_torch(stride, size, groups):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, size, size, 8)).astype(np.float32)
  conv = layers.Conv2d(16, 3, stride, groups=groups)
  v = conv.init(jax.random.PRNGKey(0), jnp.asarray(x))
  y = conv.apply(v, jnp.asarray(x))
  tconv = torch.nn.Conv2d(8, 16, 3, stride, padding=1, groups=groups)
  with torch.no_grad():
    tconv.weight.copy_(torch.from_numpy(np.asarray(v["params"]["kernel"]).transpose(3, 2, 0, 1)))
    tconv.bias.copy_(torch.from_numpy(np.asarray(v["params"]["bias"])))
  ty = tconv(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
  np.testing.assert_allclose(np.asarray(y), ty, atol=1e-5)


def test_string_padding_is_refused():
  with pytest.raises(ValueError, match="explicit"):
    layers.explicit_padding(3, "SAME")


def test_activations_match_torch():
  x = np.linspace(-6, 6, 101).astype(np.float32)
  t = torch.from_numpy(x)
  np.testing.assert_allclose(layers.gelu(x), torch.nn.functional.gelu(t).numpy(), atol=1e-6)
  np.testing.assert_allclose(layers.hard_sigmoid(x), torch.nn.functional.hardsigmoid(t).numpy(), atol=1e-6)
  np.testing.assert_allclose(layers.hard_swish(x), torch.nn.functional.hardswish(t).numpy(), atol=1e-6)
  # The tanh approximation would be off by ~1e-3: make sure we are not using it.
  assert np.max(np.abs(layers.gelu(x) - jax.nn.gelu(x, approximate=True))) > 1e-4


def test_drop_path_keeps_expected_fraction_and_scales():
  dp = layers.DropPath(0.25)
  x = jnp.ones((4000, 2, 2, 3))
  y = dp.apply({}, x, True, rngs={"dropout": jax.random.PRNGKey(0)})
  kept = np.asarray(y[:, 0, 0, 0] > 0)
  assert abs(kept.mean() - 0.75) < 0.03
  np.testing.assert_allclose(np.asarray(y[kept]), 1 / 0.75, rtol=1e-6)
  assert (dp.apply({}, x, False) == x).all()


def _conv(x, k, b=None, groups=1):
  y = jax.lax.conv_general_dilated(x, k, (1, 1), ((k.shape[0] // 2,) * 2, (k.shape[1] // 2,) * 2),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
  return y if b is None else y + b


def _bn(x, p, s, eps=1e-5):
  return (x - s["mean"]) / jnp.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


def test_reparam_algebra_equals_brute_force():
  rng = np.random.default_rng(4)
  c = 6
  x = jnp.asarray(rng.normal(size=(2, 9, 9, c)).astype(np.float32))
  k3 = jnp.asarray(rng.normal(size=(3, 3, 1, c)).astype(np.float32))
  k1 = jnp.asarray(rng.normal(size=(1, 1, 1, c)).astype(np.float32))
  b1 = jnp.asarray(rng.normal(size=(c,)).astype(np.float32))
  p = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32), "bias": jnp.asarray(rng.normal(size=c), jnp.float32)}
  s = {"mean": jnp.asarray(rng.normal(size=c), jnp.float32), "var": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32)}
  # BN(conv3(x)) + conv1(x) + x as one 3x3 depthwise conv.
  ref = _bn(_conv(x, k3, groups=c), p, s) + _conv(x, k1, b1, groups=c) + x
  kf, bf = reparam.fuse_conv_bn(k3, None, p, s)
  kf = kf + reparam.pad_kernel(k1, 3) + reparam.identity_kernel(c, 3, depthwise=True)
  bf = bf + b1
  np.testing.assert_allclose(_conv(x, kf, bf, groups=c), ref, atol=1e-5)
  # Dense identity kernel.
  np.testing.assert_allclose(_conv(x, reparam.identity_kernel(c, 3, depthwise=False)), x, atol=1e-6)
  # BN1d before a Linear, and averaged heads.
  v = jnp.asarray(rng.normal(size=(5, c)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(c, 4)).astype(np.float32))
  wb = jnp.asarray(rng.normal(size=4).astype(np.float32))
  wl, bl = reparam.fuse_bn_linear(p, s, w, wb)
  np.testing.assert_allclose(v @ wl + bl, _bn(v, p, s) @ w + wb, atol=1e-5)
  w2, b2 = w * 2 - 1, wb + 3
  wa, ba = reparam.average_heads(w, wb, w2, b2)
  np.testing.assert_allclose(v @ wa + ba, ((v @ w + wb) + (v @ w2 + b2)) / 2, atol=1e-5)
  with pytest.raises(ValueError):
    reparam.pad_kernel(k3, 4)
