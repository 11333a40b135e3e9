"""The `mobilevis` command line: zoo table, and import/export through orbax checkpoints."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilevis_jax import cli, create_model, interop, model_info

MODEL = "repvit_m0_6"


def test_zoo_reports_params_macs_and_fuse_agreement(capsys, tmp_path):
  out_json = tmp_path / "zoo.json"
  assert cli.main(["zoo", "--models", MODEL, "--fuse-resolution", "32", "--json", str(out_json)]) == 0
  printed = capsys.readouterr().out
  assert MODEL in printed and "GMACs" in printed
  (row,) = json.loads(out_json.read_text())
  assert row["params"] == 2_487_292           # official, one head
  assert row["fused_params"] == 2_468_072     # official replace_batchnorm
  assert row["fuse_max_abs_diff"] < 1e-5


def test_zoo_rejects_unknown_pattern():
  with pytest.raises(ValueError, match="no registered model"):
    cli.main(["zoo", "--models", "nonexistent*"])


def test_import_then_export_round_trip(tmp_path):
  model = create_model(MODEL)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  official = interop.to_torch_state_dict(MODEL, variables, layout="official")
  interop.save_state_dict(official, tmp_path / "in.safetensors")
  ckpt = tmp_path / "ckpt"
  assert cli.main(["import", "--model", MODEL, "--weights", str(tmp_path / "in.safetensors"),
                   "--out", str(ckpt)]) == 0
  pytest.importorskip("torch")
  assert cli.main(["export", "--model", MODEL, "--checkpoint", str(ckpt), "--layout", "timm",
                   "--out", str(tmp_path / "out.pth")]) == 0
  exported = interop.load_state_dict(tmp_path / "out.pth")
  expected = interop.to_torch_state_dict(MODEL, variables, layout="timm")
  assert list(exported) == list(expected)
  for k in expected:
    np.testing.assert_array_equal(exported[k], expected[k], err_msg=k)


def test_export_carries_the_pretrained_cfg(tmp_path):
  """The exported file names its model and layout and holds the model's eval transform."""
  model = create_model(MODEL)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  from mobilevis_jax.train.checkpoint import save_variables
  save_variables(str(tmp_path / "ckpt"), variables, model_name=MODEL)
  out = tmp_path / "out.safetensors"
  assert cli.main(["export", "--model", MODEL, "--checkpoint", str(tmp_path / "ckpt"),
                   "--out", str(out)]) == 0
  meta = interop.read_metadata(out)
  assert (meta["mobilevis_model"], meta["layout"]) == (MODEL, "official")
  cfg = json.loads(meta["pretrained_cfg"])
  expected = model_info(MODEL).pretrained_cfg
  assert (cfg["crop_pct"], cfg["interpolation"], cfg["input_convention"]) == (
      expected.crop_pct, expected.interpolation, expected.input_convention)
  assert len(interop.load_state_dict(out)) == len(interop.to_torch_state_dict(MODEL, variables))


def test_export_refuses_a_checkpoint_of_another_model(tmp_path):
  from mobilevis_jax.train.checkpoint import save_variables
  model = create_model(MODEL)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  save_variables(str(tmp_path / "ckpt"), variables, model_name=MODEL)
  with pytest.raises(SystemExit, match=MODEL):
    cli.main(["export", "--model", "repvit_m0_9", "--checkpoint", str(tmp_path / "ckpt"),
              "--out", str(tmp_path / "x.safetensors")])
