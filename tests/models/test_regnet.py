"""RegNetY, the distillation teacher: stage tables, parameter counts and initialisation against
timm, eval parity with timm's ``regnety_160`` at 224 in both directions (strict loads), train-mode
parity (BN statistics), multi-scale features, and the ``mobilevis import`` checkpoint the trainer
reads a teacher from."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mobilevis_jax import cli, interop
from mobilevis_jax.models import create_model, list_models, model_info
from mobilevis_jax.models.regnet import STAGES, drop_path_rates
from mobilevis_jax.profiling import count_params, profile
from tests.helpers import abstract_variables

# timm 1.0 ``sum(p.numel() for p in timm.create_model(name).parameters())``.
EXPECTED_PARAMS = {"regnety_002": 3_162_996, "regnety_004": 4_344_144, "regnety_160": 83_590_140}
# profile()'s conv + Linear MACs at 224 (regression values of our count).
EXPECTED_GMACS = {"regnety_002": 0.1995, "regnety_004": 0.4018, "regnety_160": 15.91}
SMALL = "regnety_002"


def _random_variables(shapes, seed=0):
  """Random weights without running ``model.init`` (~25 s of RNG compilation for regnety_160):
  fan-in scaled kernels, non-zero biases and non-trivial BN parameters and statistics."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    leaf = path[-1]
    if leaf == "kernel":  # HWIO conv or (in, out) dense: fan-in = all axes but the last
      return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
    if leaf == "var":
      return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
    if leaf == "scale":
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)  # bias, mean

  flat = traverse_util.flatten_dict(dict(shapes))
  return traverse_util.unflatten_dict({k: fill(k, s) for k, s in flat.items()})


def _randomize_torch(model, seed=0):
  """Random BN affine parameters and statistics (shared helper) and non-zero conv/Linear biases
  (timm initialises SE and head biases to zero, which would hide a bias mapping mistake)."""
  torch = pytest.importorskip("torch")
  from tests.helpers import randomize_bn_
  randomize_bn_(model, seed)
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
  return model


def _state_dict_numpy(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _load_strict(torch_model, sd):
  import torch
  torch_model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)


def test_registry_lists_the_family():
  assert list_models("regnet*") == sorted(STAGES)
  for name in STAGES:
    info = model_info(name)
    assert (info.family, info.default_resolution, info.layouts) == ("regnet", 224, ("timm",))


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_table_and_params_match_timm(name):
  timm = pytest.importorskip("timm")
  ref = timm.create_model(name)
  stages, group_size = STAGES[name]
  for i, (width, depth) in enumerate(stages):
    stage = getattr(ref, f"s{i + 1}")
    blocks = list(stage.children())
    assert len(blocks) == depth
    assert blocks[0].conv3.conv.out_channels == width
    assert blocks[0].conv2.conv.groups == width // group_size
  v = abstract_variables(name, 32)
  assert count_params(v) == sum(p.numel() for p in ref.parameters()) == EXPECTED_PARAMS[name]
  # Every shape agrees (SE widths follow the block input, so they differ inside a stage).
  sd = interop.to_torch_state_dict(name, jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), v),
                                   layout="timm")
  assert {k: a.shape for k, a in sd.items()} == {k: tuple(t.shape) for k, t in ref.state_dict().items()}
  assert abs(profile(name)["macs"] / 1e9 - EXPECTED_GMACS[name]) < 5e-4 * EXPECTED_GMACS[name] + 5e-4


def test_initialisation_follows_timm():
  """timm ``_init_weights``: conv N(0, 2/fan_out) with fan_out = kh*kw*out // groups, Linear
  N(0, 0.01), zero biases, BN weight 1 except conv3's (``zero_init_last``).

  On a 5-block RegNet wide enough for the spreads to be measured: ``model.init`` of a real
  variant compiles ~300 RNG calls (minutes on a loaded CI machine); 'unsafe_rbg' keys and few
  blocks keep it short.
  """
  from mobilevis_jax.models.regnet import RegNet
  model = RegNet(stages=((64, 1), (128, 2), (256, 1), (512, 1)), group_size=16, num_classes=100)
  v = jax.jit(lambda r: model.init(r, jnp.zeros((1, 32, 32, 3))))(jax.random.key(0, impl="unsafe_rbg"))
  flat = {"/".join(k): np.asarray(a) for k, a in traverse_util.flatten_dict(v["params"]).items()}
  assert "s2/b2/conv3/bn/scale" in flat and "s2/b2/downsample/conv/kernel" not in flat  # identity
  checked = 0
  for k, a in flat.items():
    if k.endswith("bn/scale"):
      np.testing.assert_array_equal(a, 0.0 if "/conv3/" in k else 1.0, err_msg=k)
    elif k.endswith("bias"):
      np.testing.assert_array_equal(a, 0.0, err_msg=k)
    elif k == "head/kernel":
      assert abs(a.std() / 0.01 - 1) < 0.03
    elif k.endswith("kernel") and a.size >= 20_000:  # enough samples for a 3% check
      kh, kw, cin_per_group, out = a.shape
      groups = out // 16 if "/conv2/" in k else 1  # the grouped 3x3: width / group width
      assert abs(a.std() / np.sqrt(2 * groups / (kh * kw * out)) - 1) < 0.03, k
      assert abs(a.mean()) < 0.03 * a.std(), k
      checked += 1
  assert checked >= 8
  # The other spelling of "kaiming fan_out" would be sqrt(groups) = sqrt(32) off here.
  assert abs(flat["s4/b1/conv2/conv/kernel"].std() / np.sqrt(2 * 32 / (9 * 512)) - 1) < 0.03


