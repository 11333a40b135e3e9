"""Dynamic convolution (ParameterNet / CondConv): a per-sample mixture of M expert kernels.

For every sample ``b`` a router turns the globally pooled input into mixing coefficients
``r[b] in R^M`` and the layer convolves the sample with ``W_b = sum_e r[b, e] * W_e``. Parameters
grow ~M-fold while the extra compute is only the routing and the ``M * P`` mixing per sample,
which is the whole point of ParameterNet (more parameters, almost no extra FLOPs).

Routing (``routing=``):

* ``'sigmoid'`` (default) is what the official ParameterNet code runs (it uses timm's CondConv):
  GAP -> ``Linear(Cin, M)`` -> sigmoid. The coefficients are independent gates and do not sum to 1.
* ``'softmax'`` is the paper's description: GAP -> 2-layer MLP (``routing_reduce`` -> ReLU ->
  ``routing``) -> softmax, so the coefficients form a convex combination.

Parameter layout: the expert bank ``experts`` has shape ``[M, P]`` where each row is one kernel
flattened in PyTorch's OIHW order (``P = Cout * Cin/groups * kh * kw``), exactly
``cond_conv.weight`` of the official checkpoint, so import/export is a plain copy. The bank is
permuted to HWIO inside the forward pass before the mixing (see :func:`mix_kernels`), a transpose
of ``M * P`` numbers, negligible next to the convolution.

Execution strategies (``strategy=``), numerically identical (tests check 1e-5 and gradients);
they are the per-sample paths of :func:`mobilevis_jax.layers.kernels.dynamic_conv2d`:

* ``'vmap'``: ``jax.vmap`` of a single-sample convolution over (sample, mixed kernel) pairs.
* ``'grouped'``: CondConv's trick made explicit: the batch is folded into the channel axis
  (``[1, H, W, B*Cin]``) and one convolution with ``B * groups`` feature groups runs all samples.
* ``'einsum'``: im2col over the taps (none for 1x1) and one per-sample batched GEMM.
* ``'shift'``: for depthwise kernels, per-sample shifted multiply-adds; otherwise ``'einsum'``.
* ``'auto'`` (default): the backend's entry of ``kernels.KERNEL_TABLE`` (``'dynamic_1x1'`` /
  ``'dynamic_kxk'``), overridable with ``kernels.use(dynamic_1x1=...)``.

On CPU the table picks ``'einsum'`` for 1x1 and ``'shift'`` for kxk (numbers in
``experiments/bench/RESULTS.md``). The older comparison of the first two strategies
(``experiments/bench/bench_dynamic_conv.py``, XLA CPU, 2 shared cores, float32, M=4,
ParameterNet-600M layer shapes; time ratio vmap/grouped, < 1 means vmap is faster):

=====================  ========  ==========
layer                  batch 1   batch 128
=====================  ========  ==========
1x1 56x56 44->68       0.96      0.46
1x1 14x14 152->190     0.93      1.49
dw3x3 14x14 190        0.54      1.20
=====================  ========  ==========

Both lose to the batched-GEMM and shifted-tap paths on CPU, because XLA's CPU convolution with
many feature groups is slow (see ``layers/kernels.py``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobilevis_jax.layers.conv import (
    Padding,
    _pair,
    explicit_padding,
    fan_in_uniform,
    torch_default_kernel_init,
)
from mobilevis_jax.layers.kernels import dynamic_conv2d
from mobilevis_jax.layers.macs import add_macs

ROUTINGS = ("sigmoid", "softmax")
STRATEGIES = ("auto", "vmap", "grouped", "einsum", "shift")

def expert_bank_init(kernel_shape_oihw: tuple[int, ...]) -> Callable:
  """Each expert gets PyTorch's default conv init (kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)))
  on its own ``[Cout, Cin/g, kh, kw]`` view, as timm's ``get_condconv_initializer`` does."""
  return fan_in_uniform(math.prod(kernel_shape_oihw[1:]))


def mix_kernels(coefficients: jax.Array, bank: jax.Array, kernel_shape_oihw: tuple[int, ...]
               ) -> jax.Array:
  """``[B, M] @ [M, P]`` -> per-sample HWIO kernels ``[B, kh, kw, Cin/g, Cout]``.

  The bank is permuted to HWIO *before* the mixing, so the transpose (and, in the backward pass,
  its transpose) touches the ``M * P`` bank once rather than the ``B * P`` mixed kernels: at batch
  128 with M=4 that is 32x fewer numbers moved, and the mixed kernels come out of the GEMM already
  in the layout the convolution reads. Each output number is the same M-term sum in the same
  order, so the values are bitwise those of mixing first (tests check it).
  """
  m = bank.shape[0]
  o, i, kh, kw = kernel_shape_oihw
  bank_hwio = bank.reshape(m, o, i, kh, kw).transpose(0, 3, 4, 2, 1).reshape(m, -1)
  flat = coefficients @ bank_hwio.astype(coefficients.dtype)
  return flat.reshape(coefficients.shape[0], kh, kw, i, o)


