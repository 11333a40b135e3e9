"""DynamicConv: both execution strategies against an independent per-expert reference, gradients,
the official routing and the paper's, PyTorch CondConv parity, parameter and MAC accounting."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mobilevis_jax.layers.conv import explicit_padding
from mobilevis_jax.layers.dynamic_conv import (
    STRATEGIES,
    DynamicConv,
    mix_kernels,
    static_param_count,
)
from mobilevis_jax.profiling import count_params, profile

# (cin, cout, kernel, stride, groups, padding, dilation): dense, grouped, depthwise, stride 2,
# explicit asymmetric padding, dilation.
CASES = [
    (6, 10, 3, 1, 1, None, 1),
    (6, 9, 3, 2, 3, None, 1),
    (8, 8, 5, 2, 8, None, 1),
    (4, 6, 3, 1, 2, ((0, 2), (1, 0)), 1),
    (5, 7, 1, 1, 1, 0, 1),
    (4, 4, 3, 1, 4, None, 2),
]


def _inputs(cin, seed=0, batch=3, hw=(9, 8)):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, *hw, cin), jnp.float32)


def _expert_sum_reference(variables, x, cout, k, stride, groups, padding, dilation, routing):
  """sum_e r[b, e] * conv(x[b], W_e), each expert a static conv: linear in the kernel, so it must
  equal convolving with the mixed kernel, and shares no code with the layer's mixing/strategies."""
  p = variables["params"]
  pooled = x.mean(axis=(1, 2))
  if routing == "sigmoid":
    r = jax.nn.sigmoid(pooled @ p["routing"]["kernel"] + p["routing"]["bias"])
  else:
    h = jax.nn.relu(pooled @ p["routing_reduce"]["kernel"] + p["routing_reduce"]["bias"])
    r = jax.nn.softmax(h @ p["routing"]["kernel"] + p["routing"]["bias"], axis=-1)
  cin = x.shape[-1]
  out = 0.0
  for e in range(p["experts"].shape[0]):
    w = p["experts"][e].reshape(cout, cin // groups, k, k).transpose(2, 3, 1, 0)
    y = jax.lax.conv_general_dilated(x, w, (stride, stride), explicit_padding(k, padding, dilation),
                                     rhs_dilation=(dilation, dilation),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=groups,
                                     precision=jax.lax.Precision.HIGHEST)
    out = out + r[:, e, None, None, None] * y
  return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("routing", ["sigmoid", "softmax"])
def test_strategies_match_expert_sum(case, routing):
  cin, cout, k, s, g, pad, dil = case
  x = _inputs(cin)
  outs = {}
  for strategy in STRATEGIES:
    layer = DynamicConv(cout, k, s, pad, dil, g, num_experts=3, routing=routing, strategy=strategy)
    variables = layer.init(jax.random.PRNGKey(1), x)
    outs[strategy] = layer.apply(variables, x)
  ref = _expert_sum_reference(variables, x, cout, k, s, g, pad, dil, routing)
  assert outs["vmap"].shape == ref.shape
  np.testing.assert_allclose(outs["vmap"], outs["grouped"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(outs["vmap"], ref, atol=1e-5, rtol=0)


def test_softmax_routing_is_convex_and_sigmoid_is_not():
  x = _inputs(6)
  for routing, expect_sum_one in (("softmax", True), ("sigmoid", False)):
    layer = DynamicConv(4, 3, num_experts=4, routing=routing)
    variables = layer.init(jax.random.PRNGKey(0), x)
    _, inter = layer.apply(variables, x, capture_intermediates=True,
                           mutable=["intermediates"])
    logits = inter["intermediates"]["routing"]["__call__"][0]
    r = jax.nn.softmax(logits, -1) if routing == "softmax" else jax.nn.sigmoid(logits)
    assert np.allclose(r.sum(-1), 1.0, atol=1e-6) == expect_sum_one
  assert "routing_reduce" in DynamicConv(4, 3, routing="softmax").init(
      jax.random.PRNGKey(0), x)["params"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradients(strategy):
  """Reverse-mode gradients w.r.t. the input and every parameter, against finite differences."""
  x = _inputs(4, batch=2, hw=(5, 5))
  layer = DynamicConv(6, 3, 2, groups=2, num_experts=3, strategy=strategy)
  variables = layer.init(jax.random.PRNGKey(2), x)

  def f(params, x):
    return jnp.sum(jnp.sin(layer.apply({"params": params}, x)))

  check_grads(f, (variables["params"], x), order=1, modes=("rev",), atol=5e-2, rtol=5e-2, eps=1e-2)
  g_v = jax.grad(f)(variables["params"], x)
  other = DynamicConv(6, 3, 2, groups=2, num_experts=3,
                      strategy=[s for s in STRATEGIES if s != strategy][0])
  g_o = jax.grad(lambda p, x: jnp.sum(jnp.sin(other.apply({"params": p}, x))))(
      variables["params"], x)
  for a, b in zip(jax.tree_util.tree_leaves(g_v), jax.tree_util.tree_leaves(g_o)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_expert_bank_layout_and_parameter_count():
  cin, cout, k, g, m = 8, 12, 3, 2, 4
  layer = DynamicConv(cout, k, groups=g, num_experts=m)
  variables = layer.init(jax.random.PRNGKey(0), _inputs(cin))
  p = variables["params"]
  static = static_param_count(cout, cin, k, g)
  assert p["experts"].shape == (m, static)
  assert p["routing"]["kernel"].shape == (cin, m)
  # M experts + the routing Linear: ~M x the static conv, the paper's parameter claim.
  assert count_params(variables) == m * static + cin * m + m
  # PyTorch-default (kaiming_uniform a=sqrt(5)) bound for each expert's own fan-in.
  bound = 1 / math.sqrt(cin // g * k * k)
  assert float(jnp.abs(p["experts"]).max()) <= bound
  assert float(jnp.abs(p["experts"]).max()) > 0.9 * bound


def test_macs_count_mixing_and_routing():
  """MACs as fvcore counts the official code: conv + M*P mixing + routing GAP + routing Linear."""
  import flax.linen as nn

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return DynamicConv(16, 3, 2, num_experts=4, name="dc")(x)

  res = 32
  counts = profile(Tiny(), res)["macs_by_tag"]
  p = 16 * 3 * 3 * 3
  assert counts["dynamic_mixing"] == 4 * p
  assert counts["dynamic_conv"] == 16 * 16 * 16 * 3 * 3 * 3
  assert counts["dynamic_routing_pool"] == res * res * 3
  assert counts["dense"] == 3 * 4


def test_matches_pytorch_condconv():
  torch = pytest.importorskip("torch")
  from mobilevis_jax.torch_models.parameternet import DynamicConv as TorchDynamicConv

  torch.manual_seed(0)
  cin, cout, k, s, g = 6, 9, 3, 2, 3
  ref = TorchDynamicConv(cin, cout, k, s, k // 2, g, num_experts=4).eval()
  x = np.random.RandomState(0).randn(3, cin, 11, 10).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  sd = {k_: v.numpy() for k_, v in ref.state_dict().items()}
  params = {"experts": jnp.asarray(sd["cond_conv.weight"]),  # same [M, P] layout: no transpose
            "routing": {"kernel": jnp.asarray(sd["routing.weight"].T),
                        "bias": jnp.asarray(sd["routing.bias"])}}
  for strategy in STRATEGIES:
    got = DynamicConv(cout, k, s, groups=g, num_experts=4, strategy=strategy).apply(
        {"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(routing="gumbel"), "routing"),
    (dict(strategy="loop"), "strategy"),
    (dict(num_experts=0), "num_experts"),
    (dict(groups=4), "groups"),
])
def test_bad_configuration_raises(kwargs, message):
  with pytest.raises(ValueError, match=message):
    DynamicConv(6, 3, **kwargs).init(jax.random.PRNGKey(0), _inputs(6))


def test_rejects_non_nhwc():
  with pytest.raises(ValueError, match="NHWC"):
    DynamicConv(4, 3).init(jax.random.PRNGKey(0), jnp.ones((2, 8, 3)))


@pytest.mark.parametrize("shape", [(7, 5, 3, 3), (6, 1, 5, 3), (4, 9, 1, 1)])
def test_mix_kernels_is_mixing_then_permuting_bitwise(shape):
  # mix_kernels permutes the bank before the GEMM; the result must be bitwise the mixed OIHW rows
  # permuted afterwards (the same M-term sums), values and bank gradient.
  m, b = 4, 3
  kc, kb = jax.random.split(jax.random.PRNGKey(0))
  coefficients = jax.random.uniform(kc, (b, m))
  bank = jax.random.normal(kb, (m, math.prod(shape)))

  def mix_first(c, w):
    return (c @ w).reshape((b,) + shape).transpose(0, 3, 4, 2, 1)

  got = jax.jit(lambda c, w: mix_kernels(c, w, shape))(coefficients, bank)
  want = jax.jit(mix_first)(coefficients, bank)
  assert got.shape == (b, shape[2], shape[3], shape[1], shape[0])
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  cotangent = jax.random.normal(jax.random.PRNGKey(1), got.shape)
  grads = [jax.jit(jax.grad(lambda c, w, f=f: jnp.sum(f(c, w) * cotangent), argnums=(0, 1)))(
      coefficients, bank) for f in (lambda c, w: mix_kernels(c, w, shape), mix_first)]
  for g, w in zip(grads[0], grads[1]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