def test_drop_path_rates_match_timm():
  timm = pytest.importorskip("timm")
  ref = timm.create_model(SMALL, drop_path_rate=0.3)
  rates = drop_path_rates([d for _, d in STAGES[SMALL][0]], 0.3)
  for i, stage_rates in enumerate(rates):
    blocks = list(getattr(ref, f"s{i + 1}").children())
    got = [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks]
    np.testing.assert_allclose(stage_rates, got, atol=1e-6)


# --- regnety_160: the family's one full-resolution check ----------------------------------------

@pytest.fixture(scope="module")
def regnety_160():
  timm = pytest.importorskip("timm")
  pytest.importorskip("torch")
  model = create_model("regnety_160")
  x = np.random.RandomState(0).uniform(-2, 2, (1, 3, 224, 224)).astype(np.float32)
  return timm.create_model("regnety_160").eval(), model, jax.jit(model.apply), x


def test_regnety_160_timm_to_jax(regnety_160):
  import torch
  ref, _, apply, x = regnety_160
  _randomize_torch(ref, seed=0)
  with torch.no_grad():
    # With random BN on timm's init the pooled features reach ~1e2 after 18 residual blocks, and
    # the logits ~15, where float32 rounding alone is 1e-4: scale the head so that the logits are
    # O(1) and the 1e-4 tolerance keeps its meaning (as in the other direction, where they are).
    ref.head.fc.weight.mul_(0.1)
  sd = _state_dict_numpy(ref)
  variables = interop.from_torch_state_dict("regnety_160", sd, layout="timm")
  got = np.asarray(apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  assert np.abs(want).max() > 1e-1  # not a comparison of two near-zero outputs
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  exported = interop.to_torch_state_dict("regnety_160", variables, layout="timm")
  assert list(exported) == list(sd)
  for k in sd:
    np.testing.assert_array_equal(exported[k], sd[k], err_msg=k)


def test_regnety_160_jax_to_timm(regnety_160):
  import torch
  ref, model, apply, x = regnety_160
  shapes = abstract_variables("regnety_160", 32)
  variables = _random_variables(shapes, seed=1)
  got = np.asarray(apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
  sd = interop.to_torch_state_dict("regnety_160", variables, layout="timm")
  assert list(sd) == list(ref.state_dict())  # same keys, same order
  _load_strict(ref, sd)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  assert np.abs(want).max() > 1e-1
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# --- small variant: train mode, features, rngs, import ----------------------------------------

@pytest.fixture(scope="module")
def small_ref():
  timm = pytest.importorskip("timm")
  pytest.importorskip("torch")
  # eval(): timm builds models in train mode, and a test must not depend on which others ran first
  # in its process (under xdist, test_train_mode_parity_and_batch_stats may run elsewhere).
  return _randomize_torch(timm.create_model(SMALL), seed=3).eval()


def test_train_mode_parity_and_batch_stats(small_ref):
  """One train-mode forward: batch-statistics BN, logits and updated running statistics as timm."""
  import torch
  sd = _state_dict_numpy(small_ref)
  variables = interop.from_torch_state_dict(SMALL, sd, layout="timm")
  x = np.random.RandomState(1).uniform(-2, 2, (2, 3, 64, 64)).astype(np.float32)
  model = create_model(SMALL)
  # jit: on CPU one compilation is ~3x cheaper than the eager op-by-op first run.
  got, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  small_ref.train()
  with torch.no_grad():
    want = small_ref(torch.from_numpy(x)).numpy()
  small_ref.eval()
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
  after = interop.to_torch_state_dict(SMALL, {"params": variables["params"], **upd}, layout="timm")
  moved = 0
  for k, t in small_ref.state_dict().items():
    if k.endswith(("running_mean", "running_var")):
      np.testing.assert_allclose(after[k], t.numpy(), atol=1e-4, rtol=1e-4, err_msg=k)
      moved += not np.allclose(after[k], sd[k])
  assert moved > 0
  _load_strict(small_ref, sd)  # restore the statistics for the other tests


def test_features_only_match_timm_stages(small_ref):
  import torch
  sd = {k: v for k, v in _state_dict_numpy(small_ref).items() if not k.startswith("head.")}
  variables = interop.from_torch_state_dict(SMALL, sd, layout="timm", features_only=True)
  assert "head" not in variables["params"]
  x = np.random.RandomState(2).uniform(-2, 2, (2, 3, 64, 64)).astype(np.float32)
  feats = jax.jit(create_model(SMALL, features_only=True).apply)(
      variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert [f.shape for f in feats] == [(2, 16, 16, 24), (2, 8, 8, 56), (2, 4, 4, 152), (2, 2, 2, 368)]
  with torch.no_grad():
    want = small_ref.forward_intermediates(torch.from_numpy(x), indices=[1, 2, 3, 4],
                                           intermediates_only=True)
  for f, w in zip(feats, want):
    np.testing.assert_allclose(np.asarray(f), w.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=0)
  # A head-less export is what timm's head-less model holds.
  assert list(interop.to_torch_state_dict(SMALL, variables, layout="timm", features_only=True)) == list(sd)


def test_dropout_and_drop_path_use_the_rng():
  from mobilevis_jax.models.regnet import RegNet
  model = RegNet(stages=((8, 1), (16, 2), (16, 1), (32, 1)), group_size=8, num_classes=7,
                 drop_rate=0.3, drop_path_rate=0.3)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = _random_variables(jax.eval_shape(model.init, jax.random.PRNGKey(0), x), seed=4)

  @jax.jit
  def run(rng):
    return model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": rng})[0]

  a, b = run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(2))
  assert a.shape == (2, 7) and np.isfinite(np.asarray(a)).all()
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(run(jax.random.PRNGKey(1)), a)


def test_bad_inputs():
  with pytest.raises(ValueError, match="3 channels"):
    create_model(SMALL).init(jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 1)))
  with pytest.raises(ValueError, match="num_classes"):
    create_model(SMALL, num_classes=0).init(jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 3)))
  v = abstract_variables(SMALL, 32)
  with pytest.raises(ValueError, match="timm"):
    interop.to_torch_state_dict(SMALL, v, layout="official")


