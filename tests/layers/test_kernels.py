"""Every kernel path of ``layers/kernels.py`` computes XLA's convolution: values and gradients.

The reference is ``lax.conv_general_dilated`` at HIGHEST precision (``kernels.conv_reference``);
cases cover odd and non-square maps, stride 2, dilation, asymmetric padding, channel
multipliers, 1x1 and 7x7 kernels.
"""
from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilevis_jax.layers import Conv2d, kernels
from mobilevis_jax.layers.macs import counting

TOL = dict(rtol=1e-5, atol=1e-5)

# (H, W, C, kernel, stride, dilation, padding, channel multiplier)
DEPTHWISE_CASES = [
    (9, 7, 6, 3, 1, 1, ((1, 1), (1, 1)), 1),   # odd, non-square
    (8, 10, 5, 3, 2, 1, ((1, 1), (1, 1)), 1),  # stride 2 on even sizes
    (7, 9, 4, 3, 2, 1, ((0, 0), (0, 0)), 1),   # stride 2 on odd sizes, VALID
    (11, 9, 3, 5, 2, 2, ((4, 3), (0, 2)), 2),  # dilation, asymmetric pads, multiplier 2
    (6, 5, 8, 1, 1, 1, ((0, 0), (0, 0)), 1),   # 1x1 (RepVGGDW's branch)
    (9, 9, 4, 7, 1, 1, ((3, 3), (3, 3)), 1),   # ConvNeXt's 7x7
]


def _rand(key, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.PRNGKey(key), shape)


def _value_and_grads(fn, args, cot):
  # One jitted program per path: eager dispatch of every primitive is far slower to run here.
  argnums = tuple(range(len(args)))
  return jax.jit(lambda *a: (fn(*a), jax.grad(lambda *b: jnp.vdot(fn(*b), cot), argnums)(*a)))(
      *args)


def _check_paths(fn_for_impl, impls, reference, args):
  """Values and gradients (w.r.t. every argument) of each path against ``reference``."""
  cot = _rand(99, jax.eval_shape(reference, *args).shape)
  want, want_grads = _value_and_grads(reference, args, cot)
  for impl in impls:
    got, grads = _value_and_grads(fn_for_impl(impl), args, cot)
    np.testing.assert_allclose(got, want, **TOL, err_msg=impl)
    for g, w in zip(grads, want_grads):
      np.testing.assert_allclose(g, w, **TOL, err_msg=f"{impl} gradient")


@pytest.mark.parametrize("h,w,c,k,s,d,pad,mult", DEPTHWISE_CASES)
def test_depthwise_paths(h, w, c, k, s, d, pad, mult):
  x = _rand(0, (2, h, w, c))
  kern = _rand(1, (k, k, 1, c * mult), 1.0 / k)
  ref = lambda x, kern: kernels.conv_reference(x, kern, s, pad, d, groups=c)
  _check_paths(lambda impl: lambda x, kern: kernels.depthwise_conv2d(x, kern, s, pad, d, impl=impl),
               kernels.IMPLS["depthwise"], ref, (x, kern))


