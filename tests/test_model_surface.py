"""The timm-style model surface: ``create_model(pretrained=...)``, ``pretrained_cfg``,
``feature_info``, ``forward_features`` / ``forward_head``, head adaptation and ``reset_classifier``.

Checkpoints are written from random variables drawn at the abstract shapes (no init, no forward),
through this project's own exporters, through the PyTorch reference of the official code and
through timm; loading must give the same variables back, leaf for leaf.
"""
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mobilevis_jax as mv
from mobilevis_jax import interop, pretrained
from mobilevis_jax.interop import StateDictError
from mobilevis_jax.models import pretrained_cfgs
from mobilevis_jax.models.registry import abstract_variables, model_info
from mobilevis_jax.train import eval_transform
from mobilevis_jax.train.checkpoint import save_variables

# (model, layout, model kwargs of the checkpoint): the smallest variant of every family, in
# every layout it has.
SOURCES = [
    ("repvit_m0_6", "official", {"distillation": True}),
    ("repvit_m0_6", "timm", {"distillation": False}),
    ("mobilevig_ti", "official", {"distillation": True}),
    ("ghostnet_050", "timm", {}),
    ("parameternet_300m", "official", {}),
    ("parcnet_xs", "official", {}),
    ("parc_mobilenetv2", "official", {}),
    ("regnety_002", "timm", {}),
]
FAMILIES = sorted({model_info(n).family for n, _, _ in SOURCES})
# The package's models (the suite's other tests register toy models of their own).
MODELS = pretrained_cfgs.package_models()


def _random_variables(model, seed=0):
  """Random values at ``model``'s variable shapes (positive where they are variances)."""
  abstract = abstract_variables(model, 64)
  rng = np.random.default_rng(seed)
  flat = jax.tree_util.tree_flatten_with_path(abstract)
  leaves = []
  for path, s in flat[0]:
    if jax.tree_util.keystr(path).endswith("['var']"):
      leaves.append(rng.uniform(0.5, 2.0, s.shape).astype(np.float32))
    else:
      leaves.append((0.1 * rng.standard_normal(s.shape)).astype(np.float32))
  return jax.tree_util.tree_unflatten(flat[1], leaves)


def _assert_same(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(dict(a)), jax.tree_util.tree_leaves_with_path(dict(b))
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, u), (_, v) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  """Per source: (variables, .safetensors in its layout, orbax directory)."""
  root = tmp_path_factory.mktemp("surface")
  out = {}
  for i, (name, layout, kw) in enumerate(SOURCES):
    variables = _random_variables(mv.create_model(name, **kw), seed=i)
    path = root / f"{name}_{layout}.safetensors"
    interop.save_state_dict(interop.to_torch_state_dict(name, variables, layout=layout, **kw), path)
    orbax = root / f"{name}_{layout}_orbax"
    save_variables(str(orbax), variables, model_name=name, extra={"model_kwargs": kw})
    out[(name, layout)] = (variables, path, orbax)
  return out


# --- pretrained= ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,layout,kw", SOURCES, ids=[f"{n}-{l}" for n, l, _ in SOURCES])
def test_pretrained_torch_file_and_orbax_give_the_weights_back(made, name, layout, kw):
  variables, path, orbax = made[(name, layout)]
  for source in (path, orbax):
    model = mv.create_model(name, pretrained=str(source))
    assert model.scope is not None, "create_model(pretrained=) returns a bound module"
    for k, v in kw.items():  # detected from the keys / the meta, not passed
      assert getattr(model, k) == v, (source, k)
    plain, loaded = model.unbind()
    assert plain.scope is None
    _assert_same(variables, loaded)


def test_every_family_is_covered():
  assert FAMILIES == sorted({model_info(n).family for n in MODELS})


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
  """An official two-head RepViT .pth made by the PyTorch reference, and a timm GhostNet .pth."""
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  from mobilevis_jax.torch_models import repvit as R
  from tests.helpers import randomize_repvit_
  root = tmp_path_factory.mktemp("torch_files")
  official = randomize_repvit_(R.RepViT("repvit_m0_6", distillation=True), seed=1).state_dict()
  torch.save({"model": official}, root / "repvit_m0_6_official.pth")
  timm_sd = timm.create_model("ghostnet_050", pretrained=False).state_dict()
  torch.save(timm_sd, root / "ghostnet_050_timm.pth")
  return {"repvit": (root / "repvit_m0_6_official.pth", official),
          "ghostnet": (root / "ghostnet_050_timm.pth", timm_sd)}


