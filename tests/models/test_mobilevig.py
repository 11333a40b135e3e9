"""MobileViG: parameter counts, official-profiler GMACs, PyTorch parity both ways, features.

The packaged PyTorch module (``mobilevis_jax/torch_models/mobilevig.py``) reproduces the official module
tree; every parity test loads strictly (all keys, every ``num_batches_tracked``).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mobilevis_jax as mv
from mobilevis_jax import interop
from mobilevis_jax.layers.regularization import DropPath
from mobilevis_jax.models.mobilevig import MobileViG, MobileViGConfig
from mobilevis_jax.profiling import count_params
from tests.helpers import abstract_variables

NAMES = ["mobilevig_ti", "mobilevig_s", "mobilevig_m", "mobilevig_b"]
PARAMS_TWO_HEADS = [5_271_074, 7_276_538, 14_075_786, 26_868_506]
PARAMS_ONE_HEAD = [4_758_074, 6_763_538, 13_306_786, 26_099_506]
PAPER_GMACS = [0.7, 1.0, 1.5, 2.8]
# What SLDGroup/MobileViG util/profile.py prints for these models at 224 (run on the official code).
OFFICIAL_PROFILER_MACS = [662_357_216, 984_016_736, 1_493_819_712, 2_793_639_168]
OFFICIAL_PROFILER_PARAMS = [5_229_749, 7_214_704, 13_996_032, 26_727_334]


@pytest.mark.parametrize("name,two,one", list(zip(NAMES, PARAMS_TWO_HEADS, PARAMS_ONE_HEAD)))
def test_parameter_counts(name, two, one):
  assert count_params(abstract_variables(name)) == two
  assert count_params(abstract_variables(name, distillation=False)) == one


@pytest.mark.parametrize("i", range(4), ids=NAMES)
def test_profile_reproduces_official_profiler(i):
  r = mv.profile(NAMES[i])
  assert r["official_profiler_macs"] == OFFICIAL_PROFILER_MACS[i]
  assert round(r["official_profiler_macs"] / 1e9, 1) == PAPER_GMACS[i]
  assert r["official_profiler_params"] == OFFICIAL_PROFILER_PARAMS[i]
  # True MACs: convs and the pooled 1x1 convs/heads only, private tags removed.
  assert set(r["macs_by_tag"]) == {"conv", "dense"}
  assert r["macs"] == r["macs_by_tag"]["conv"] + r["macs_by_tag"]["dense"]
  assert 0 < r["official_profiler_macs"] - r["macs"] < 1e6   # the GELU C x H count only


def test_official_profiler_convention_against_torch_hooks():
  """Re-derive the Ti numbers with forward hooks on the PyTorch reference (independent path)."""
  torch = pytest.importorskip("torch")
  from mobilevis_jax.torch_models.mobilevig import build
  ref = build("mobilevig_ti").eval()
  macs, params = [0], [0]

  def conv_hook(m, inp, out):
    macs[0] += out[0].numel() * m.weight.shape[-1] * m.weight.shape[-2] * m.weight.shape[1]
    params[0] += m.weight.numel() + m.weight.shape[1]

  def gelu_hook(m, inp, out):
    macs[0] += out.shape[1] * out.shape[2]   # the official hook's C x H (see models/mobilevig.py)

  for m in ref.modules():
    if isinstance(m, torch.nn.Conv2d):
      m.register_forward_hook(conv_hook)
    elif isinstance(m, torch.nn.GELU):
      m.register_forward_hook(gelu_hook)
  with torch.no_grad():
    ref(torch.zeros(1, 3, 224, 224))
  r = mv.profile("mobilevig_ti")
  assert (r["official_profiler_macs"], r["official_profiler_params"]) == (macs[0], params[0])


# --- PyTorch parity ---------------------------------------------------------------------------

def _logits(name, variables, x, train=False, **kw):
  model = mv.create_model(name, **kw)
  fn = jax.jit(lambda v, x: model.apply(v, x, train=train, mutable=["batch_stats"] if train else False))
  return fn(variables, jnp.asarray(x))


# One full-resolution check; the others run small and non-square (SVGA at 2x3 / 3x2).
PARITY = [("mobilevig_ti", (224, 224)), ("mobilevig_s", (64, 96)), ("mobilevig_m", (96, 64)),
          ("mobilevig_b", (64, 64))]


@pytest.mark.parametrize("name,size", PARITY, ids=[n for n, _ in PARITY])
def test_import_parity(name, size):
  torch = pytest.importorskip("torch")
  from mobilevis_jax.torch_models.mobilevig import build
  from tests.helpers import randomize_mobilevig_
  ref = randomize_mobilevig_(build(name), seed=1).eval()
  variables = interop.from_torch_state_dict(name, ref.state_dict())
  x = np.random.default_rng(0).normal(size=(2, *size, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  got = np.asarray(_logits(name, variables, x))
  assert np.abs(want).max() > 1e-2   # the check is not vacuous
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def _random_variables(name_or_model, seed=0, **kw):
  """Random values for every leaf, drawn with numpy, so that each leaf matters and logits stay O(1).

  (``model.init`` is avoided on purpose: compiling one RNG program per parameter shape costs more
  than the rest of a test on a 2-core CI machine.) Fan-in-scaled kernels; random BN statistics,
  biases and layer scales."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    key = path[-1].key
    if key == "kernel":
      return jnp.asarray(rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape), jnp.float32)
    if key == "var":
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
    if key == "scale" and path[-2].key != "layer_scale_2":
      return jnp.asarray(1 + rng.normal(0, 0.2, leaf.shape), jnp.float32)
    return jnp.asarray(rng.normal(0, 0.2, leaf.shape), jnp.float32)   # bias, mean, layer scale
  return jax.tree_util.tree_map_with_path(fill, abstract_variables(name_or_model, 64, **kw))


