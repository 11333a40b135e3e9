"""``mobilevis export --format torch`` / ``interop.export_torch`` and ``mobilevis_jax.torch_models``.

For one model per family (two for ParameterNet/GhostNet: dynamic official and static timm
layouts), at tiny resolutions: random PyTorch weights -> JAX variables -> deployable file ->
``torch_models.load`` gives the JAX eval logits to 1e-4 of max |logit|, fused (RepViT) and with
baked ParC kernels (ParC-Net at a non-square resolution). Then the strict round trip and the bad
inputs, each a clear error with nothing left at the output path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import mobilevis_jax as mv
from mobilevis_jax import cli, interop
from tests.helpers import randomize_bn_, randomize_mobilevig_, randomize_repvit_
from tests.interop import export_cases

torch = pytest.importorskip("torch")
from mobilevis_jax import torch_models  # noqa: E402  (needs torch)

# name: (resolution (H, W), model kwargs): the converters' table, one model per family. The
# converter tests also take ParC-ConvNeXt-XT and ParC-ResNet50, whose graphs (large-kernel
# depthwise, dense ParC) each converter must accept; the packaged PyTorch modules of those two
# are checked against JAX at 224 px and at non-square sizes in tests/models/test_parc_convnets.py,
# so here the family is parc_mobilenetv2 (deployable export, baked ParC, loading).
CASES = {name: case for name, case in export_cases.CASES.items()
         if name not in ("parc_convnext_xt", "parc_resnet50")}


def _randomize(name: str, module):
  if name.startswith("repvit"):
    return randomize_repvit_(module, seed=0, resolution=32)
  if name.startswith("mobilevig"):
    return randomize_mobilevig_(module, seed=0)
  return randomize_bn_(module, seed=0)


class Exported:
  """Random weights of ``name`` as JAX variables, the JAX eval logits, and the exported file."""

  def __init__(self, name: str, directory):
    self.name = name
    self.resolution, self.kwargs = CASES[name]
    src = _randomize(name, torch_models.create_model(name, **self.kwargs))
    self.variables = interop.from_torch_state_dict(name, src.state_dict(),
                                                   layout=torch_models.layout(name), **self.kwargs)
    self.x = np.random.RandomState(0).rand(2, *self.resolution, 3).astype(np.float32)
    model = mv.create_model(name, **self.kwargs)
    self.logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(self.variables,
                                                                                 self.x))
    self.path = os.path.join(directory, f"{name}.safetensors")
    self.header = interop.export_torch(name, self.variables, self.path,
                                       resolution=self.resolution, **self.kwargs)

  def torch_logits(self, module) -> np.ndarray:
    with torch.no_grad():
      return module(torch.from_numpy(self.x).permute(0, 3, 1, 2)).numpy()


_EXPORTED: dict[str, Exported] = {}


def _exported(name: str, tmp_path_factory) -> Exported:
  # One JAX compile per model for the whole module (the bad-input tests reuse ghostnet_050).
  if name not in _EXPORTED:
    _EXPORTED[name] = Exported(name, tmp_path_factory.mktemp(name))
  return _EXPORTED[name]


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
  return _exported(request.param, tmp_path_factory)


def test_every_registered_model_has_a_torch_module():
  from mobilevis_jax.models import registry
  # The package's own models: other tests in the same process register test-only models.
  own = [n for n in mv.list_models()
         if registry.model_info(n).factory.__module__.startswith("mobilevis_jax.")]
  assert len(own) >= 28 and torch_models.list_models() == own
  for name in ("repvit_m0_6", "mobilevig_ti", "ghostnet_050", "parcnet_xs", "regnety_002"):
    assert isinstance(torch_models.create_model(name), torch.nn.Module)


def test_exported_module_matches_jax(exported):
  module = torch_models.load(exported.path)
  got = exported.torch_logits(module)
  assert got.shape == exported.logits.shape
  err = np.abs(got - exported.logits).max() / np.abs(exported.logits).max()
  assert err <= 1e-4, f"{exported.name}: max |torch - jax| / max |jax| = {err:.2e}"
  h = exported.header
  assert (h["model"], h["kwargs"], tuple(h["resolution"])) == (
      exported.name, exported.kwargs, exported.resolution)
  fam = torch_models.family(exported.name)
  assert h["fused"] == (fam == "repvit") and h["baked"] == (fam in ("parcnet", "parc_convnets"))
  if h["fused"]:  # the fused tree: no BatchNorm left, one Linear head
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())
  meta = interop.read_metadata(exported.path)
  assert json.loads(meta["pretrained_cfg"])["input_size"][0] == 3


def test_round_trip_is_strict(exported, tmp_path):
  from safetensors.torch import load_file, save_file
  module = torch_models.load(exported.path)
  stored = load_file(exported.path)
  assert sorted(module.state_dict()) == sorted(stored)
  for k, v in module.state_dict().items():
    assert torch.equal(v, stored[k]), k
  # A file with a tensor missing is refused by name, not silently filled with the init.
  meta = interop.read_metadata(exported.path)
  # (Not a num_batches_tracked: BatchNorm fills a missing one itself, for old checkpoints.)
  dropped = next(k for k in stored if not k.endswith("num_batches_tracked"))
  broken = tmp_path / "broken.safetensors"
  save_file({k: v for k, v in stored.items() if k != dropped}, str(broken), metadata=meta)
  with pytest.raises(RuntimeError, match=dropped.replace(".", r"\.")):
    torch_models.load(broken)


@pytest.mark.parametrize("name", ["parcnet_xs", "parc_mobilenetv2"])
def test_baked_module_refuses_another_resolution(name, tmp_path_factory):
  exported = _exported(name, tmp_path_factory)
  module = torch_models.load(exported.path)
  h, w = exported.resolution
  with pytest.raises(ValueError, match="baked"):
    with torch.no_grad():
      module(torch.zeros(1, 3, h + 32, w))


@pytest.fixture(scope="module")
def ghostnet(tmp_path_factory):
  return _exported("ghostnet_050", tmp_path_factory)


def _listing(directory) -> list[str]:
  return sorted(os.listdir(directory))


def test_cli_exports_an_orbax_checkpoint(ghostnet, tmp_path):
  from mobilevis_jax.train.checkpoint import save_variables
  ckpt = tmp_path / "ckpt"
  save_variables(str(ckpt), ghostnet.variables, model_name="ghostnet_050",
                 extra={"model_kwargs": {}})
  out = tmp_path / "g.safetensors"
  assert cli.main(["export", "--model", "ghostnet_050", "--checkpoint", str(ckpt), "--format",
                   "torch", "--resolution", "32", "--out", str(out)]) == 0
  got = ghostnet.torch_logits(torch_models.load(out))
  np.testing.assert_allclose(got, ghostnet.logits, atol=1e-4 * np.abs(ghostnet.logits).max())
  # The checkpoint of another model is refused by name, before anything is written.
  other = tmp_path / "other.safetensors"
  with pytest.raises(SystemExit, match="holds 'ghostnet_050', not 'regnety_002'"):
    cli.main(["export", "--model", "regnety_002", "--checkpoint", str(ckpt), "--format", "torch",
              "--out", str(other)])
  assert not other.exists()


@pytest.mark.parametrize("fmt, message", [("pickle", "unknown export format 'pickle'"),
                                          ("onnxx", "unknown export format 'onnxx'")])
def test_cli_rejects_unknown_formats(fmt, message, tmp_path):
  with pytest.raises(SystemExit, match=message):
    cli.main(["export", "--model", "ghostnet_050", "--checkpoint", str(tmp_path / "none"),
              "--format", fmt, "--out", str(tmp_path / "x.safetensors")])
  assert _listing(tmp_path) == []


def test_variables_of_another_model_are_refused(ghostnet, tmp_path):
  out = tmp_path / "r.safetensors"
  with pytest.raises(interop.StateDictError, match="not those of regnety_002: .* missing"):
    interop.export_torch("regnety_002", ghostnet.variables, out, resolution=32)
  assert _listing(tmp_path) == []


@pytest.mark.parametrize("resolution, message", [
    (0, "resolution must be positive"), ("32x", "resolution must be H or HxW"),
    (16, "cannot take a 16x16 input")])
def test_bad_resolutions(resolution, message, tmp_path):
  # parc_convnext_xt: a 4x4 stride-4 stem and three 2x2 stride-2 downsamples, all VALID, leave
  # nothing of a 16 px input. Abstract variables suffice: the error comes before any weight is read.
  from tests.helpers import abstract_variables
  variables = abstract_variables("parc_convnext_xt", 224)
  out = tmp_path / "p.safetensors"
  with pytest.raises(ValueError, match=message):
    interop.export_torch("parc_convnext_xt", variables, out, resolution=resolution)
  assert _listing(tmp_path) == []


def test_fixed_size_parc_at_another_resolution_is_refused(tmp_path_factory, tmp_path):
  exported = _exported("parc_mobilenetv2", tmp_path_factory)
  out = tmp_path / "p.safetensors"
  # The official operator (resample=False) is fixed to its 224 px lengths.
  with pytest.raises(ValueError, match="parc_mobilenetv2 cannot take a 64x64 input"):
    interop.export_torch("parc_mobilenetv2", exported.variables, out, resolution=64,
                         resample=False)
  assert _listing(tmp_path) == []


def test_missing_output_directory(ghostnet, tmp_path):
  out = tmp_path / "missing" / "g.safetensors"
  with pytest.raises(FileNotFoundError, match="missing"):
    interop.export_torch("ghostnet_050", ghostnet.variables, out, resolution=32)
  with pytest.raises(ValueError, match=r"\.safetensors"):
    interop.export_torch("ghostnet_050", ghostnet.variables, tmp_path / "g.pth", resolution=32)
  assert _listing(tmp_path) == []


def test_a_failed_write_leaves_the_previous_file(ghostnet, tmp_path, monkeypatch):
  import safetensors.torch
  out = tmp_path / "g.safetensors"
  out.write_bytes(b"previous")

  def fail(tensors, path, metadata=None):
    with open(path, "wb") as f:
      f.write(b"half")
    raise OSError("disk full")

  monkeypatch.setattr(safetensors.torch, "save_file", fail)
  with pytest.raises(OSError, match="disk full"):
    interop.export_torch("ghostnet_050", ghostnet.variables, out, resolution=32)
  assert out.read_bytes() == b"previous" and _listing(tmp_path) == ["g.safetensors"]


def test_unsupported_kwargs_are_named():
  with pytest.raises(ValueError, match="routing='sigmoid'"):
    torch_models.create_model("parameternet_300m", routing="softmax")
  with pytest.raises(TypeError, match="'graph_convolution'"):
    torch_models.create_model("mobilevig_ti", graph_convolution="knn")
  with pytest.raises(ValueError, match="no fused form"):
    torch_models.create_model("mobilevig_ti", fused=True)
  with pytest.raises(KeyError, match="did you mean"):
    torch_models.create_model("repvit_m0_66")


def test_import_mobilevis_jax_does_not_import_torch():
  code = ("import sys, mobilevis_jax, mobilevis_jax.interop, mobilevis_jax.cli; "
          "print('torch' in sys.modules)")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       check=True)
  assert out.stdout.strip() == "False"