def conv_per_sample_vmap(x: jax.Array, kernels: jax.Array, strides: tuple[int, int],
                         padding: Sequence[tuple[int, int]], dilation: tuple[int, int],
                         groups: int) -> jax.Array:
  """``y[b] = conv(x[b], kernels[b])`` written as a vmap over the batch."""
  return dynamic_conv2d(x, kernels, strides, padding, dilation, groups, impl="vmap")


def conv_per_sample_grouped(x: jax.Array, kernels: jax.Array, strides: tuple[int, int],
                            padding: Sequence[tuple[int, int]], dilation: tuple[int, int],
                            groups: int) -> jax.Array:
  """The same as :func:`conv_per_sample_vmap` by one convolution with ``B * groups`` groups
  (channels laid out sample-major, ``b * Cin + c``)."""
  return dynamic_conv2d(x, kernels, strides, padding, dilation, groups, impl="grouped")


class DynamicConv(nn.Module):
  """Convolution whose kernel is a per-sample mixture of ``num_experts`` expert kernels.

  Submodules/params: ``routing`` (Dense Cin -> M, with bias; for ``routing='softmax'`` preceded by
  ``routing_reduce``, Dense Cin -> ``routing_hidden``) and ``experts`` ``[M, P]`` (OIHW rows).
  No bias: in every model using it a BatchNorm follows, as in the official code.
  """
  features: int
  kernel_size: int | tuple[int, int] = 1
  strides: int | tuple[int, int] = 1
  padding: Padding | None = None
  dilation: int | tuple[int, int] = 1
  groups: int = 1
  num_experts: int = 4
  routing: str = "sigmoid"
  routing_hidden: int | None = None
  strategy: str = "auto"

  def _check(self, cin: int) -> None:
    if self.routing not in ROUTINGS:
      raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
    if self.strategy not in STRATEGIES:
      raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
    if self.num_experts < 1:
      raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
    if cin % self.groups or self.features % self.groups:
      raise ValueError(f"groups={self.groups} must divide both input channels ({cin}) and "
                       f"features ({self.features})")

  @staticmethod
  def _dense(features: int, fan_in: int, name: str) -> nn.Dense:
    # PyTorch nn.Linear init, so a freshly initialised model routes like the official one (r~0.5).
    return nn.Dense(features, kernel_init=torch_default_kernel_init,
                    bias_init=fan_in_uniform(fan_in), name=name)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"DynamicConv expects NHWC input, got shape {x.shape}")
    b, h, w, cin = x.shape
    self._check(cin)
    kh, kw = _pair(self.kernel_size)
    kernel_shape = (self.features, cin // self.groups, kh, kw)
    bank = self.param("experts", expert_bank_init(kernel_shape),
                      (self.num_experts, math.prod(kernel_shape)), jnp.float32)

    pooled = jnp.mean(x, axis=(1, 2))
    add_macs(b * h * w * cin, "dynamic_routing_pool")
    if self.routing == "sigmoid":
      coefficients = jax.nn.sigmoid(self._dense(self.num_experts, cin, "routing")(pooled))
    else:
      hidden = self.routing_hidden or max(cin // 4, self.num_experts)
      z = jax.nn.relu(self._dense(hidden, cin, "routing_reduce")(pooled))
      coefficients = jax.nn.softmax(self._dense(self.num_experts, hidden, "routing")(z), axis=-1)

    kernels = mix_kernels(coefficients, bank, kernel_shape)
    add_macs(b * self.num_experts * math.prod(kernel_shape), "dynamic_mixing")

    strides = _pair(self.strides)
    padding = explicit_padding((kh, kw), self.padding, self.dilation)
    y = dynamic_conv2d(x, kernels.astype(x.dtype), strides, padding, _pair(self.dilation),
                       self.groups, impl=None if self.strategy == "auto" else self.strategy)
    add_macs(y.size * (cin // self.groups) * kh * kw, "dynamic_conv")
    return y


def static_param_count(features: int, in_channels: int, kernel_size: int | Sequence[int],
                       groups: int = 1) -> int:
  """Parameters of the static conv a DynamicConv replaces (for the ``~M x`` claim)."""
  kh, kw = _pair(kernel_size)
  return features * (in_channels // groups) * kh * kw
