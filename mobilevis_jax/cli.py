"""The ``mobilevis`` command line.

    mobilevis zoo [--models PATTERN] [--fuse-resolution N]   table of params / MACs / fuse check
    mobilevis export --model NAME --checkpoint DIR --layout official|timm --out FILE
    mobilevis export --model NAME --checkpoint DIR --format torch [--resolution HxW] --out F.safetensors
    mobilevis import --model NAME --weights FILE --layout official|timm --out DIR
    mobilevis data prepare|stats ...                          TFDS datasets (mobilevis_jax.data.cli)
    mobilevis train|eval ...                                  the trainer (mobilevis_jax.train.main)
    mobilevis average (--checkpoints DIR ... | --workdir DIR --k K) --out DIR   mean of checkpoints

Subcommands that only dispatch import their module lazily, so ``mobilevis zoo`` does not pay for
TensorFlow.
"""
from __future__ import annotations

import argparse
import json
import sys


def _model_kwargs(args) -> dict:
  kw = {}
  if getattr(args, "num_classes", None) is not None:
    kw["num_classes"] = args.num_classes
  if getattr(args, "distillation", None) is not None:
    kw["distillation"] = args.distillation
  return kw


def _add_model_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", required=True, help="registered model name (see `mobilevis zoo`)")
  p.add_argument("--layout", default="official", help="PyTorch key layout: official or timm")
  p.add_argument("--num-classes", type=int, default=None)
  p.add_argument("--distillation", default=None, action=argparse.BooleanOptionalAction,
                 help="whether the model has the distillation head (default: the model's default)")


