"""Train mode equals the official train mode, for every family (issue #10, part 4).

For one small variant per family (and GhostNet-1.0 in timm's layout), the same random weights
and random BN statistics go into the JAX model (through the interop import) and the PyTorch
reference; one train-mode step (dropout and drop path off, BN on batch statistics, the sum of the
heads' cross-entropies on fixed labels) is compared: outputs, the gradient of every parameter,
and the BN running statistics after the step. The yardstick is the float64 PyTorch step: the JAX
float32 step must be as close to it as PyTorch's own float32 step, within 3x per statistic (see
``tests/fidelity.py`` for why a fixed tolerance cannot work here).
"""
from __future__ import annotations

import numpy as np
import pytest

from mobilevis_jax import create_model, interop
from tests import fidelity

RESOLUTION, BATCH = 64, 4
# ParC-MobileNetV2 at batch 4 normalises its last stages over 4 x 2 x 2 = 16 values per channel,
# so ill-conditioned that float32 rounding moves the gradients by 0.5% (PyTorch, whose CPU
# BatchNorm accumulates in float64) to 2.8% (XLA, float32 sums): how that ratio falls depends on
# the CPU's summation order (within 3x on the last CI machine, 5.5x on an AVX-512/AMX
# Xeon, the same code). At batch 8 the comparison measures the port again, not the rounding luck.
BATCHES = {"parc_mobilenetv2": 8}


def _repvit(torch):
  from mobilevis_jax.torch_models.repvit import RepViT
  from tests.helpers import randomize_repvit_
  ref = randomize_repvit_(RepViT("repvit_m0_6", distillation=True), seed=3, resolution=RESOLUTION)
  return ref, "official", dict(distillation=True), {}


def _mobilevig(torch):
  from mobilevis_jax.torch_models.mobilevig import build
  from tests.helpers import randomize_mobilevig_
  return randomize_mobilevig_(build("mobilevig_ti", drop_path=0.0), seed=3), "official", {}, dict(
      drop_path_rate=0.0)


def _parameternet(torch):
  from mobilevis_jax.torch_models.parameternet import parameternet_300m
  from tests.helpers import randomize_bn_
  return randomize_bn_(parameternet_300m(), seed=3), "official", {}, dict(drop_rate=0.0)


def _ghostnet_timm(torch):
  import timm

  from tests.helpers import randomize_bn_
  return randomize_bn_(timm.create_model("ghostnet_100"), seed=3), "timm", {}, dict(drop_rate=0.0)


def _parcnet(torch):
  from mobilevis_jax.torch_models.parcnet import ParCNetRef
  from tests.helpers import randomize_bn_
  ref = ParCNetRef("xs")
  randomize_bn_(ref, seed=3)
  return ref, "official", {}, dict(drop_rate=0.0, ffn_dropout=0.0)


def _parc_convnets(torch):
  from mobilevis_jax.torch_models import parc_convnets as refs
  ref = refs.parc_mobilenetv2(resample=True)
  from tests.helpers import randomize_bn_
  randomize_bn_(ref, torch.Generator().manual_seed(3))
  return ref, "official", {}, dict(dropout=0.0)


