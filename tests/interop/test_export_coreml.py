"""``mobilevis export --format coreml`` / ``interop.coreml_export.export_coreml``.

One model per family, the smallest, at a tiny resolution (ParC-Net and the ParC-ConvNets at a
non-square one): a coremltools conversion costs 15-60 s of CPU per model whatever the
resolution (its graph passes scale with the op count), so converting all 29 registered models
would take ~15 min; the families share their blocks, so the smallest of each covers its ops.
ParameterNet/GhostNet: ghostnet_050 whole, and the dynamic convolutions in a two-group
half-width slice of ParameterNet (parameternet_300m's conversion alone takes ~70 s on a loaded
2-core machine; the slice has every kind of dynamic conv it has: the 3x3 stem, 1x1 and depthwise
ghost convs, the strided depthwise conv). RegNetY goes through the CLI from an orbax checkpoint. Prediction needs macOS, so the
checks read the produced spec: input/output names and shapes, op types (all core ML-program ops
of the iOS 16 opset, no custom layer), the precision, the metadata. Then the bad inputs, each a
clear error with nothing left at the output path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mobilevis_jax import cli, interop
from tests.helpers import randomize_bn_, randomize_mobilevig_, randomize_repvit_

torch = pytest.importorskip("torch")
pytest.importorskip("coremltools")
from mobilevis_jax import torch_models  # noqa: E402  (needs torch)
from mobilevis_jax.interop import coreml_export  # noqa: E402

ct = coreml_export.import_coremltools()

# name: (resolution (H, W), precision, model kwargs)
CASES = {
    "repvit_m0_6": ((32, 32), "fp16", {"distillation": True}),
    "mobilevig_ti": ((64, 64), "fp32", {}),
    "ghostnet_050": ((32, 32), "fp32", {}),
    "parcnet_xs": ((64, 96), "fp32", {}),
    "parc_mobilenetv2": ((64, 96), "fp32", {"num_classes": 10}),
}
CLI_MODEL, CLI_RESOLUTION = "regnety_002", 32


def _variables(name: str, **kwargs):
  module = torch_models.create_model(name, **kwargs)
  if name.startswith("repvit"):
    module = randomize_repvit_(module, seed=0, resolution=32)
  elif name.startswith("mobilevig"):
    module = randomize_mobilevig_(module, seed=0)
  else:
    module = randomize_bn_(module, seed=0)
  return interop.from_torch_state_dict(name, module.state_dict(),
                                       layout=torch_models.layout(name), **kwargs)


def _supported_op_types() -> set[str]:
  from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry
  target = getattr(ct.target, coreml_export.DEPLOYMENT_TARGET)
  return {op for op, versions in SSAOpRegistry.core_ops.items()
          if any(v <= target for v in versions)}


class Converted:
  def __init__(self, name: str, directory):
    self.name = name
    self.resolution, self.precision, self.kwargs = CASES[name]
    self.variables = _variables(name, **self.kwargs)
    self.path = os.path.join(directory, f"{name}.mlpackage")
    self.info = coreml_export.export_coreml(name, self.variables, self.path,
                                            resolution=self.resolution,
                                            precision=self.precision, **self.kwargs)


_CONVERTED: dict[str, Converted] = {}


def _converted(name, tmp_path_factory) -> Converted:
  if name not in _CONVERTED:  # one conversion per model for the whole module
    _CONVERTED[name] = Converted(name, tmp_path_factory.mktemp(name))
  return _CONVERTED[name]


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, tmp_path_factory):
  return _converted(request.param, tmp_path_factory)


def _check_spec(summary: dict, resolution, num_classes: int) -> None:
  assert summary["inputs"] == {"image": (1, 3, *resolution)}
  assert summary["outputs"] == {"logits": (1, num_classes)}
  unsupported = set(summary["ops"]) - _supported_op_types()
  assert not unsupported, f"ops outside the iOS16 ML-program opset: {sorted(unsupported)}"
  assert summary["ops"].get("conv", 0) > 10


def test_every_family_converts(converted):
  h = converted.info
  assert (h["model"], tuple(h["resolution"]), h["precision"]) == (
      converted.name, converted.resolution, converted.precision)
  fam = torch_models.family(converted.name)
  assert h["fused"] == (fam == "repvit") and h["baked"] == (fam in ("parcnet", "parc_convnets"))
  # Read back from disk: the package itself, not the in-memory model.
  summary = coreml_export.coreml_summary(converted.path)
  assert summary == {k: h[k] for k in ("inputs", "outputs", "ops", "precision")}
  _check_spec(summary, converted.resolution, converted.kwargs.get("num_classes", 1000))
  assert "fft" not in " ".join(summary["ops"])  # ParC: the baked conv form, no FFT
  spec = ct.utils.load_spec(converted.path)
  assert spec.WhichOneof("Type") == "mlProgram"  # (custom layers exist in neuralnetworks only)
  meta = dict(spec.description.metadata.userDefined)
  assert json.loads(meta["mobilevis_coreml"])["kwargs"] == converted.kwargs
  assert json.loads(meta["pretrained_cfg"])["input_size"][0] == 3


def test_fused_repvit_graph(tmp_path_factory):
  repvit = _converted("repvit_m0_6", tmp_path_factory).info
  # Fused RepViT: every BatchNorm folded, the two distillation heads merged into one Linear.
  assert "batch_norm" not in repvit["ops"] and repvit["ops"]["linear"] == 1


def test_parameternet_dynamic_convs_convert():
  from mobilevis_jax.torch_models import parameternet
  rows = parameternet.PARAMETERNET_ROWS[:3]  # 3x3 stem, stride-1 and stride-2 ghost bottlenecks
  module = randomize_bn_(parameternet.ParameterNet(rows, width=0.5, dynamic=True), seed=0).eval()
  n_dynamic = sum(isinstance(m, parameternet.DynamicConv) for m in module.modules())
  summary = coreml_export.coreml_summary(coreml_export.convert_module(module, (32, 32)))
  _check_spec(summary, (32, 32), 1000)
  # Each dynamic conv: a linear for its routing, a linear mixing the expert bank (routing
  # weights x bank), and a conv whose weight is that non-constant tensor.
  assert n_dynamic > 10 and summary["ops"]["linear"] == 2 * n_dynamic + 1
  assert summary["ops"]["conv"] >= n_dynamic


def test_parameternet_batch1_path_equals_the_folded_batch():
  # The batch-1 branch of CondConv2d (what Core ML traces) computes what the folded-batch form
  # computes for the same sample.
  module = randomize_bn_(torch_models.create_model("parameternet_300m"), seed=1)
  x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    both, first = module(x), module(x[:1])
  torch.testing.assert_close(first, both[:1], rtol=1e-5, atol=1e-5 * both.abs().max().item())


def _listing(directory) -> list[str]:
  return sorted(os.listdir(directory))


def test_cli_exports_an_orbax_checkpoint(tmp_path):
  from mobilevis_jax.train.checkpoint import save_variables
  ckpt = tmp_path / "ckpt"
  save_variables(str(ckpt), _variables(CLI_MODEL), model_name=CLI_MODEL,
                 extra={"model_kwargs": {}})
  out = tmp_path / "r.mlpackage"
  assert cli.main(["export", "--model", CLI_MODEL, "--checkpoint", str(ckpt), "--format",
                   "coreml", "--resolution", str(CLI_RESOLUTION), "--out", str(out)]) == 0
  summary = coreml_export.coreml_summary(out)
  _check_spec(summary, (CLI_RESOLUTION, CLI_RESOLUTION), 1000)
  assert summary["precision"] == "fp32"
  assert _listing(tmp_path) == ["ckpt", "r.mlpackage"]  # no temporary directory left
  # The checkpoint of another model is refused by name, before anything is written.
  other = tmp_path / "other.mlpackage"
  with pytest.raises(SystemExit, match=f"holds '{CLI_MODEL}', not 'ghostnet_050'"):
    cli.main(["export", "--model", "ghostnet_050", "--checkpoint", str(ckpt), "--format",
              "coreml", "--out", str(other)])
  with pytest.raises(SystemExit, match="precision must be one of fp32, fp16"):
    cli.main(["export", "--model", CLI_MODEL, "--checkpoint", str(ckpt), "--format", "coreml",
              "--precision", "int8", "--out", str(other)])
  assert not other.exists()


def test_variables_of_another_model_are_refused(tmp_path, tmp_path_factory):
  variables = _converted("ghostnet_050", tmp_path_factory).variables
  out = tmp_path / "r.mlpackage"
  with pytest.raises(interop.StateDictError, match="not those of regnety_002: .* missing"):
    coreml_export.export_coreml("regnety_002", variables, out, resolution=32)
  assert _listing(tmp_path) == []


def test_bad_paths_and_precisions(tmp_path, tmp_path_factory):
  variables = _converted("ghostnet_050", tmp_path_factory).variables
  export = coreml_export.export_coreml
  with pytest.raises(FileNotFoundError, match="missing"):
    export("ghostnet_050", variables, tmp_path / "missing" / "p.mlpackage")
  with pytest.raises(ValueError, match=r"\.mlpackage"):
    export("ghostnet_050", variables, tmp_path / "p.mlmodel")
  (tmp_path / "file.mlpackage").write_bytes(b"not a package")
  with pytest.raises(FileExistsError, match="not a .mlpackage directory"):
    export("ghostnet_050", variables, tmp_path / "file.mlpackage")
  with pytest.raises(ValueError, match="precision must be one of fp32, fp16, got 'int8'"):
    export("ghostnet_050", variables, tmp_path / "p.mlpackage", precision="int8")
  with pytest.raises(ValueError, match="resolution must be H or HxW"):
    export("ghostnet_050", variables, tmp_path / "p.mlpackage", resolution="32x")
  assert _listing(tmp_path) == ["file.mlpackage"]


def test_a_failed_save_leaves_the_previous_package(tmp_path, tmp_path_factory, monkeypatch):
  done = _converted("ghostnet_050", tmp_path_factory)
  out = tmp_path / "p.mlpackage"
  out.mkdir()
  (out / "previous").write_text("kept")
  mlmodel = ct.models.MLModel(done.path, skip_model_load=True)

  def half_written_save(self, path):
    os.makedirs(path)
    with open(os.path.join(path, "Manifest.json"), "w") as f:
      f.write("{")
    raise OSError("disk full")

  # The conversion itself is the cached one: only the write is under test.
  monkeypatch.setattr(ct, "convert", lambda *a, **k: mlmodel)
  monkeypatch.setattr(ct.models.MLModel, "save", half_written_save)
  with pytest.raises(OSError, match="disk full"):
    coreml_export.export_coreml("ghostnet_050", done.variables, out, resolution=32)
  assert _listing(tmp_path) == ["p.mlpackage"] and _listing(out) == ["previous"]


def test_replacing_a_package_is_all_or_nothing(tmp_path, monkeypatch):
  # (What export_coreml does once the new package is complete, without a conversion.)
  new, old, scratch = tmp_path / "new.mlpackage", tmp_path / "p.mlpackage", tmp_path / "scratch"
  for d, f in ((new, "new"), (old, "old"), (scratch, None)):
    d.mkdir()
    if f:
      (d / f).write_text(f)
  coreml_export._replace_dir(str(new), str(old), str(scratch))
  assert _listing(old) == ["new"] and not new.exists()
  # A failed final rename puts the previous package back.
  (tmp_path / "newer.mlpackage").mkdir()
  real = os.replace

  def fail_into_place(src, dst):
    if str(src).endswith("newer.mlpackage"):
      raise OSError("rename failed")
    real(src, dst)

  monkeypatch.setattr(os, "replace", fail_into_place)
  scratch2 = tmp_path / "scratch2"  # export_coreml's scratch directory is new at every export
  scratch2.mkdir()
  with pytest.raises(OSError, match="rename failed"):
    coreml_export._replace_dir(str(tmp_path / "newer.mlpackage"), str(old), str(scratch2))
  assert _listing(old) == ["new"] and (tmp_path / "newer.mlpackage").exists()


def test_coremltools_after_tensorflow_does_not_crash_the_process():
  # TensorFlow loaded first, then coremltools (which loads torchvision -> torch._dynamo ->
  # Triton): a segmentation fault without import_coremltools' precautions.
  code = ("import tensorflow, torch; from mobilevis_jax.interop.coreml_export import "
          "import_coremltools; ct = import_coremltools(); import torch._dynamo; print('alive')")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=600)
  assert out.returncode == 0 and out.stdout.strip().endswith("alive"), out.stderr[-2000:]


def test_import_does_not_load_coremltools_or_torch():
  code = ("import sys, mobilevis_jax.interop.coreml_export, mobilevis_jax.latency; "
          "print('coremltools' in sys.modules, 'torch' in sys.modules)")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       check=True)
  assert out.stdout.split() == ["False", "False"]