def cmd_zoo(args) -> int:
  from mobilevis_jax import zoo
  rows = zoo.zoo_table(args.models, fuse_resolution=args.fuse_resolution, check_fuse=args.check_fuse)
  print(zoo.format_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


# What `mobilevis export --format` writes: the state_dict in an official/timm layout (default), or
# the deployable PyTorch file (`mobilevis_jax.torch_models.load`). Issue #11 plans the others.
EXPORT_FORMATS = ("state_dict", "torch")
PLANNED_FORMATS = ("onnx", "tflite", "coreml")


def _check_export_format(fmt: str) -> None:
  if fmt in PLANNED_FORMATS:
    raise SystemExit(f"export format {fmt!r} is not implemented yet; available: "
                     f"{', '.join(EXPORT_FORMATS)}")
  if fmt not in EXPORT_FORMATS:
    raise SystemExit(f"unknown export format {fmt!r}; available: {', '.join(EXPORT_FORMATS)}")


def _export_torch(args, variables, kwargs) -> int:
  from mobilevis_jax import interop
  try:
    header = interop.export_torch(args.model, variables, args.out, resolution=args.resolution,
                                  fuse=args.fuse, **kwargs)
  except (ValueError, FileNotFoundError, interop.StateDictError) as e:
    raise SystemExit(f"export of {args.model} failed: {e}") from e
  h, w = header["resolution"]
  form = ", ".join(f for f, on in (("fused", header["fused"]), ("ParC kernels baked", header["baked"]))
                   if on) or "unfused"
  print(f"wrote {args.model} ({form}) for {h}x{w} inputs to {args.out}; "
        "load it with mobilevis_jax.torch_models.load(path)")
  return 0


def cmd_export(args) -> int:
  from mobilevis_jax import interop
  from mobilevis_jax.train.checkpoint import restore_variables
  _check_export_format(args.format)
  if args.format == "torch":
    # Fail before reading the checkpoint: a bad output path or resolution is known up front.
    from mobilevis_jax.interop.export import parse_resolution
    from mobilevis_jax.models import model_info
    from mobilevis_jax.torch_models import check_output_path
    try:
      model_info(args.model)
      check_output_path(args.out)
      parse_resolution(args.resolution, args.model)
    except (KeyError, ValueError, FileNotFoundError) as e:
      raise SystemExit(f"export of {args.model}: {e}") from e
  variables, meta = restore_variables(args.checkpoint)
  if meta.get("model_name") not in (None, args.model):
    raise SystemExit(f"checkpoint {args.checkpoint} holds {meta['model_name']!r}, not {args.model!r}")
  kwargs = {**meta.get("model_kwargs", {}), **_model_kwargs(args)}
  if args.format == "torch":
    return _export_torch(args, variables, kwargs)
  sd = interop.to_torch_state_dict(args.model, variables, layout=args.layout, **kwargs)
  # The file says how to feed the model: its pretrained_cfg (eval transform, input convention)
  # travels with the weights, so whoever loads them preprocesses as the model expects.
  import dataclasses

  from mobilevis_jax.models import model_info
  cfg = model_info(args.model).pretrained_cfg
  metadata = {"mobilevis_model": args.model, "layout": args.layout}
  if cfg is not None:
    metadata["pretrained_cfg"] = json.dumps(dataclasses.asdict(cfg))
  interop.save_state_dict(sd, args.out, metadata=metadata)
  print(f"wrote {len(sd)} tensors ({args.layout} layout) to {args.out}; eval transform: "
        + (f"crop_pct {cfg.crop_pct}, {cfg.interpolation}, {cfg.input_convention}" if cfg else "-"))
  return 0


def cmd_import(args) -> int:
  from mobilevis_jax import interop
  from mobilevis_jax.train.checkpoint import save_variables
  sd = interop.load_state_dict(args.weights, checkpoint_key=args.checkpoint_key)
  kwargs = _model_kwargs(args)
  variables = interop.from_torch_state_dict(args.model, sd, layout=args.layout, **kwargs)
  save_variables(args.out, variables, model_name=args.model, extra={"model_kwargs": kwargs,
                                                                  "source": str(args.weights)})
  print(f"imported {len(sd)} tensors from {args.weights} into {args.out}")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="mobilevis", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("zoo", help="parameters, MACs and fused/unfused agreement of every model")
  p.add_argument("--models", default="*", help="shell pattern over model names")
  p.add_argument("--fuse-resolution", type=int, default=64,
                 help="input size for the fused-vs-unfused logit check (default 64, to stay fast)")
  p.add_argument("--check-fuse", default=True, action=argparse.BooleanOptionalAction)
  p.add_argument("--json", default=None, help="also write the rows to this JSON file")
  p.set_defaults(func=cmd_zoo)

  p = sub.add_parser("export", help="orbax variables checkpoint -> PyTorch .safetensors/.pth")
  _add_model_args(p)
  p.add_argument("--checkpoint", required=True, help="variables checkpoint or training workdir")
  p.add_argument("--out", required=True, help="output file (.safetensors or .pth)")
  p.add_argument("--format", default="state_dict",
                 help="state_dict (default: the weights in --layout) or torch (a deployable "
                      "file of the packaged PyTorch module: fused, ParC kernels baked)")
  p.add_argument("--resolution", default=None,
                 help="--format torch: input size H or HxW (default: the model's)")
  p.add_argument("--fuse", default=True, action=argparse.BooleanOptionalAction,
                 help="--format torch: write the fused form where the family has one")
  p.set_defaults(func=cmd_export)

  p = sub.add_parser("import", help="PyTorch .safetensors/.pth -> orbax variables checkpoint")
  _add_model_args(p)
  p.add_argument("--weights", required=True, help="PyTorch weights (.safetensors or .pth)")
  p.add_argument("--checkpoint-key", default=None,
                 help="entry of a .pth training checkpoint holding the state_dict (default: model/state_dict)")
  p.add_argument("--out", required=True, help="output directory for the orbax checkpoint")
  p.set_defaults(func=cmd_import)

  for name, help_ in (("data", "prepare and inspect TFDS datasets"), ("train", "train a model"),
                      ("eval", "evaluate a checkpoint"),
                      ("average", "average checkpoints (e.g. the k best EMA ones of a run)")):
    sub.add_parser(name, help=help_, add_help=False)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  # These subcommands own their flags (ml_collections overrides, nested subcommands).
  if argv and argv[0] == "data":
    from mobilevis_jax.data.cli import main as data_main
    return data_main(argv[1:])
  if argv and argv[0] == "train":
    from mobilevis_jax.train.main import main as train_main
    return train_main(argv[1:])
  if argv and argv[0] == "eval":
    from mobilevis_jax.train.main import eval_main
    return eval_main(argv[1:])
  if argv and argv[0] == "average":
    from mobilevis_jax.train.best import average_main
    return average_main(argv[1:])
  args = build_parser().parse_args(argv)
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
