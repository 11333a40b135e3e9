"""RepViT: parameter counts and fused MACs against the official numbers, the official init,
SE placement, fused-vs-unfused agreement, distillation outputs and multi-scale features; then
parity with PyTorch: the official layout (our reference in ``mobilevis_jax/torch_models/repvit.py``) and
timm's (``timm.models.repvit``), both directions, through files, unfused and fused.

Every PyTorch load is ``strict=True``; torch models carry random weights *and* random BN
statistics. The torch tests skip (through the ``torch_ref`` fixture) when torch is missing.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import mobilevis_jax as mv
from mobilevis_jax.interop import (
  from_torch_state_dict,
  load_state_dict,
  save_state_dict,
  to_torch_state_dict,
)
from mobilevis_jax.layers import kernels
from mobilevis_jax.models.repvit import (
  BNLinear,
  FusedRepViT,
  RepViTBlock,
  RepViTDownsample,
  se_channels,
)
from mobilevis_jax.profiling import count_params
from tests.helpers import abstract_variables, assert_same_tree, randomize_repvit_

# From ../shared/reference/repvit.md (official code built with torch; fvcore GMACs at 224).
# name: (params with one head, with two heads, fused, fused GMACs)
OFFICIAL = {
    "repvit_m0_6": (2_487_292, 2_808_932, 2_468_072, 0.385),
    "repvit_m0_9": (5_103_560, 5_489_328, 5_067_056, 0.816),
    "repvit_m1_0": (6_852_900, 7_302_796, 6_810_312, 1.106),
    "repvit_m1_1": (8_288_888, 8_802_912, 8_244_312, 1.337),
    "repvit_m1_5": (14_130_408, 14_644_432, 14_049_992, 2.274),
    "repvit_m2_3": (23_046_512, 23_688_792, 22_926_792, 4.516),
    "repvit_m1": (5_099_480, 5_485_248, 5_067_056, 0.816),
    "repvit_m2": (8_283_960, 8_797_984, 8_244_312, 1.337),
    "repvit_m3": (10_168_808, 10_682_832, 10_115_720, 1.859),
}


@functools.cache
def _abstract_two_heads(name):
  return abstract_variables(name, distillation=True)


def _without(variables, top_level_name):
  return {col: {k: v for k, v in tree.items() if k != top_level_name}
          for col, tree in variables.items()}


def test_registry_lists_every_variant():
  assert mv.list_models("repvit*") == sorted(OFFICIAL)
  with pytest.raises(KeyError, match="repvit_m1_1"):
    mv.create_model("repvit_m1_2")


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_parameter_counts_match_official(name):
  one, two, fused, _ = OFFICIAL[name]
  variables = _abstract_two_heads(name)
  assert count_params(variables) == two
  # A one-head model is the two-head model without ``head_dist`` (checked structurally below).
  assert count_params(_without(variables, "head_dist")) == one
  model = mv.create_model(name, distillation=True)
  fused_models = []

  def fuse_params(v):
    fused_model, fused_v = mv.fuse(model, v)
    fused_models.append(fused_model)
    return fused_v

  fused_vars = jax.eval_shape(fuse_params, variables)
  assert isinstance(fused_models[0], FusedRepViT)
  assert count_params(fused_vars) == fused


def test_one_head_model_is_two_head_model_without_head_dist():
  one = jax.tree_util.tree_map(lambda a: a.shape,
                               abstract_variables(mv.create_model("repvit_m0_6"), 32))
  two = abstract_variables(mv.create_model("repvit_m0_6", distillation=True), 32)
  two = jax.tree_util.tree_map(lambda a: a.shape, _without(two, "head_dist"))
  assert one == two


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_fused_macs_match_official(name):
  gmacs = OFFICIAL[name][3]
  model = mv.create_model(name, fused=True)
  r = mv.profile(model, 224, variables=abstract_variables(model))
  assert r["params"] == OFFICIAL[name][2]
  assert abs(r["macs"] / 1e9 - gmacs) / gmacs < 0.01, r


def test_official_init_and_se_placement():
  # Initialising whole networks eagerly is slow on CPU, so the init is checked on the modules
  # that carry it (the network is assembled from exactly these).
  x = jnp.zeros((1, 8, 8, 32))
  @jax.jit
  def init_all(x, pooled):
    init = lambda m, x: m.init(jax.random.PRNGKey(0), x, train=False)["params"]
    return (init(RepViTBlock(use_se=True), x), init(RepViTDownsample(64), x),
            init(BNLinear(1000), pooled))

  block, down, head = init_all(x, jnp.zeros((1, 512)))
  # Zero-init gamma on the last Conv-BN of every residual branch (block FFN, downsample FFN) ...
  for p in (block["channel_mixer"], down["ffn"], down["pre_block"]["channel_mixer"]):
    assert float(jnp.abs(p["conv2"]["bn"]["scale"]).max()) == 0.0
  # ... and one everywhere else.
  flat = traverse_util.flatten_dict({"block": block, "down": down}, sep="/")
  ones = [k for k in flat if k.endswith("bn/scale") and "conv2/bn" not in k]
  assert len(ones) == 2 * 3 + 3 and all(bool(jnp.all(flat[k] == 1.0)) for k in ones)
  # Head: trunc_normal(0.02), zero bias.
  assert 0.015 < float(jnp.std(head["linear"]["kernel"])) < 0.025
  assert float(jnp.abs(head["linear"]["bias"]).max()) == 0.0
  # SE on blocks 0, 2, 4, ... of each stage; never on pre-blocks.
  p = abstract_variables(mv.create_model("repvit_m0_6"), 32)["params"]
  stage2 = p["stages_2"]
  assert [("se" in stage2[f"blocks_{j}"]) for j in range(8)] == [j % 2 == 0 for j in range(8)]
  assert "se" not in stage2["downsample"]["pre_block"]
  assert stage2["blocks_0"]["se"]["reduce"]["kernel"].shape == (1, 1, 160, 40)


def test_se_width_rounding():
  # timm's make_divisible(C / 4, 8, round_limit=0), as listed in the reference notes.
  widths = {40: 8, 48: 16, 56: 16, 80: 24, 112: 32, 160: 40, 224: 56, 320: 80, 448: 112,
            640: 160, 64: 16, 512: 128}
  assert {c: se_channels(c) for c in widths} == widths


def test_legacy_token_mixer_structure():
  p = abstract_variables(mv.create_model("repvit_m1"), 32)["params"]
  tm = p["stages_0"]["blocks_0"]["token_mixer"]
  assert set(tm) == {"conv", "conv1"} and set(tm["conv1"]) == {"conv", "bn"}
  p = abstract_variables(mv.create_model("repvit_m0_9"), 32)["params"]
  tm = p["stages_0"]["blocks_0"]["token_mixer"]
  assert set(tm) == {"conv", "conv1", "bn"} and set(tm["conv1"]) == {"kernel", "bias"}


@pytest.mark.parametrize("legacy", [False, True])
def test_token_mixer_agrees_on_every_depthwise_path(legacy):
  """In eval mode the token mixer's three branches read x through ``kernels.shared_pad`` (on the
  shift path one materialised padded map, the identity and 1x1 branches a slice of it; XLA's
  path pads in its convolution), in train mode x itself. Same values and gradients (input and
  every parameter) on every path, eval and train BN, on an odd map."""
  block = RepViTBlock(True, legacy)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 7, 8))
  variables = random_variables(block, x)
  cot = jax.random.normal(jax.random.PRNGKey(1), x.shape)

  def loss(params, x, train):
    v = {"params": params, "batch_stats": variables["batch_stats"]}
    y = block.apply(v, x, train, mutable=["batch_stats"])[0] if train else block.apply(v, x, train)
    return jnp.vdot(y, cot)

  results = {}
  for impl in kernels.IMPLS["depthwise"]:
    with kernels.use(depthwise=impl):
      results[impl] = [jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=2)(
          variables["params"], x, train) for train in (False, True)]
  for got, want in zip(jax.tree.leaves(results["shift"]), jax.tree.leaves(results["xla"])):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

# --- random weights with realistic BN statistics -------------------------------------------------

def random_variables(model, x, seed=0):
  """Random weights, random BN affine parameters and *real* running statistics.

  Running statistics are the batch statistics of ``x`` (one train-mode pass; the running update
  ``0.9 * init + 0.1 * batch`` is inverted), so eval-mode activations stay O(1) as in a trained
  network and every BN tensor differs from its init. The last BN of each residual branch (zero
  at init) gets small gammas, as a trained network's residual branches have; the head BN is
  normalised by the second moment (pooled features of noise images hardly vary, and dividing by
  that tiny variance would amplify float32 rounding).
  """
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in traverse_util.flatten_dict(shapes["params"]).items():
    shape = leaf.shape
    if path[-1] == "kernel" and path[0].startswith("head"):
      val = 0.02 * rng.standard_normal(shape)   # the official head init: logits O(1), not O(10)
    elif path[-1] == "kernel":
      val = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif path[-1] == "scale":
      lo, hi = (0.05, 0.3) if path[-3:-1] == ("conv2", "bn") else (0.5, 1.5)
      val = rng.uniform(lo, hi, shape)
    else:
      val = 0.1 * rng.standard_normal(shape)
    out[path] = jnp.asarray(val, jnp.float32)
  params = traverse_util.unflatten_dict(out)
  init_stats = traverse_util.unflatten_dict({
      k: (jnp.ones(v.shape) if k[-1] == "var" else jnp.zeros(v.shape))
      for k, v in traverse_util.flatten_dict(shapes["batch_stats"]).items()})
  _, updated = jax.jit(lambda p, s, x: model.apply({"params": p, "batch_stats": s}, x, train=True,
                                                  mutable=["batch_stats"]))(params, init_stats, x)
  fixed = {}
  for path, val in traverse_util.flatten_dict(updated["batch_stats"]).items():
    fixed[path] = val / 0.1 if path[-1] == "mean" else (val - 0.9) / 0.1
  for path in list(fixed):
    if path[0] in ("head", "head_dist") and path[-1] == "var":
      fixed[path] = fixed[path] + fixed[path[:-1] + ("mean",)] ** 2
  return {"params": params, "batch_stats": traverse_util.unflatten_dict(fixed)}


class _Reference:
  """One randomised model and its eval-mode outputs, shared by the tests below (XLA compiles
  dominate their cost on CPU, so each network is compiled as few times as possible)."""

  def __init__(self, name, num_classes=1000, res=64):
    self.model = mv.create_model(name, num_classes=num_classes, distillation=True)
    self.x = jax.random.normal(jax.random.PRNGKey(1), (4, res, res, 3))
    self.variables = random_variables(self.model, self.x)
    self.logits, state = jax.jit(lambda v, x: self.model.apply(
        v, x, train=False, capture_intermediates=True))(self.variables, self.x)
    self.intermediates = state["intermediates"]


@pytest.fixture(scope="module")
def ref_m0_6():
  return _Reference("repvit_m0_6", num_classes=10)


@pytest.fixture(scope="module")
def ref_legacy():
  return _Reference("repvit_m1")


@pytest.mark.parametrize("ref_name", ["ref_m0_6", "ref_legacy"])
def test_fused_model_matches_unfused(ref_name, request):
  ref = request.getfixturevalue(ref_name)
  fused_model, fused_v = mv.fuse(ref.model, ref.variables)
  assert isinstance(fused_model, FusedRepViT) and set(fused_v) == {"params"}
  # One depthwise 3x3 conv with bias per token mixer, one Linear head.
  tm = fused_v["params"]["stages_2"]["blocks_0"]["token_mixer"]
  assert set(tm) == {"kernel", "bias"} and tm["kernel"].shape == (3, 3, 1, ref.model.widths[2])
  assert set(fused_v["params"]["head"]) == {"kernel", "bias"}
  assert "head_dist" not in fused_v["params"]
  y_fused = jax.jit(lambda v, x: fused_model.apply(v, x))(fused_v, ref.x)
  assert float(jnp.std(ref.logits)) > 0.1                  # the logits are not degenerate
  np.testing.assert_allclose(np.asarray(y_fused), np.asarray(ref.logits), rtol=0, atol=1e-5)


def test_distillation_outputs(ref_m0_6):
  model, v, x = ref_m0_6.model, ref_m0_6.variables, ref_m0_6.x
  inter = ref_m0_6.intermediates
  head, head_dist = inter["head"]["__call__"][0], inter["head_dist"]["__call__"][0]
  assert ref_m0_6.logits.shape == (4, 10)
  assert float(jnp.max(jnp.abs(head - head_dist))) > 1e-3     # two different heads ...
  np.testing.assert_allclose(ref_m0_6.logits, (head + head_dist) / 2, rtol=0, atol=1e-6)  # averaged
  (y_cls, y_dist), _ = jax.jit(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
  assert y_cls.shape == y_dist.shape == (4, 10)
  assert float(jnp.max(jnp.abs(y_cls - y_dist))) > 1e-3
  # Without distillation both modes return one array.
  single = mv.create_model("repvit_m0_6", num_classes=10)
  v1 = _without(v, "head_dist")
  for train in (True, False):
    apply = lambda v, x, train=train: single.apply(v, x, train=train, mutable=["batch_stats"])[0]
    out = jax.eval_shape(apply, v1, x)
    assert out.shape == (4, 10)


def test_features_only_returns_stage_outputs(ref_m0_6):
  feats_model = mv.create_model("repvit_m0_6", features_only=True)
  x = ref_m0_6.x
  backbone = _without(_without(ref_m0_6.variables, "head"), "head_dist")
  shapes = jax.eval_shape(lambda x: feats_model.init(jax.random.PRNGKey(0), x, train=False), x)
  assert "head" not in shapes["params"]
  assert (jax.tree_util.tree_map(lambda a: a.shape, shapes)
          == jax.tree_util.tree_map(lambda a: a.shape, backbone))
  feats = jax.jit(lambda v, x: feats_model.apply(v, x, train=False))(backbone, x)
  assert [f.shape for f in feats] == [(4, 16, 16, 40), (4, 8, 8, 80), (4, 4, 4, 160),
                                      (4, 2, 2, 320)]
  # Each feature is its stage's output; the pre-block belongs to the *next* stage's downsample
  # (the PyTorch test checks these against the official detection out_indices).
  for i, f in enumerate(feats):
    np.testing.assert_allclose(ref_m0_6.intermediates[f"stages_{i}"]["__call__"][0], f, atol=1e-6)
  assert "pre_block" in backbone["params"]["stages_1"]["downsample"]
  # num_classes=0 returns the pooled features.
  pooled = mv.create_model("repvit_m0_6", num_classes=0)
  assert jax.eval_shape(lambda v, x: pooled.apply(v, x, train=False), backbone, x).shape == (4, 320)


def test_bad_input_is_rejected():
  model = mv.create_model("repvit_m0_6")
  with pytest.raises(ValueError, match="3 channels"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)), train=False)
  with pytest.raises(ValueError, match="NHWC"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((32, 32, 3)), train=False)
  with pytest.raises(ValueError, match="structural re-parameterisation"):
    fm = mv.create_model("repvit_m0_6", fused=True)
    mv.fuse(fm, {})


# --- PyTorch parity (official reference and timm) ------------------------------------------

ATOL = 1e-4


def _nhwc(x):
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _torch_logits(model, x):
  import torch
  with torch.no_grad():
    return model.eval()(x).numpy()


def _load_strict(torch_model, sd):
  import torch
  sd = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v))
        for k, v in sd.items()}
  torch_model.load_state_dict(sd, strict=True)
  return torch_model


class _Official:
  """Official-layout M0.6 with two heads, imported into JAX and run once (stage outputs kept)."""

  name = "repvit_m0_6"

  def __init__(self, torch, R):
    self.torch_model = randomize_repvit_(R.RepViT(self.name, distillation=True), seed=3).eval()
    self.x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    self.torch_logits = _torch_logits(self.torch_model, self.x)
    self.sd = self.torch_model.state_dict()
    self.variables = from_torch_state_dict(self.name, self.sd, distillation=True)
    model = mv.create_model(self.name, distillation=True)
    self.logits, state = jax.jit(
        lambda v, x: model.apply(v, x, train=False, capture_intermediates=True))(
            self.variables, _nhwc(self.x))
    self.stage_outputs = [state["intermediates"][f"stages_{i}"]["__call__"][0] for i in range(4)]


@pytest.fixture(scope="module")
def torch_ref():
  """(torch, mobilevis_jax/torch_models/repvit.py); skips the PyTorch tests when torch is not installed."""
  torch = pytest.importorskip("torch")
  from mobilevis_jax.torch_models import repvit
  return torch, repvit


@pytest.fixture(scope="module")
def official(torch_ref):
  return _Official(*torch_ref)


def test_official_to_jax_logits(official):
  assert float(np.std(official.torch_logits)) > 0.1
  np.testing.assert_allclose(np.asarray(official.logits), official.torch_logits, rtol=0, atol=ATOL)


def test_stage_outputs_are_official_detection_features(official, torch_ref):
  torch, R = torch_ref
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


def test_jax_to_official_strict_load(official, torch_ref):
  _, R = torch_ref
  sd = to_torch_state_dict(official.name, official.variables, distillation=True)
  assert list(sd) == list(official.sd)                      # same keys, same order
  assert sd["features.1.token_mixer.0.bn.num_batches_tracked"].dtype == np.int64
  fresh = _load_strict(R.RepViT(official.name, distillation=True), sd)
  np.testing.assert_allclose(_torch_logits(fresh, official.x), np.asarray(official.logits),
                             rtol=0, atol=ATOL)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_file_round_trip(official, tmp_path, suffix, torch_ref):
  torch, R = torch_ref
  path = tmp_path / f"repvit{suffix}"
  save_state_dict(to_torch_state_dict(official.name, official.variables, distillation=True), path)
  if suffix == ".pth":   # stored as the official checkpoints are: {'model': state_dict}
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"model"}
    fresh = _load_strict(R.RepViT(official.name, distillation=True), ckpt["model"])
    np.testing.assert_allclose(_torch_logits(fresh, official.x), official.torch_logits,
                               rtol=0, atol=1e-6)
  back = from_torch_state_dict(official.name, load_state_dict(path), distillation=True)
  assert_same_tree(back, official.variables)


def test_fused_official_layout(official, torch_ref):
  _, R = torch_ref
  model = mv.create_model(official.name, distillation=True)
  fused_model, fused_v = mv.fuse(model, official.variables)
  sd = to_torch_state_dict(official.name, fused_v, fused=True)
  torch_fused = R.fuse_model(official.torch_model)
  assert list(sd) == list(torch_fused.state_dict())
  fresh = _load_strict(R.fuse_model(R.RepViT(official.name, distillation=True)), sd)
  np.testing.assert_allclose(_torch_logits(fresh, official.x), official.torch_logits,
                             rtol=0, atol=ATOL)
  # The official fused checkpoint imports into the fused JAX model (the same arrays as our fuse).
  imported = from_torch_state_dict(official.name, torch_fused.state_dict(), fused=True)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         imported, fused_v)


def test_official_to_timm_layout_via_jax(official):
  """Official checkpoint -> JAX -> timm layout: loads strictly into timm, same logits."""
  from timm.models.repvit import RepVit
  timm_model = RepVit(embed_dim=(40, 80, 160, 320), depth=(1, 1, 8, 1), distillation=True)
  sd = to_torch_state_dict(official.name, official.variables, layout="timm", distillation=True)
  assert list(sd) == list(timm_model.state_dict())
  _load_strict(timm_model, sd)
  np.testing.assert_allclose(_torch_logits(timm_model, official.x), official.torch_logits,
                             rtol=0, atol=ATOL)
  with pytest.raises(ValueError, match="timm has no fused"):
    to_torch_state_dict(official.name, {}, layout="timm", fused=True)


def test_timm_legacy_both_directions(torch_ref):
  """timm's own legacy RepViT-M1 (Conv-BN 1x1 branch, no outer BN) -> JAX -> timm."""
  torch, R = torch_ref
  import timm
  name = "repvit_m1"
  timm_model = timm.create_model(name, pretrained=False, distillation=False)
  timm_model = randomize_repvit_(timm_model, seed=4).eval()
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


def test_full_resolution_m1_1(torch_ref):
  """One check at 224 on the flagship variant, with the official two-head checkpoint format."""
  torch, R = torch_ref
  name = "repvit_m1_1"
  ref = randomize_repvit_(R.RepViT(name, distillation=True), seed=5, resolution=224).eval()
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