@pytest.mark.parametrize("h,w,cin,cout,g,k,s,pad", [
    (9, 7, 6, 9, 3, 3, 2, ((1, 1), (1, 1))),
    (8, 5, 8, 4, 2, 1, 1, ((0, 0), (0, 0))),
    (7, 8, 12, 12, 4, 3, 1, ((2, 0), (1, 1))),
])
def test_grouped_paths(h, w, cin, cout, g, k, s, pad):
  x = _rand(0, (2, h, w, cin))
  kern = _rand(1, (k, k, cin // g, cout), 1.0 / k)
  ref = lambda x, kern: kernels.conv_reference(x, kern, s, pad, 1, groups=g)
  _check_paths(lambda impl: lambda x, kern: kernels.grouped_conv2d(x, kern, g, s, pad, impl=impl),
               kernels.IMPLS["grouped"], ref, (x, kern))


@pytest.mark.parametrize("h,w,cin,cout,g,k,s,d", [
    (9, 7, 6, 8, 2, 1, 2, 1),    # grouped 1x1, stride 2 (the batched GEMM path)
    (9, 7, 4, 8, 4, 3, 2, 2),    # depthwise, multiplier 2, stride 2, dilation 2
    (9, 8, 3, 6, 1, 3, 2, 1),    # dense 3x3 (ParameterNet's stem)
])
def test_dynamic_paths(h, w, cin, cout, g, k, s, d):
  b = 3
  x = _rand(0, (b, h, w, cin))
  kern = _rand(1, (b, k, k, cin // g, cout), 1.0 / k)
  p = d * (k - 1) // 2
  pad = ((p, p), (p, p))

  def ref(x, kern):
    return jnp.concatenate([kernels.conv_reference(x[i:i + 1], kern[i], s, pad, d, groups=g)
                            for i in range(b)])

  op = "dynamic_1x1" if k == 1 else "dynamic_kxk"
  _check_paths(lambda impl: lambda x, kern: kernels.dynamic_conv2d(x, kern, s, pad, d, g, impl=impl),
               kernels.IMPLS[op], ref, (x, kern))


@pytest.mark.parametrize("h,w,cin,cout,s", [
    (9, 7, 6, 10, 1),   # odd, non-square
    (8, 10, 5, 3, 2),   # stride 2 on even sizes
    (7, 9, 4, 8, 2),    # stride 2 on odd sizes
    (5, 5, 16, 1, 3),   # stride 3, one output channel
])
def test_pointwise_paths(h, w, cin, cout, s):
  x = _rand(0, (2, h, w, cin))
  kern = _rand(1, (1, 1, cin, cout), cin ** -0.5)
  ref = lambda x, kern: kernels.conv_reference(x, kern, s, ((0, 0), (0, 0)), 1)
  _check_paths(lambda impl: lambda x, kern: kernels.pointwise_conv2d(x, kern, s, impl=impl),
               kernels.IMPLS["pointwise"], ref, (x, kern))
  # The drop-in routes an unpadded 1x1 dense conv here; a padded one stays with lax.
  with kernels.recording() as record:
    kernels.conv_general_dilated(x, kern, (s, s), ((0, 0), (0, 0)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    kernels.conv_general_dilated(x, kern, (s, s), ((1, 1), (0, 0)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert [c.op for c in record] == ["pointwise"]


def test_pointwise_rejects_bad_input():
  with pytest.raises(ValueError, match=r"\(1, 1, Cin, Cout\) kernel with Cin=4"):
    kernels.pointwise_conv2d(jnp.zeros((1, 5, 5, 4)), jnp.zeros((1, 1, 3, 8)))
  with pytest.raises(ValueError, match="strides must be >= 1"):
    kernels.pointwise_conv2d(jnp.zeros((1, 5, 5, 4)), jnp.zeros((1, 1, 4, 8)), 0)
  with pytest.raises(ValueError, match="pointwise implementation must be one of"):
    kernels.pointwise_conv2d(jnp.zeros((1, 5, 5, 4)), jnp.zeros((1, 1, 4, 8)), impl="shift")


def test_conv_module_is_an_nn_conv_with_the_same_parameters_and_macs():
  x = _rand(0, (2, 9, 7, 6))
  layer = Conv2d(12, 3, 2, groups=6)
  plain = nn.Conv(12, (3, 3), (2, 2), padding=((1, 1), (1, 1)), feature_group_count=6)
  assert isinstance(layer, nn.Conv) and isinstance(layer, kernels.Conv)
  variables = layer.init(jax.random.PRNGKey(0), x)
  plain_vars = plain.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, plain_vars)
  np.testing.assert_allclose(layer.apply(variables, x), plain.apply(variables, x), **TOL)
  with counting() as got:
    layer.apply(variables, x)
  with counting() as want:
    plain.apply(variables, x)
  assert got == want and got["conv"] == 2 * 5 * 4 * 12 * 9


def test_each_conv_module_path_agrees():
  x = _rand(0, (2, 9, 7, 6))
  for groups, impls in ((6, kernels.IMPLS["depthwise"]), (2, kernels.IMPLS["grouped"])):
    outs = {}
    for impl in impls:
      layer = kernels.Conv(6, (3, 3), (2, 2), padding=((1, 1), (1, 1)),
                           feature_group_count=groups, impl=impl)
      variables = layer.init(jax.random.PRNGKey(0), x)
      with kernels.recording() as record:
        outs[impl] = layer.apply(variables, x)
      assert [c.impl for c in record] == [impl]
    a, b = outs.values()
    np.testing.assert_allclose(a, b, **TOL)


def test_resolution_order_and_errors(monkeypatch):
  backend = jax.default_backend()
  table = kernels.KERNEL_TABLE["depthwise"].get(backend, "xla")
  other = "xla" if table == "shift" else "shift"
  assert kernels.resolve("depthwise") == table
  try:
    kernels.set_default("depthwise", other)
    assert kernels.resolve("depthwise") == other
    with kernels.use(depthwise=table):
      assert kernels.resolve("depthwise") == table           # context beats global
      assert kernels.resolve("depthwise", other) == other   # per-call beats context
  finally:
    kernels.set_default("depthwise", None)
  assert kernels.resolve("depthwise") == table
  # An unmeasured backend falls back to XLA's library path.
  monkeypatch.setattr(jax, "default_backend", lambda: "some_new_chip")
  assert kernels.resolve("depthwise") == "xla"
  with pytest.raises(ValueError, match="depthwise implementation"):
    kernels.resolve("depthwise", "fft")
  with pytest.raises(ValueError, match="unknown kernel op"):
    with kernels.use(transposed="xla"):
      pass
  with pytest.raises(ValueError, match="Conv impl"):
    kernels.Conv(4, (3, 3), impl="magic")
  with pytest.raises(ValueError, match="depthwise kernel"):
    kernels.depthwise_conv2d(jnp.zeros((1, 5, 5, 4)), jnp.zeros((3, 3, 2, 4)))
  with pytest.raises(ValueError, match="explicit"):
    kernels.depthwise_conv2d(jnp.zeros((1, 5, 5, 4)), jnp.zeros((3, 3, 1, 4)), padding="SAME")


def test_dense_and_foreign_layouts_go_to_lax_unchanged():
  x = _rand(0, (1, 6, 5, 4))
  dense = _rand(1, (3, 3, 4, 6))
  with kernels.recording() as record:
    y = kernels.conv_general_dilated(x, dense, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    nchw = kernels.conv_general_dilated(x.transpose(0, 3, 1, 2), _rand(2, (4, 1, 3, 3)), (1, 1),
                                        ((1, 1), (1, 1)), feature_group_count=4)
  assert record == []  # neither was routed
  np.testing.assert_allclose(y, kernels.conv_reference(x, dense, 1, ((1, 1), (1, 1))), **TOL)
  assert nchw.shape == (1, 4, 6, 5)


def test_kernel_report_names_the_layer_and_logs(caplog):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = Conv2d(8, 1, name="pw")(x)
      return Conv2d(8, 3, groups=8, name="dw")(x)

  with caplog.at_level(logging.DEBUG, logger="mobilevis_jax.kernels"):
    report = kernels.kernel_report(Net(), (1, 8, 8, 3))
  assert [(c.module, c.op) for c in report] == [("pw", "pointwise"), ("dw", "depthwise")]
  assert [c.impl for c in report] == [kernels.resolve("pointwise"), kernels.resolve("depthwise")]
  assert kernels.summarize(report) == {f"pointwise:{report[0].impl}": 1,
                                       f"depthwise:{report[1].impl}": 1}
  assert any("dw depthwise" in r.getMessage() for r in caplog.records)
  with kernels.use(depthwise="xla", pointwise="xla"):
    assert [c.impl for c in kernels.kernel_report(Net(), (1, 8, 8, 3))] == ["xla", "xla"]


def test_shift_taps_read_a_materialised_input():
  """The shift path's taps read the padded input through an optimization barrier.

  Without it XLA fuses each tap into the producer of the input and recomputes that producer per
  tap, down a residual stack (experiments/bench/bench_tap_barrier.py: fused RepViT-M1.0 at batch 1
  2.5x slower, 3.8x longer to compile). The barrier changes no value or gradient: the paths agree
  above; here the program of two residual depthwise blocks is checked for it, and its gradient
  against XLA's grouped convolution.
  """
  x = jax.random.normal(jax.random.key(0), (2, 9, 7, 6))
  w = jax.random.normal(jax.random.key(1), (2, 3, 3, 1, 6))

  def two_blocks(x, w, impl):
    for i in range(2):
      x = x + jax.nn.gelu(kernels.depthwise_conv2d(x, w[i], 1, ((1, 1), (1, 1)), impl=impl))
    return (x ** 2).sum()

  jaxpr = str(jax.make_jaxpr(lambda x, w: two_blocks(x, w, 'shift'))(x, w))
  assert jaxpr.count('optimization_barrier') == 2
  g_shift = jax.grad(two_blocks, (0, 1))(x, w, 'shift')
  g_xla = jax.grad(two_blocks, (0, 1))(x, w, 'xla')
  for a, b in zip(g_shift, g_xla):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# (H, W, C, padding, stride of the conv that reads the padded map)
SHARED_PAD_CASES = [
    (9, 7, 6, ((1, 1), (1, 1)), 1),   # RepVGGDW's 3x3, odd non-square map
    (8, 10, 5, ((1, 1), (1, 1)), 2),  # stride 2 on even sizes
    (7, 9, 4, ((2, 0), (0, 1)), 1),   # asymmetric pads
]


@pytest.mark.parametrize("h,w,c,pad,s", SHARED_PAD_CASES)
def test_shared_pad_feeds_a_depthwise_block_like_its_input(h, w, c, pad, s):
  """``dw(padded) + dw1x1(centre) + centre`` equals the block on ``x``: values and gradients.

  Every path (``impl`` of shared_pad and of the convolutions), against XLA's convolutions of ``x``
  with the padding; the identity and 1x1 terms only where the conv keeps the map size.
  """
  (pt, pb), (pl, pr) = pad
  kh, kw = pt + pb + 1, pl + pr + 1
  x = _rand(0, (2, h, w, c))
  w3 = _rand(1, (kh, kw, 1, c), 1.0 / kh)
  w1 = _rand(2, (1, 1, 1, c))

  def ref(x, w3, w1):
    y = kernels.conv_reference(x, w3, s, pad, groups=c)
    return y + kernels.conv_reference(x, w1, groups=c) + x if s == 1 else y

  def block(impl):
    def fn(x, w3, w1):
      xp, xc = kernels.shared_pad(x, pad, impl=impl)
      assert xp.shape == (2, h + pt + pb, w + pl + pr, c) and xc.shape == x.shape
      y = kernels.depthwise_conv2d(xp, w3, s, impl=impl)
      return y + kernels.depthwise_conv2d(xc, w1, impl=impl) + xc if s == 1 else y
    return fn

  _check_paths(block, kernels.IMPLS["depthwise"], ref, (x, w3, w1))


def test_shared_pad_keeps_a_residual_stack_from_being_recomputed():
  """On the shift path the block input's only consumer is the barrier on its padded map.

  Before ``shared_pad`` the identity and 1x1 branches of RepViT's token mixer read the block input
  directly and XLA recomputed the residual stack before each block inside it: the compiled
  forward's tap slices grew with the square of the depth (unfused RepViT-M1.1: 4536 against the
  fused model's 954; experiments/bench/bench_shared_pad.py). Here they must grow linearly.
  """
  def stack(x, w3, w1):
    for i in range(w3.shape[0]):
      xp, xc = kernels.shared_pad(x, ((1, 1), (1, 1)), impl="shift")
      y = (kernels.depthwise_conv2d(xp, w3[i], impl="shift")
           + kernels.depthwise_conv2d(xc, w1[i], impl="shift") + xc)
      x = y + jnp.tanh(y)  # the residual branch: elementwise, fused with its input
    return x

  def slices(n):
    args = (jnp.ones((1, 9, 7, 4)), jnp.ones((n, 3, 3, 1, 4)), jnp.ones((n, 1, 1, 1, 4)))
    jaxpr = jax.make_jaxpr(stack)(*args)
    assert str(jaxpr).count("optimization_barrier") == 3 * n  # shared map, 3x3 and 1x1 taps
    return jax.jit(stack).lower(*args).compile().as_text().count(" slice(")

  three, six = slices(3), slices(6)
  assert 0 < six <= 2 * three, (three, six)


def test_shared_pad_rejects_bad_input():
  with pytest.raises(ValueError, match="NHWC"):
    kernels.shared_pad(jnp.ones((4, 4, 3)), ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match="padding"):
    kernels.shared_pad(jnp.ones((1, 4, 4, 3)), ((1, -1), (1, 1)))
  with pytest.raises(ValueError, match="padding"):
    kernels.shared_pad(jnp.ones((1, 4, 4, 3)), ((1, 1),))
