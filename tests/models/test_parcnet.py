"""ParC-Net: parameter counts, official MAC convention, PyTorch parity, interop, variants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mobilevis_jax
from mobilevis_jax.interop import StateDictError, from_torch_state_dict, to_torch_state_dict
from mobilevis_jax.models import parcnet
from mobilevis_jax.profiling import count_params
from tests.helpers import abstract_variables, randomize_bn_


def abstract_init(name, resolution=64, **kw):
  model = mobilevis_jax.create_model(name, **kw)
  return model, abstract_variables(model, resolution)


@pytest.mark.parametrize("name,expected", [("parcnet_xs", 2_185_384), ("parcnet_s", 5_037_088),
                                           ("parcnet_h", 20_403_940)])
def test_parameter_counts_match_official(name, expected):
  _, variables = abstract_init(name)
  assert count_params(variables) == expected


def test_registry_metadata():
  info = mobilevis_jax.model_info("parcnet_s")
  assert (info.family, info.default_resolution, info.input_convention) == ("parcnet", 256, "parc_bgr")
  img = np.zeros((1, 2, 2, 3), np.uint8)
  img[..., 0] = 255  # pure red in RGB
  out = np.asarray(parcnet.preprocess(jnp.asarray(img)))
  np.testing.assert_array_equal(out[0, 0, 0], [0.0, 0.0, 1.0])  # BGR, /255, no mean/std


@pytest.mark.parametrize("name,official_m,counted_m", [("parcnet_xs", 962.3, 944.0),
                                                       ("parcnet_s", 1740.6, 1657.3),
                                                       ("parcnet_h", 8942.5, 8544.4)])
def test_macs_official_profiler_and_plain_count(name, official_m, counted_m):
  assert round(parcnet.official_profiler_macs(name, 256) / 1e6, 1) == official_m
  prof = mobilevis_jax.profile(name)  # plain conv/matmul counting (fvcore-like), incl. ParC taps
  assert round(prof["macs"] / 1e6, 1) == counted_m
  assert round(prof["macs_official"] / 1e6, 1) == official_m  # the hook, run by profile()


@pytest.fixture(scope="module")
def torch_s():
  torch = pytest.importorskip("torch")
  from mobilevis_jax.torch_models.parcnet import ParCNetRef
  torch.manual_seed(0)
  ref = ParCNetRef("s").eval()
  randomize_bn_(ref)
  with torch.no_grad():  # a head with O(1) logits so 1e-4 is a meaningful tolerance
    ref.classifier.fc.weight.normal_(0.0, 0.2)
    ref.classifier.fc.bias.normal_(0.0, 0.2)
  return ref


def test_state_dict_roundtrip_and_residual_quirk(torch_s):
  sd = torch_s.state_dict()
  assert sum(k.startswith("residual.") for k in sd) == 18 and len(sd) == 557
  variables = from_torch_state_dict("parcnet_s", sd)
  out = to_torch_state_dict("parcnet_s", variables)
  assert list(out) == list(sd)  # same keys, same order (residual.* between layer_2 and layer_3)
  for k, v in sd.items():
    np.testing.assert_array_equal(out[k], v.numpy(), err_msg=k)
  for k in out:
    if k.startswith("residual."):
      np.testing.assert_array_equal(out[k], out["layer_5.0." + k[len("residual."):]])


def test_strict_load_errors(torch_s):
  sd = {k: v.numpy() for k, v in torch_s.state_dict().items()}
  no_residual = {k: v for k, v in sd.items() if not k.startswith("residual.")}
  with pytest.raises(StateDictError, match="missing keys.*residual"):
    from_torch_state_dict("parcnet_s", no_residual)
  tampered = dict(sd)
  key = "residual.block.exp_1x1.block.conv.weight"
  tampered[key] = tampered[key] + 1.0
  with pytest.raises(StateDictError, match="differ from their original"):
    from_torch_state_dict("parcnet_s", tampered)
  with pytest.raises(StateDictError, match="unexpected keys.*extra"):
    from_torch_state_dict("parcnet_s", dict(sd, extra=np.zeros(1)))
  with pytest.raises(StateDictError, match="shape mismatches.*classifier"):
    from_torch_state_dict("parcnet_s", sd, num_classes=10)


def test_exported_weights_load_strictly_into_torch(torch_s):
  torch = pytest.importorskip("torch")
  from mobilevis_jax.torch_models.parcnet import ParCNetRef
  model = mobilevis_jax.create_model("parcnet_xs", num_classes=7)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  sd = to_torch_state_dict("parcnet_xs", variables, num_classes=7)
  ref = ParCNetRef("xs", num_classes=7)
  ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)


@pytest.mark.parametrize("resolution", [256, 224])
def test_logits_parity_with_torch_reference(torch_s, resolution):
  """256 uses the meta kernels as stored; 224 exercises kernel/PE resampling (28/14/7)."""
  torch = pytest.importorskip("torch")
  variables = from_torch_state_dict("parcnet_s", torch_s.state_dict())
  model = mobilevis_jax.create_model("parcnet_s")
  x = np.random.default_rng(resolution).uniform(0, 1, (2, resolution, resolution, 3)).astype(np.float32)
  with torch.no_grad():
    ref = torch_s(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  out = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables, jnp.asarray(x)))
  assert np.abs(ref).max() > 0.5
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_parc_methods_agree_and_non_square_input():
  """direct / fft / fused rfft2 give the same network; non-square inputs work."""
  model = mobilevis_jax.create_model("parcnet_xs", num_classes=5)
  x = jax.random.uniform(jax.random.PRNGKey(1), (1, 64, 96, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  outs = {m: np.asarray(jax.jit(mobilevis_jax.create_model("parcnet_xs", num_classes=5,
                                                           parc_method=m).apply)(variables, x))
          for m in ("direct", "fft", "fft2")}
  assert outs["direct"].shape == (1, 5)
  np.testing.assert_allclose(outs["fft"], outs["direct"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(outs["fft2"], outs["direct"], atol=1e-4, rtol=0)
  with pytest.raises(ValueError, match="parc_method"):
    jax.eval_shape(mobilevis_jax.create_model("parcnet_xs", parc_method="magic").init,
                   jax.random.PRNGKey(0), x)


def test_features_only_and_train_step():
  model = mobilevis_jax.create_model("parcnet_xs", features_only=True)
  x = jnp.ones((2, 64, 64, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  assert "classifier" not in variables["params"] and "conv_1x1_exp" not in variables["params"]
  train_fwd = jax.jit(lambda v, x, r: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                  rngs={"dropout": r}))
  feats, updates = train_fwd(variables, x, jax.random.PRNGKey(1))
  assert [f.shape for f in feats] == [(2, 16, 16, 64), (2, 8, 8, 96), (2, 4, 4, 128), (2, 2, 2, 160)]
  before = variables["batch_stats"]["layer_3_1"]["global_norm"]["mean"]
  after = updates["batch_stats"]["layer_3_1"]["global_norm"]["mean"]
  assert not np.allclose(before, after)  # running statistics moved
