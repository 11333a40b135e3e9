"""RepViT <-> PyTorch: the official layout (our reference in ``tests/torch_refs/repvit.py``)
and timm's (``timm.models.repvit``), both directions, through files, unfused and fused.

Every PyTorch load is ``strict=True``; models carry random weights *and* random BN statistics.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mobilevis_jax as mv  # noqa: E402
from mobilevis_jax.interop import (from_torch_state_dict, load_state_dict, save_state_dict,  # noqa: E402
                                   to_torch_state_dict)
from tests.torch_refs import repvit as R  # noqa: E402

ATOL = 1e-4


def _nhwc(x):
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _torch_logits(model, x):
  with torch.no_grad():
    return model.eval()(x).numpy()


def _load_strict(torch_model, sd):
  sd = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v)) for k, v in sd.items()}
  torch_model.load_state_dict(sd, strict=True)
  return torch_model


def _assert_same_tree(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, u), (_, v) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=jax.tree_util.keystr(path))


class _Official:
  """Official-layout M0.6 with two heads, imported into JAX and run once (stage outputs kept)."""

  name = "repvit_m0_6"

  def __init__(self):
    self.torch_model = R.randomize_(R.RepViT(self.name, distillation=True), seed=3).eval()
    self.x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    self.torch_logits = _torch_logits(self.torch_model, self.x)
    self.sd = self.torch_model.state_dict()
    self.variables = from_torch_state_dict(self.name, self.sd, distillation=True)
    model = mv.create_model(self.name, distillation=True)
    self.logits, state = jax.jit(lambda v, x: model.apply(v, x, train=False, capture_intermediates=True))(
        self.variables, _nhwc(self.x))
    self.stage_outputs = [state["intermediates"][f"stages_{i}"]["__call__"][0] for i in range(4)]


@pytest.fixture(scope="module")
def official():
  return _Official()


def test_official_to_jax_logits(official):
  assert float(np.std(official.torch_logits)) > 0.1
  np.testing.assert_allclose(np.asarray(official.logits), official.torch_logits, rtol=0, atol=ATOL)


def test_stage_outputs_are_official_detection_features(official):
  # The official detection backbone returns features[i] at these indices ([2, 6, 20, 24] for M1.1).
  indices = R.stage_output_indices(official.name)
  taken, x = {}, official.x
  with torch.no_grad():
    for i, f in enumerate(official.torch_model.features):
      x = f(x)
      if i in indices:
        taken[i] = x.numpy().transpose(0, 2, 3, 1)
  for ours, i in zip(official.stage_outputs, indices):
    np.testing.assert_allclose(np.asarray(ours), taken[i], rtol=0, atol=ATOL)


def test_jax_to_official_strict_load(official):
  sd = to_torch_state_dict(official.name, official.variables, distillation=True)
  assert list(sd) == list(official.sd)                      # same keys, same order
  assert sd["features.1.token_mixer.0.bn.num_batches_tracked"].dtype == np.int64
  fresh = _load_strict(R.RepViT(official.name, distillation=True), sd)
  np.testing.assert_allclose(_torch_logits(fresh, official.x), np.asarray(official.logits),
                             rtol=0, atol=ATOL)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_file_round_trip(official, tmp_path, suffix):
  path = tmp_path / f"repvit{suffix}"
  save_state_dict(to_torch_state_dict(official.name, official.variables, distillation=True), path)
  if suffix == ".pth":   # stored as the official checkpoints are: {'model': state_dict}
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"model"}
    fresh = _load_strict(R.RepViT(official.name, distillation=True), ckpt["model"])
    np.testing.assert_allclose(_torch_logits(fresh, official.x), official.torch_logits, rtol=0, atol=1e-6)
  back = from_torch_state_dict(official.name, load_state_dict(path), distillation=True)
  _assert_same_tree(back, official.variables)


def test_fused_official_layout(official):
  model = mv.create_model(official.name, distillation=True)
  fused_model, fused_v = mv.fuse(model, official.variables)
  sd = to_torch_state_dict(official.name, fused_v, fused=True)
  torch_fused = R.fuse_model(official.torch_model)
  assert list(sd) == list(torch_fused.state_dict())
  fresh = _load_strict(R.fuse_model(R.RepViT(official.name, distillation=True)), sd)
  np.testing.assert_allclose(_torch_logits(fresh, official.x), official.torch_logits, rtol=0, atol=ATOL)
  # The official fused checkpoint imports into the fused JAX model (the same arrays as our fuse).
  imported = from_torch_state_dict(official.name, torch_fused.state_dict(), fused=True)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         imported, fused_v)


def test_official_to_timm_layout_via_jax(official):
  """Official checkpoint -> JAX -> timm layout loads strictly into timm and gives the same logits."""
  from timm.models.repvit import RepVit
  timm_model = RepVit(embed_dim=(40, 80, 160, 320), depth=(1, 1, 8, 1), distillation=True)
  sd = to_torch_state_dict(official.name, official.variables, layout="timm", distillation=True)
  assert list(sd) == list(timm_model.state_dict())
  _load_strict(timm_model, sd)
  np.testing.assert_allclose(_torch_logits(timm_model, official.x), official.torch_logits,
                             rtol=0, atol=ATOL)
  with pytest.raises(ValueError, match="timm has no fused"):
    to_torch_state_dict(official.name, {}, layout="timm", fused=True)


def test_timm_legacy_both_directions():
  """timm's own legacy RepViT-M1 (Conv-BN 1x1 branch, no outer BN) -> JAX -> timm."""
  import timm
  name = "repvit_m1"
  timm_model = R.randomize_(timm.create_model(name, pretrained=False, distillation=False), seed=4).eval()
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  expected = _torch_logits(timm_model, x)
  variables = from_torch_state_dict(name, timm_model.state_dict(), layout="timm")
  model = mv.create_model(name)
  ours = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, _nhwc(x))
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=ATOL)
  sd = to_torch_state_dict(name, variables, layout="timm")
  fresh = _load_strict(timm.create_model(name, pretrained=False, distillation=False), sd)
  np.testing.assert_allclose(_torch_logits(fresh, x), np.asarray(ours), rtol=0, atol=ATOL)
  # The same weights in the official legacy layout load into the official legacy model.
  official = _load_strict(R.RepViT(name), to_torch_state_dict(name, variables))
  np.testing.assert_allclose(_torch_logits(official, x), expected, rtol=0, atol=ATOL)


def test_full_resolution_m1_1():
  """One check at 224 on the flagship variant, with the official two-head checkpoint format."""
  name = "repvit_m1_1"
  ref = R.randomize_(R.RepViT(name, distillation=True), seed=5, resolution=224).eval()
  assert len(ref.state_dict()) == 659              # as the reference notes count for M1.1
  x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
  expected = _torch_logits(ref, x)
  variables = from_torch_state_dict(name, ref.state_dict(), distillation=True)
  model = mv.create_model(name, distillation=True)
  ours = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, _nhwc(x))
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=ATOL)
  fresh = _load_strict(R.RepViT(name, distillation=True),
                       to_torch_state_dict(name, variables, distillation=True))
  np.testing.assert_allclose(_torch_logits(fresh, x), np.asarray(ours), rtol=0, atol=ATOL)
