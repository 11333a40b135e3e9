"""ParC-ConvNets (ParC-ConvNeXt-XT, ParC-ResNet50, ParC-MobileNetV2) against the official code.

* parameter counts and MACs equal the official modules' (numbers measured on the official files:
  parameters() and torch's FlopCounterMode, conv + linear MACs);
* logits equal our PyTorch reference of the official module tree (mobilevis_jax/torch_models) within 1e-4
  at 224 px, after a strict import of its state_dict, and the export reproduces that state_dict
  key for key, in order, with equal shapes and values;
* at other (also non-square) sizes, which the official fixed-size operators reject, the models
  equal the reference in its resampling mode (kernel and position embedding stretched with
  F.interpolate(align_corners=True), as ParC-Net does), here through the FFT path.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import mobilevis_jax as mv
from mobilevis_jax.interop import StateDictError, from_torch_state_dict, keymap, to_torch_state_dict
from mobilevis_jax.profiling import count_params
from tests.helpers import abstract_variables, randomize_bn_

NAMES = ("parc_convnext_xt", "parc_resnet50", "parc_mobilenetv2")

# Official numbers (../shared/reference/parc.md §3, re-measured on the official files).
OFFICIAL_PARAMS = {"parc_convnext_xt": 7_412_824, "parc_resnet50": 23_737_640,
                   "parc_mobilenetv2": 3_532_136}
OFFICIAL_MACS_224 = {"parc_convnext_xt": 1_139_222_400, "parc_resnet50": 3_941_466_112,
                     "parc_mobilenetv2": 301_997_312}
# norm + head / fc / last 1x1 conv-BN + classifier.
HEAD_PARAMS = {"parc_convnext_xt": 2 * 384 + 384 * 1000 + 1000, "parc_resnet50": 2048 * 1000 + 1000,
               "parc_mobilenetv2": 320 * 1280 + 2 * 1280 + 1280 * 1000 + 1000}
# The channel counts of the four feature maps (strides 4/8/16/32).
FEATURE_CHANNELS = {"parc_convnext_xt": (48, 96, 192, 384), "parc_resnet50": (256, 512, 1024, 2048),
                    "parc_mobilenetv2": (24, 32, 96, 320)}


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_and_macs(name):
  assert mv.model_info(name).family == "parc_convnets"
  variables = abstract_variables(mv.create_model(name), 224)
  assert count_params(variables) == OFFICIAL_PARAMS[name]
  prof = mv.profile(name)
  assert prof["params"] == OFFICIAL_PARAMS[name]
  assert prof["macs"] == OFFICIAL_MACS_224[name]
  assert prof["macs_by_tag"]["parc"] > 0  # the ParC operators are counted, not skipped


@pytest.mark.parametrize("name", NAMES)
def test_features_only(name):
  model = mv.create_model(name, features_only=True)
  x = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
  variables = abstract_variables(model, (64, 96))
  feats = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  assert len(feats) == 4
  for f, stride, c in zip(feats, (4, 8, 16, 32), FEATURE_CHANNELS[name]):
    assert f.shape == (2, 64 // stride, 96 // stride, c)
  # No head: exactly the classifier's parameters are missing.
  full = count_params(abstract_variables(mv.create_model(name), (64, 96)))
  assert full - count_params(variables) == HEAD_PARAMS[name]


@pytest.mark.parametrize("name", NAMES)
def test_fixed_size_mode_rejects_other_resolutions(name):
  model = mv.create_model(name, resample=False)
  abstract_variables(model, 224)  # the official size works
  with pytest.raises(ValueError, match="resample=False"):
    abstract_variables(model, 192)


def test_bad_input_is_rejected():
  model = mv.create_model("parc_mobilenetv2")
  with pytest.raises(ValueError, match="NHWC"):  # an NCHW batch
    jax.eval_shape(lambda r, x: model.init(r, x), jax.random.PRNGKey(0),
                   jax.ShapeDtypeStruct((1, 3, 64, 64), jnp.float32))


# ------------------------------------------------------------------------------ PyTorch parity
def _torch_reference(name, resample, seed=0):
  torch = pytest.importorskip("torch")
  from mobilevis_jax.torch_models import parc_convnets as ref
  torch.manual_seed(seed)
  model = ref.BUILDERS[name](resample=resample).eval()
  gen = torch.Generator().manual_seed(seed)
  randomize_bn_(model, gen)
  with torch.no_grad():  # non-zero biases/embeddings everywhere, so a mis-mapped one shows
    for key, p in model.named_parameters():
      if key.endswith(".bias") or key.endswith(".pe"):
        p.add_(0.02 * torch.randn(p.shape, generator=gen))
  return torch, model


def _torch_logits(torch, model, x_nhwc):
  with torch.no_grad():
    return model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)).numpy()


def _flax_logits(name, variables, x_nhwc, **kw):
  model = mv.create_model(name, **kw)
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x_nhwc))


def _close(a, b, tol=1e-4):
  scale = max(1.0, float(np.abs(b).max()))
  err = float(np.abs(a - b).max())
  assert err <= tol * scale, f"max |diff| {err:.3g} (logit scale {scale:.3g})"


@pytest.mark.parametrize("name", NAMES)
def test_parity_with_official_layout_at_224(name):
  torch, official = _torch_reference(name, resample=False)
  sd = official.state_dict()
  variables = from_torch_state_dict(name, sd)  # strict: raises on any missing/extra/misshaped key
  x = np.random.RandomState(1).randn(1, 224, 224, 3).astype(np.float32)
  logits = _flax_logits(name, variables, x)
  expected = _torch_logits(torch, official, x)
  _close(logits, expected)

  # Export: the same keys, in the official order, with the official shapes and values.
  exported = to_torch_state_dict(name, variables)
  assert list(exported) == list(sd)
  for key, value in sd.items():
    assert exported[key].shape == tuple(value.shape), key
    if not key.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
  # (equal keys, order, shapes and values: a strict torch load_state_dict of it succeeds)


@pytest.mark.parametrize("name", NAMES)
def test_parity_with_resampling_reference_at_other_sizes(name):
  # 96x64: every ParC kernel is resampled (H and W to different lengths, e.g. 14 -> 6 and 4).
  torch, reference = _torch_reference(name, resample=True, seed=2)
  variables = from_torch_state_dict(name, reference.state_dict())
  x = np.random.RandomState(3).randn(2, 96, 64, 3).astype(np.float32)
  logits = _flax_logits(name, variables, x, parc_method="fft")
  _close(logits, _torch_logits(torch, reference, x))


def test_strict_import_names_the_offending_keys():
  torch, official = _torch_reference("parc_mobilenetv2", resample=False)
  sd = dict(official.state_dict())
  sd.pop("features.13.gcc_W.pe")
  sd["features.10.gcc_H.pe"] = torch.zeros(1, 192, 14, 1)  # features 10 has no embedding
  sd["features.9.gcc_H.gcc_conv.weight"] = torch.zeros(192, 1, 1, 14)  # H kernel stored as W
  with pytest.raises(StateDictError) as err:
    from_torch_state_dict("parc_mobilenetv2", sd)
  msg = str(err.value)
  assert "features.13.gcc_W.pe" in msg and "features.10.gcc_H.pe" in msg
  assert "features.9.gcc_H.gcc_conv.weight" in msg


def test_dense_parc_kernel_shapes_in_resnet50():
  # ParC-ResNet50's ParC is dense (groups=1 in the official file): (128, 128, 14, 1) kernels.
  model = mv.create_model("parc_resnet50")
  variables = abstract_variables(model, 224)
  entries = keymap.get_layout("parc_convnets", "official")("parc_resnet50", model, variables)
  leaves = traverse_util.flatten_dict(variables)
  shapes = {e.torch_key: e.torch_shape_for(leaves[(e.collection,) + e.path].shape)
            for e in entries if e.collection is not None}
  assert shapes["layer3.3.parc_H.gcc_conv.weight"] == (128, 128, 14, 1)
  assert shapes["layer3.3.parc_W.gcc_conv.weight"] == (128, 128, 1, 14)
  assert shapes["layer3.3.parc_H.pe"] == (1, 128, 14, 1)
  assert shapes["layer4.2.parc_W.gcc_conv.weight"] == (256, 256, 1, 7)
  assert "layer3.2.conv2.weight" in shapes and "layer3.3.conv2.weight" not in shapes


def test_train_mode_matches_torch_and_updates_running_stats():
  # One training-mode step of ParC-MobileNetV2 (batch statistics, running-stat update) at 64 px.
  torch, reference = _torch_reference("parc_mobilenetv2", resample=True, seed=4)
  variables = from_torch_state_dict("parc_mobilenetv2", reference.state_dict())
  model = mv.create_model("parc_mobilenetv2", dropout=0.0)
  x = np.random.RandomState(5).randn(4, 64, 64, 3).astype(np.float32)
  logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x)
  reference.train()
  reference.classifier[0].p = 0.0
  with torch.no_grad():
    expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  _close(np.asarray(logits), expected, tol=1e-3)  # batch statistics amplify float32 noise
  exported = to_torch_state_dict("parc_mobilenetv2", {"params": variables["params"], **updates})
  for key in ("features.9.bn.running_var", "features.13.bn.running_mean", "features.18.1.running_var"):
    np.testing.assert_allclose(exported[key], reference.state_dict()[key].numpy(), rtol=1e-4,
                               atol=1e-5, err_msg=key)