def test_mobilevis_import_is_what_the_trainer_reads(small_ref, tmp_path):
  """timm state_dict -> .safetensors -> ``mobilevis import`` -> orbax directory, read back the
  way ``train.py`` reads ``distillation.teacher_checkpoint``; then ``mobilevis export`` gives the
  file's tensors back."""
  import torch

  from mobilevis_jax.train.checkpoint import restore_variables
  sd = _state_dict_numpy(small_ref)
  weights = tmp_path / f"{SMALL}.safetensors"
  interop.save_state_dict(sd, weights)
  out = tmp_path / "teacher"
  with pytest.raises(ValueError, match="timm"):  # the CLI's default layout is 'official'
    cli.main(["import", "--model", SMALL, "--weights", str(weights), "--out", str(out)])
  assert cli.main(["import", "--model", SMALL, "--layout", "timm", "--weights", str(weights),
                   "--out", str(out)]) == 0

  teacher_vars, meta = restore_variables(str(out))
  assert meta["model_name"] == SMALL and set(teacher_vars) == {"params", "batch_stats"}
  kwargs = dict(meta.get("model_kwargs", {}))
  kwargs.setdefault("num_classes", 1000)  # train.py: the student's number of classes
  teacher = create_model(meta["model_name"], **kwargs)
  x = np.random.RandomState(5).uniform(-2, 2, (2, 3, 64, 64)).astype(np.float32)
  got = jax.jit(lambda v, x: teacher.apply(v, x, train=False))(
      teacher_vars, jnp.asarray(x.transpose(0, 2, 3, 1)))
  with torch.no_grad():
    want = small_ref(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)

  back = tmp_path / "back.safetensors"
  assert cli.main(["export", "--model", SMALL, "--layout", "timm", "--checkpoint", str(out),
                   "--out", str(back)]) == 0
  exported = interop.load_state_dict(back)
  assert sorted(exported) == sorted(sd)  # safetensors files store their keys sorted
  for k in sd:
    np.testing.assert_array_equal(exported[k], sd[k], err_msg=k)
