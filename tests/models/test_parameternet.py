"""GhostNet / ParameterNet: sizes against the official code and timm, MACs against fvcore's
convention (paper numbers stated alongside), PyTorch parity in both directions with strict loads,
multi-scale features, and the paper's "parameters up, FLOPs flat" claim."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mobilevis_jax import interop
from mobilevis_jax.models import create_model, list_models, model_info
from mobilevis_jax.profiling import count_params, profile
from tests.helpers import abstract_variables, randomize_bn_

# params: exact; macs: fvcore-style count of the official code (ours, see the reference notes),
# MACs at 224 as ``profile`` gives them. ``paper`` is what the papers report (FLOPs = MACs).
EXPECTED = {
    "ghostnet_050": dict(params=2_587_292, macs=42.3e6),       # timm ghostnet_050
    "ghostnet_100": dict(params=5_182_508, macs=141.2e6),      # paper: 5.2M params, 141M FLOPs
    "ghostnet_130": dict(params=7_358_820, macs=227.0e6),      # paper: 7.3M params, 226M FLOPs
    "ghostnet_600m": dict(params=19_822_198, macs=570.2e6),    # official cfg, static convs
    "parameternet_600m": dict(params=34_504_504, macs=598.4e6),  # official code; paper: 0.6G
    "ghostnet_300m": dict(params=8_633_106, macs=282.8e6),     # derived; paper fig.: ~290M
    "parameternet_300m": dict(params=15_737_100, macs=298.2e6),  # derived; paper fig.: ~300M
}
PAPER_MACS = {"ghostnet_100": 141e6, "ghostnet_130": 226e6, "parameternet_600m": 600e6,
              "ghostnet_300m": 290e6, "parameternet_300m": 300e6}


def _abstract_params(name, resolution=32, **kw):
  model = create_model(name, **kw)
  return model, abstract_variables(model, resolution)


def test_registry_lists_the_family():
  assert set(list_models("ghostnet*")) | set(list_models("parameternet*")) == set(EXPECTED)
  assert model_info("parameternet_600m").layouts == ("official",)
  assert model_info("ghostnet_100").layouts == ("timm",)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_params_and_macs(name):
  p = profile(name)
  want = EXPECTED[name]
  assert p["params"] == want["params"]
  assert abs(p["macs"] - want["macs"]) / want["macs"] < 0.002, p["macs_by_tag"]
  if name in PAPER_MACS:  # the papers' rounded figures, within the precision they are read at
    assert abs(p["macs"] - PAPER_MACS[name]) / PAPER_MACS[name] < 0.04


def test_parameternet_600m_composition():
  """88 dynamic convs exactly where the official code puts them; expert banks and routing sizes."""
  _, v = _abstract_params("parameternet_600m")
  flat = traverse_util.flatten_dict(v["params"])
  banks = {k[:-1]: x for k, x in flat.items() if k[-1] == "experts"}
  assert len(banks) == 88
  assert sum(x.size for x in banks.values()) == 19_412_456
  assert sum(x.size for k, x in flat.items() if "routing" in k) == 122_964
  where = {k[-1] if k[-1] != "conv" else k[-2] for k in banks}
  assert where == {"conv_stem", "primary_conv", "cheap_operation", "shortcut_dw", "shortcut_pw",
                   "blocks_9_0"}
  # Static in the official code: the stride-2 depthwise conv, SE, conv_head, classifier.
  assert ("blocks_1_0", "conv_dw", "kernel") in flat
  assert ("blocks_8_4", "se", "reduce", "kernel") in flat
  assert flat[("blocks_8_4", "ghost1", "primary_conv", "conv", "experts")].shape == (4, 277_248)
  assert flat[("blocks_9_0", "conv", "experts")].shape == (4, 554_496)


@pytest.mark.parametrize("experts, params, macs", [(1, 19_852_939, 583.7e6),
                                                   (8, 54_039_924, 617.9e6)])
def test_number_of_experts(experts, params, macs):
  """The paper's claim on the 600M model: parameters grow ~linearly in M, MACs barely move."""
  p = profile("parameternet_600m", num_experts=experts)
  assert p["params"] == params
  assert abs(p["macs"] - macs) / macs < 0.002
  assert p["macs_by_tag"]["dynamic_mixing"] == experts * 19_412_456 // 4


def test_parameters_up_flops_flat():
  static, dynamic = profile("ghostnet_600m"), profile("parameternet_600m")
  assert dynamic["params"] / static["params"] > 1.7
  assert dynamic["macs"] / static["macs"] < 1.06


def test_features_only_shapes_and_no_head():
  model, v = _abstract_params("parameternet_600m", features_only=True)
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  feats = jax.eval_shape(lambda v, x: model.apply(v, x), v, x)
  assert [f.shape for f in feats] == [(2, 16, 16, 44), (2, 8, 8, 76), (2, 4, 4, 212),
                                      (2, 2, 2, 304)]
  assert not {"conv_head", "classifier", "blocks_9_0"} & set(v["params"])