@pytest.mark.parametrize("kw", [{}, {"num_classes": 10, "distillation": False}],
                         ids=["two_heads", "one_head_10_classes"])
def test_export_parity_strict_load(kw, tmp_path):
  torch = pytest.importorskip("torch")
  from mobilevis_jax.torch_models.mobilevig import build
  name = "mobilevig_ti"
  variables = _random_variables(name, **kw)
  sd = interop.to_torch_state_dict(name, variables, **kw)
  path = tmp_path / "mobilevig_ti.pth"
  interop.save_state_dict(sd, path)
  loaded = torch.load(path, weights_only=True)
  loaded = loaded.get("model", loaded)
  assert all(loaded[k].dtype == torch.int64 for k in loaded if k.endswith("num_batches_tracked"))
  ref = build(name, **kw).eval()
  ref.load_state_dict(loaded, strict=True)
  assert list(loaded) == list(ref.state_dict())   # the official key order, too
  x = np.random.default_rng(1).normal(size=(2, 64, 96, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  got = np.asarray(_logits(name, variables, x, **kw))
  assert want.shape == (2, kw.get("num_classes", 1000))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # And back: the round trip is the identity.
  again = interop.from_torch_state_dict(name, loaded, **kw)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, jax.device_get(variables))


def test_train_mode_matches_torch_batch_statistics():
  """Train mode: both heads returned, BN normalises with batch moments and updates like torch."""
  torch = pytest.importorskip("torch")
  from mobilevis_jax.torch_models.mobilevig import build
  from tests.helpers import randomize_mobilevig_
  name = "mobilevig_ti"
  ref = randomize_mobilevig_(build(name, drop_path=0.0), seed=2).train()
  # Clone: on CPU the imported arrays may share memory with the torch tensors, which the torch
  # forward below updates in place.
  variables = interop.from_torch_state_dict(name, {k: v.clone() for k, v in ref.state_dict().items()})
  x = np.random.default_rng(2).normal(size=(4, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    want_head, want_dist = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  (head, dist), updates = _logits(name, variables, x, train=True, drop_path_rate=0.0)
  np.testing.assert_allclose(np.asarray(head), want_head.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(dist), want_dist.numpy(), atol=1e-4, rtol=0)
  new = interop.from_torch_state_dict(name, ref.state_dict())["batch_stats"]
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
                         updates["batch_stats"], new)


def test_state_dict_errors_name_the_keys():
  from mobilevis_jax.torch_models.mobilevig import build
  pytest.importorskip("torch")
  sd = build("mobilevig_ti").state_dict()
  del sd["backbone.1.0.graph_conv.nn.1.running_var"]
  with pytest.raises(interop.StateDictError, match="graph_conv.nn.1.running_var"):
    interop.from_torch_state_dict("mobilevig_ti", sd)
  # A one-head checkpoint needs distillation=False: the error says which key is unexpected.
  with pytest.raises(interop.StateDictError, match="missing keys.*dist_head.weight"):
    interop.from_torch_state_dict("mobilevig_ti", build("mobilevig_ti", distillation=False).state_dict())


# --- model surface ----------------------------------------------------------------------------

def test_features_only_strides_and_no_head():
  model = mv.create_model("mobilevig_s", features_only=True)
  x = jnp.zeros((1, 96, 160, 3))
  variables = abstract_variables("mobilevig_s", resolution=64, features_only=True)
  assert not {"head", "dist_head", "prediction_conv"} & set(variables["params"])
  feats = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  assert [f.shape for f in feats] == [(1, 24, 40, 42), (1, 12, 20, 84), (1, 6, 10, 176),
                                      (1, 3, 5, 256)]
  # The backbone keys are still the official ones.
  sd_keys = set(interop.to_torch_state_dict(
      "mobilevig_s", jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), variables),
      features_only=True))
  assert "backbone.2.1.fc2.1.running_var" in sd_keys and not any(k.startswith("head") for k in sd_keys)