# name -> builder returning (torch reference, interop layout, model kwargs shared by both sides'
# weight layout, JAX-only kwargs that switch dropout / drop path off).
CASES = {
    "repvit_m0_6": _repvit,
    "mobilevig_ti": _mobilevig,
    "parameternet_300m": _parameternet,
    "ghostnet_100": _ghostnet_timm,
    "parcnet_xs": _parcnet,
    "parc_mobilenetv2": _parc_convnets,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_train_step_matches_official_train_mode(name):
  torch = pytest.importorskip("torch")
  if name == "ghostnet_100":
    pytest.importorskip("timm")
  torch.manual_seed(0)
  ref, layout, shared_kw, jax_kw = CASES[name](torch)
  batch = BATCHES.get(name, BATCH)
  rs = np.random.RandomState(1)
  x = rs.uniform(-2, 2, (batch, RESOLUTION, RESOLUTION, 3)).astype(np.float32)
  labels = rs.randint(0, 1000, batch).astype(np.int32)
  variables = interop.from_torch_state_dict(name, ref.state_dict(), layout=layout, **shared_kw)

  torch64 = fidelity.torch_train_step(ref, x, labels, torch.float64)
  torch32 = fidelity.torch_train_step(ref, x, labels, torch.float32)
  step = fidelity.make_jax_train_step(create_model(name, **shared_kw, **jax_kw))
  ours = fidelity.jax_train_step(step, name, variables, x, labels, ref, layout=layout, **shared_kw)

  assert len(ours.outputs) == len(torch64.outputs)  # both heads of the distilled models
  # The step really is a train-mode step: the running statistics moved.
  before = {k: b.detach().double().numpy() for k, b in ref.named_buffers() if k in ours.stats}
  assert max(float(np.abs(ours.stats[k] - before[k]).max()) for k in before) > 1e-3
  fidelity.assert_as_close_as_torch(ours, torch32, torch64, factor=3.0)


@pytest.mark.parametrize("shift", [0.0, 10.0, 100.0])
def test_batchnorm_train_mode_is_as_accurate_as_torch(shift):
  """The root cause of the ghostnet_100 / parcnet_xs gaps, reduced to one BN layer: batch
  statistics of features whose mean dwarfs their spread (pooled features feeding ParC-Net's
  channel-attention BN, post-ReLU maps in GhostNet). The one-pass E[x^2] - E[x]^2 variance lost
  ~|mean|^2/var of float32's precision in the output, the input gradient and the running
  variance (shift 100: output 2.5e-2, gradient 7.8e-3 relative, where PyTorch float32 is 2.4e-5
  and 9.9e-6 away from float64); the two-pass variance is as accurate as PyTorch's."""
  torch = pytest.importorskip("torch")
  import jax
  import jax.numpy as jnp

  from mobilevis_jax.layers import BatchNorm
  rs = np.random.RandomState(0)
  x = (shift + rs.randn(4, 1, 1, 64)).astype(np.float32)
  w = rs.randn(4, 1, 1, 64).astype(np.float32)
  bn = BatchNorm()
  v = bn.init(jax.random.PRNGKey(0), x, train=False)

  def loss(x):
    y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    return jnp.sum(y * w), (y, upd["batch_stats"]["var"])

  (_, (y, var)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)

  def torch_bn(dtype):
    m = torch.nn.BatchNorm2d(64).to(dtype).train()
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2)).to(dtype).requires_grad_()
    yt = m(xt)
    (yt * torch.from_numpy(w.transpose(0, 3, 1, 2)).to(dtype)).sum().backward()
    return (yt.detach().double().numpy().transpose(0, 2, 3, 1),
            xt.grad.double().numpy().transpose(0, 2, 3, 1), m.running_var.double().numpy())

  want, t32 = torch_bn(torch.float64), torch_bn(torch.float32)
  ours = (np.asarray(y, np.float64), np.asarray(g, np.float64), np.asarray(var, np.float64))
  for what, a, b, c in zip(("output", "gradient", "running var"), ours, t32, want):
    err, torch_err = np.abs(a - c).max(), np.abs(b - c).max()
    assert err <= 3 * torch_err + 1e-12, f"{what}: {err:.3g} vs PyTorch float32 {torch_err:.3g}"


def test_yardstick_rejects_a_real_difference():
  """The comparison is not vacuous: PyTorch's float32 step passes against itself, and the same
  step with one parameter's gradient off by 0.1% (or with other running statistics) fails."""
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                            torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2, bias=False),
                            torch.nn.BatchNorm2d(8), torch.nn.Flatten(), torch.nn.Linear(8 * 49, 10))
  rs = np.random.RandomState(0)
  x = rs.randn(4, 16, 16, 3).astype(np.float32)
  labels = np.arange(4)
  t64 = fidelity.torch_train_step(net, x, labels, torch.float64)
  t32 = fidelity.torch_train_step(net, x, labels, torch.float32)
  assert fidelity.vanishing_gradients(t64) == {"0.bias"}  # a conv bias feeding a train-mode BN
  fidelity.assert_as_close_as_torch(t32, t32, t64)

  def altered(grads=None, stats=None):
    return fidelity.StepResult(t32.outputs, t32.loss, {**t32.grads, **(grads or {})},
                               {**t32.stats, **(stats or {})})

  with pytest.raises(AssertionError, match="grad_rel_max"):
    fidelity.assert_as_close_as_torch(altered(grads={"3.weight": t32.grads["3.weight"] * 1.001}),
                                      t32, t64)
  with pytest.raises(AssertionError, match="bn_stats_max_abs"):
    fidelity.assert_as_close_as_torch(
        altered(stats={"4.running_var": t32.stats["4.running_var"] + 1e-4}), t32, t64)
  with pytest.raises(AssertionError, match="vanishing_grad_max"):
    fidelity.assert_as_close_as_torch(altered(grads={"0.bias": t32.grads["0.weight"][:8, 0, 0, 0]}),
                                      t32, t64)