def test_official_two_head_checkpoint_is_detected(torch_files):
  path, sd = torch_files["repvit"]
  assert pretrained.detect_torch_checkpoint("repvit_m0_6", sd) == (
      "official", {"distillation": True, "fused": False, "num_classes": 1000})
  model = mv.create_model("repvit_m0_6", pretrained=str(path))   # no distillation=True needed
  assert model.distillation and "head_dist" in model.variables["params"]
  _assert_same(interop.from_torch_state_dict("repvit_m0_6", sd, distillation=True), model.unbind()[1])


def test_timm_checkpoint_is_detected(torch_files):
  path, sd = torch_files["ghostnet"]
  assert pretrained.detect_torch_checkpoint("ghostnet_050", sd) == ("timm", {"num_classes": 1000})
  model = mv.create_model("ghostnet_050", pretrained=str(path))
  _assert_same(interop.from_torch_state_dict("ghostnet_050", sd, layout="timm"), model.unbind()[1])


def test_fused_and_one_head_checkpoints_are_detected(made):
  variables = made[("repvit_m0_6", "official")][0]
  fused_model, fused_vars = mv.fuse("repvit_m0_6", variables, distillation=True)
  sd = interop.to_torch_state_dict("repvit_m0_6", fused_vars, fused=True)
  assert pretrained.detect_torch_checkpoint("repvit_m0_6", sd) == (
      "official", {"distillation": True, "fused": True, "num_classes": 1000})
  one_head = made[("repvit_m0_6", "timm")][0]
  sd = interop.to_torch_state_dict("repvit_m0_6", one_head, layout="timm")
  assert pretrained.detect_torch_checkpoint("repvit_m0_6", sd)[1]["distillation"] is False


# --- head adaptation ---------------------------------------------------------------------------

def _backbone(variables, heads):
  return {c: {k: v for k, v in tree.items() if k not in heads} for c, tree in dict(variables).items()}


def test_num_classes_reinitialises_the_heads_and_logs_it(made, caplog):
  variables, path, _ = made[("repvit_m0_6", "official")]
  with caplog.at_level(logging.WARNING, logger="mobilevis_jax.pretrained"):
    model = mv.create_model("repvit_m0_6", pretrained=str(path), num_classes=10)
  assert "re-initialised head, head_dist" in caplog.text and "1000 classes" in caplog.text
  new = model.variables
  assert new["params"]["head"]["linear"]["kernel"].shape == (320, 10)
  assert new["params"]["head_dist"]["linear"]["kernel"].shape == (320, 10)
  # the official head init: BN (1, 0) with fresh statistics, Linear trunc_normal(0.02), bias 0
  np.testing.assert_array_equal(new["params"]["head"]["bn"]["scale"], np.ones(320))
  np.testing.assert_array_equal(new["batch_stats"]["head"]["bn"]["var"], np.ones(320))
  assert 0.01 < float(jnp.std(new["params"]["head"]["linear"]["kernel"])) < 0.03
  _assert_same(_backbone(variables, {"head", "head_dist"}), _backbone(new, {"head", "head_dist"}))


def test_distillation_and_features_only_drop_heads(made, caplog):
  variables, path, orbax = made[("repvit_m0_6", "official")]
  with caplog.at_level(logging.WARNING, logger="mobilevis_jax.pretrained"):
    one = mv.create_model("repvit_m0_6", pretrained=str(orbax), distillation=False)
  assert "dropped head_dist" in caplog.text
  assert set(one.variables["params"]) == set(variables["params"]) - {"head_dist"}
  _assert_same(variables["params"]["head"], one.variables["params"]["head"])
  feats = mv.create_model("repvit_m0_6", pretrained=str(path), features_only=True, out_indices=(1, -1))
  plain, fv = feats.unbind()
  assert "head" not in fv["params"] and "head_dist" not in fv["params"]
  assert [f["reduction"] for f in mv.feature_info("repvit_m0_6", out_indices=(1, -1))] == [8, 32]
  shapes = jax.eval_shape(lambda v, x: plain.apply(v, x), fv, jnp.zeros((1, 64, 64, 3)))
  assert [s.shape for s in shapes] == [(1, 8, 8, 80), (1, 2, 2, 320)]


def test_reset_classifier_on_variables(made):
  variables = made[("mobilevig_ti", "official")][0]
  model = mv.create_model("mobilevig_ti")
  new_model, new = mv.reset_classifier(model, variables, 3, distillation=False)
  assert new_model.num_classes == 3 and not new_model.distillation
  assert new["params"]["head"]["kernel"].shape == (512, 3) and "dist_head" not in new["params"]
  # the pooled embedding before the classifier is kept
  _assert_same(variables["params"]["prediction_conv"], new["params"]["prediction_conv"])
  heads = pretrained.head_modules(model)
  assert heads["head"] == {"prediction_conv", "prediction_bn", "head", "dist_head"}
  assert heads["classifier"] == {"head", "dist_head"} and heads["distillation"] == {"dist_head"}