def test_train_step_updates_batch_stats_and_uses_rngs():
  """A 3-group GhostNet (train mode: BN batch statistics, dropout and drop path) stays cheap."""
  from mobilevis_jax.models.parameternet import GHOSTNET_V1_TABLE, GhostNet
  model = GhostNet(table=GHOSTNET_V1_TABLE[3:6], width=0.5, dynamic=True, num_experts=2,
                   drop_path_rate=0.2, num_classes=5)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
  # Filled from the abstract shapes: running model.init costs ~20 s of CPU (RNG compiles).
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(1), x), x)
  rng = np.random.default_rng(0)
  v = jax.tree_util.tree_map_with_path(
      lambda p, s: (jnp.ones(s.shape) if jax.tree_util.keystr(p).endswith("['var']")
                    else jnp.asarray(0.1 * rng.standard_normal(s.shape), jnp.float32)), shapes)

  @jax.jit
  def step(v, rng):
    return model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": rng})

  y1, upd = step(v, jax.random.PRNGKey(2))
  y2, _ = step(v, jax.random.PRNGKey(3))
  assert y1.shape == (4, 5) and np.isfinite(np.asarray(y1)).all()
  assert not np.allclose(y1, y2)  # dropout / drop path depend on the rng
  assert not np.allclose(v["batch_stats"]["bn1"]["mean"], upd["batch_stats"]["bn1"]["mean"])


def test_bad_inputs_and_layouts():
  with pytest.raises(ValueError, match="3 channels"):
    create_model("ghostnet_050").init(jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 1)))
  _, v = _abstract_params("ghostnet_050")
  with pytest.raises(ValueError, match="timm"):
    interop.to_torch_state_dict("ghostnet_050", v, layout="official")
  with pytest.raises(ValueError, match="routing"):
    model = create_model("parameternet_300m", routing="softmax")
    from mobilevis_jax.interop.parameternet import ghostnet_entries
    ghostnet_entries(model, _abstract_params("parameternet_300m", routing="softmax")[1])


# --- PyTorch parity ----------------------------------------------------------------------------

def _parity(name, torch_model, layout, resolution, capture=()):
  """Import torch weights (strict), compare logits, export back and strict-load into torch."""
  torch = pytest.importorskip("torch")
  randomize_bn_(torch_model).eval()
  sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  variables = interop.from_torch_state_dict(name, sd, layout=layout)
  model = create_model(name)
  x = np.random.RandomState(0).uniform(-2, 2, (2, 3, resolution, resolution)).astype(np.float32)

  def run(v, x):
    return model.apply(v, x, capture_intermediates=lambda m, _: m.name in capture,
                       mutable=["intermediates"])

  logits, inter = jax.jit(run)(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  with torch.no_grad():
    want = torch_model(torch.from_numpy(x)).numpy()
  assert np.abs(want).max() > 1e-2  # the comparison is not between two near-zero outputs
  np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=0)

  exported = interop.to_torch_state_dict(name, variables, layout=layout)
  assert list(exported) == list(torch_model.state_dict())  # same keys, same order
  torch_model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()},
                              strict=True)
  for k, v in torch_model.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), sd[k])
  return x, inter.get("intermediates", {})


def test_parameternet_600m_parity_224_and_stage_features():
  """The family's one full-resolution check: official module tree, logits and stage outputs."""
  torch = pytest.importorskip("torch")
  from mobilevis_jax.torch_models.parameternet import parameternet_600m
  ref = parameternet_600m()
  stage_ends = {"blocks_2_0": 2, "blocks_4_1": 4, "blocks_6_5": 6, "blocks_8_4": 8}
  x, inter = _parity("parameternet_600m", ref, "official", 224, capture=tuple(stage_ends))
  with torch.no_grad():
    stages = ref.forward_stages(torch.from_numpy(x))
  for name, i in stage_ends.items():
    got = np.asarray(inter[name]["__call__"][0])
    np.testing.assert_allclose(got, stages[i].numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=0)


def test_ghostnet_100_parity_with_timm():
  timm = pytest.importorskip("timm")
  pytest.importorskip("torch")
  _parity("ghostnet_100", timm.create_model("ghostnet_100"), "timm", 64)


def test_parameternet_300m_parity():
  pytest.importorskip("torch")
  from mobilevis_jax.torch_models.parameternet import parameternet_300m
  _parity("parameternet_300m", parameternet_300m(), "official", 64)


@pytest.mark.parametrize("name", ["ghostnet_600m", "ghostnet_300m", "ghostnet_050",
                                  "ghostnet_130"])
def test_static_twins_and_timm_variants_export_strict(name):
  """Keys and shapes only (logit parity of the static layout is covered by ghostnet_100)."""
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  from mobilevis_jax.torch_models import parameternet as refs
  ref = getattr(refs, name)() if name.endswith("m") else timm.create_model(name)
  _, v = _abstract_params(name)
  v = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, np.float32), v)
  sd = interop.to_torch_state_dict(name, v, layout="timm")
  assert list(sd) == list(ref.state_dict())
  ref.load_state_dict({k: torch.from_numpy(np.array(a)) for k, a in sd.items()}, strict=True)
  assert count_params(v) == sum(p.numel() for p in ref.parameters())