def test_features_only_values_match_the_classifier_trunk():
  # A tiny configuration keeps the compile short; the wiring is the same as the real variants.
  tiny = MobileViGConfig((1, 2, 1), (8, 16, 24), 2, 32, 16)
  full, backbone = MobileViG(tiny), MobileViG(tiny, features_only=True)
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 64, 96, 3))
  variables = _random_variables(full)
  _, state = jax.jit(lambda v, x: full.apply(v, x, capture_intermediates=True))(variables, x)
  trunk = {col: {k: v for k, v in tree.items() if "head" not in k and "prediction" not in k}
           for col, tree in variables.items()}
  feats = jax.jit(backbone.apply)(trunk, x)
  inter = state["intermediates"]
  # Stage ends: local_backbone_0 | DS 1, 2, 3 | DS 4, 5 | transition 6 | backbone_0, backbone_1.
  for feat, block in zip(feats, ["local_backbone_0", "local_backbone_3", "local_backbone_5",
                                 "backbone_1"]):
    np.testing.assert_allclose(feat, inter[block]["__call__"][0], atol=1e-6)


def test_drop_path_rates_rise_linearly_to_0_1_and_block_pairs_share_a_rate():
  rates = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, DropPath):
      rates[context.module.scope.path] = context.module.rate
    return next_fun(*args, **kwargs)

  model = mv.create_model("mobilevig_ti")
  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), jnp.zeros((1, 64, 64, 3)))
  expected = np.linspace(0, 0.1, 12)
  local = [rates[p] for p in sorted(rates, key=lambda p: int(p[0].split("_")[-1])) if "local" in p[0]]
  np.testing.assert_allclose(local, expected[:10], atol=1e-7)
  for j in range(2):
    assert rates[(f"backbone_{j}", "grapher", "drop_path")] == rates[(f"backbone_{j}", "ffn", "drop_path")]
    np.testing.assert_allclose(rates[(f"backbone_{j}", "ffn", "drop_path")], expected[10 + j], atol=1e-7)


def test_num_classes_distillation_and_train_outputs():
  model = mv.create_model("mobilevig_ti", num_classes=7)
  x = jnp.zeros((2, 64, 64, 3))
  v = _random_variables("mobilevig_ti", num_classes=7)
  (head, dist), _ = jax.eval_shape(lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)}), v, x)
  assert head.shape == dist.shape == (2, 7)
  single = mv.create_model("mobilevig_ti", num_classes=7, distillation=False)
  vs = abstract_variables("mobilevig_ti", 64, num_classes=7, distillation=False)
  assert "dist_head" not in vs["params"]
  assert jax.eval_shape(lambda v, x: single.apply(v, x), vs, x).shape == (2, 7)


def test_knn_graph_variant_shares_the_svga_parameters():
  svga_vars = abstract_variables("mobilevig_ti")
  knn_vars = abstract_variables("mobilevig_ti", graph_conv="knn")
  shapes = lambda v: jax.tree_util.tree_map(lambda a: a.shape, v)
  assert shapes(svga_vars) == shapes(knn_vars)
  r = mv.profile("mobilevig_ti", graph_conv="knn")
  assert r["macs_by_tag"]["knn_distance"] == 49 * 49 * 256 * 2   # two Graphers at 7x7, C=256


def test_bad_inputs_raise():
  model = mv.create_model("mobilevig_ti")
  with pytest.raises(ValueError, match="3 channels"):
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), jnp.zeros((1, 64, 64, 1)))
  with pytest.raises(ValueError, match="graph_conv"):
    bad = mv.create_model("mobilevig_ti", graph_conv="dense")
    jax.eval_shape(lambda x: bad.init(jax.random.PRNGKey(0), x), jnp.zeros((1, 64, 64, 3)))