# --- bad input -----------------------------------------------------------------------------------

def test_checkpoint_of_another_model_names_the_keys(made, tmp_path):
  other = _random_variables(mv.create_model("repvit_m0_9"))
  path = tmp_path / "m0_9.safetensors"
  interop.save_state_dict(interop.to_torch_state_dict("repvit_m0_9", other), path)
  with pytest.raises(StateDictError, match=r"features\.\d+\..*"):
    mv.create_model("repvit_m0_6", pretrained=str(path))
  save_variables(str(tmp_path / "m0_9"), other, model_name="repvit_m0_9")
  with pytest.raises(StateDictError, match=r"repvit_m0_9.*(missing|unexpected|shape).*stages_"):
    mv.create_model("repvit_m0_6", pretrained=str(tmp_path / "m0_9"))


def test_resolution_incompatible_weights_name_the_keys(tmp_path):
  # The official ParC-ConvNets have fixed-size ParC kernels: weights made for 256 px inputs carry
  # (64, 32, 16, 8)-long kernels and position embeddings where 224 px has (56, 28, 14, 7).
  kw = {"kernel_sizes": (64, 32, 16, 8)}
  variables = _random_variables(mv.create_model("parc_convnext_xt", **kw))
  path = tmp_path / "parc_convnext_xt_256.safetensors"
  interop.save_state_dict(interop.to_torch_state_dict("parc_convnext_xt", variables, **kw), path)
  with pytest.raises(StateDictError, match=r"shape mismatches.*stages\.2\.6\.gcc_H\.pe: "
                                           r"checkpoint \(1, 96, 16, 1\) vs model \(1, 96, 14, 1\)"):
    mv.create_model("parc_convnext_xt", pretrained=str(path))


def test_missing_and_truncated_files_fail_clearly(made, tmp_path):
  _, path, orbax = made[("repvit_m0_6", "official")]
  with pytest.raises(FileNotFoundError, match="nope.safetensors"):
    mv.create_model("repvit_m0_6", pretrained=str(tmp_path / "nope.safetensors"))
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
  with pytest.raises(pretrained.PretrainedFileError, match="truncated"):
    mv.create_model("repvit_m0_6", pretrained=str(cut))
  not_weights = tmp_path / "weights.npz"
  not_weights.write_bytes(b"not weights")
  with pytest.raises(pretrained.PretrainedFileError, match="use .safetensors or .pth"):
    mv.create_model("repvit_m0_6", pretrained=str(not_weights))
  # an orbax checkpoint with its array data cut off
  broken = tmp_path / "broken"
  shutil.copytree(orbax, broken)
  data = [os.path.join(d, f) for d, _, fs in os.walk(broken / "variables") for f in fs
          if os.path.getsize(os.path.join(d, f)) > 10_000]
  assert data
  for f in data:
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 3)
  with pytest.raises((pretrained.PretrainedFileError, StateDictError)):
    mv.create_model("repvit_m0_6", pretrained=str(broken))


# --- pretrained_cfg -------------------------------------------------------------------------------

def test_every_model_has_a_pretrained_cfg():
  assert pretrained_cfgs.missing_cfgs() == [] and len(MODELS) >= 26
  for name in MODELS:
    info, cfg = model_info(name), model_info(name).pretrained_cfg
    assert cfg.input_size == (3, info.default_resolution, info.default_resolution), name
    assert cfg.input_convention == info.input_convention, name
    assert cfg.interpolation in ("bicubic", "bilinear") and 0 < cfg.crop_pct <= 1, name
  repvit = model_info("repvit_m1_1").pretrained_cfg
  assert (repvit.crop_pct, repvit.timm().crop_pct) == (0.875, 0.95)   # official eval vs timm
  assert repvit.distillation and repvit.top1 == 80.7 and repvit.latency_ms[0] == 1.1
  parc = model_info("parcnet_s").pretrained_cfg
  assert parc.input_convention == "parc_bgr" and parc.crop_pct == pytest.approx(256 / 288)
  assert (parc.mean, parc.std) == ((0.0,) * 3, (1.0,) * 3)


def test_pretrained_cfg_sets_the_eval_transform(monkeypatch):
  import dataclasses
  tf = pytest.importorskip("tensorflow")
  from mobilevis_jax.data import config as data_config
  from mobilevis_jax.data import transforms
  image = tf.constant(np.random.default_rng(0).uniform(0, 255, (48, 40, 3)), tf.float32)

  def eval_image(data_cfg):
    img = transforms.resize_shorter_center_crop(image, 32, float(data_cfg.crop_pct),
                                                data_cfg.eval_interpolation)
    return transforms.normalize(img, data_cfg.normalization).numpy()

  recipe = data_config.default_data_config()
  parc = eval_transform.eval_data_config("parcnet_xs", recipe)
  assert (parc.normalization, parc.eval_interpolation, parc.crop_pct) == ("parc_bgr", "bilinear", 256 / 288)
  # a recipe value that is not the data default wins over the model's
  recipe_bicubic = recipe.copy_and_resolve_references()
  recipe_bicubic.normalization = "none"
  assert eval_transform.eval_data_config("parcnet_xs", recipe_bicubic).normalization == "none"

  before = eval_image(eval_transform.eval_data_config("repvit_m0_6", recipe))
  changed = dataclasses.replace(pretrained_cfgs._TABLE["repvit_m0_6"], crop_pct=0.5, interpolation="bilinear")
  monkeypatch.setitem(pretrained_cfgs._TABLE, "repvit_m0_6", changed)
  cfg = eval_transform.eval_data_config("repvit_m0_6", recipe)
  assert (cfg.crop_pct, cfg.eval_interpolation) == (0.5, "bilinear")
  assert np.abs(eval_image(cfg) - before).max() > 0.1


def test_mobilevis_eval_uses_the_pretrained_cfg(made, monkeypatch):
  """`mobilevis eval` of an imported checkpoint hands the model's transform to the data pipeline."""
  import dataclasses

  from mobilevis_jax import data
  from mobilevis_jax.train import train
  from mobilevis_jax.train.config import load_config
  seen = {}

  class Stop(Exception):
    pass

  class Source:  # the data source the trainer asks for: records the data config it is handed
    @staticmethod
    def dataset_info(data_cfg):
      seen["data"] = data_cfg
      raise Stop

  monkeypatch.setattr(data, "get_source", lambda name: Source)
  changed = dataclasses.replace(pretrained_cfgs._TABLE["repvit_m0_6"], crop_pct=0.6)
  monkeypatch.setitem(pretrained_cfgs._TABLE, "repvit_m0_6", changed)
  cfg = load_config(None)  # the default recipe
  with pytest.raises(Stop):
    train.evaluate_checkpoint(cfg, str(made[("repvit_m0_6", "official")][2]))
  assert seen["data"].crop_pct == 0.6 and cfg.data.crop_pct == 0.875  # the caller's cfg is untouched


# --- feature_info / forward_features / forward_head -----------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_feature_info_matches_the_features(name):
  info = mv.feature_info(name)
  model = mv.create_model(name, features_only=True)
  res = 96  # not the default resolution, so that reductions are checked, not echoed
  x = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
  feats = jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x)[0], x)
  assert [f["num_chs"] for f in info] == [f.shape[-1] for f in feats]
  assert [f["reduction"] for f in info] == [res // f.shape[1] for f in feats] == [4, 8, 16, 32]
  assert all(f["module"] for f in info)


FORWARD = [("repvit_m0_6", {"distillation": True}), ("mobilevig_ti", {}), ("ghostnet_050", {}),
           ("parcnet_xs", {}), ("parc_convnext_xt", {}), ("parc_resnet50", {}), ("parc_mobilenetv2", {})]


@pytest.mark.parametrize("name,kw", FORWARD, ids=[n for n, _ in FORWARD])
def test_forward_head_of_forward_features_is_the_model(name, kw):
  model = mv.create_model(name, num_classes=5, **kw)
  variables = _random_variables(model, seed=3)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 32, 32, 3))

  @jax.jit
  def run(v, x):
    feats = model.apply(v, x, method="forward_features")
    return (model.apply(v, x), model.apply(v, feats, method="forward_head"), feats,
            model.apply(v, feats, pre_logits=True, method="forward_head"))

  logits, head_logits, feats, pre = run(variables, x)
  np.testing.assert_allclose(head_logits, logits, rtol=1e-5, atol=1e-5)
  assert feats.shape[-1] == mv.feature_info(name)[-1]["num_chs"] and logits.shape == (1, 5)
  assert pre.ndim == 2 and pre.shape[0] == 1


def test_orbax_without_recorded_kwargs_infers_the_head(made, tmp_path):
  """A variables checkpoint saved without model_kwargs: classes and distillation read off the
  tree."""
  model = mv.create_model("mobilevig_ti", num_classes=10, distillation=False)
  variables = _random_variables(model, seed=5)
  save_variables(str(tmp_path / "v"), variables, model_name="mobilevig_ti")
  loaded = mv.create_model("mobilevig_ti", pretrained=str(tmp_path / "v"))
  assert (loaded.num_classes, loaded.distillation) == (10, False)
  _assert_same(variables, loaded.unbind()[1])
  with pytest.raises(ValueError, match="features_only=True"):
    mv.create_model("mobilevig_ti", out_indices=(0,))
