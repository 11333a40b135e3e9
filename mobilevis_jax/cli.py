"""The ``mobilevis`` command line.

    mobilevis zoo [--models PATTERN] [--fuse-resolution N]   table of params / MACs / fuse check
    mobilevis export --model NAME --checkpoint DIR --layout official|timm --out FILE
    mobilevis export --model NAME --checkpoint DIR --format torch [--resolution HxW] --out F.safetensors
    mobilevis export --model NAME --checkpoint DIR --format coreml [--precision fp16] --out F.mlpackage
    mobilevis export --model NAME --checkpoint DIR --format onnx [--layout nchw|nhwc] --out F.onnx
    mobilevis export --model NAME --checkpoint DIR --format tflite [--quantize fp16|int8] --out F.tflite
    mobilevis import --model NAME --weights FILE --layout official|timm --out DIR
    mobilevis latency --model NAME [--format jax,torch|onnx|tflite|all] [--threads N] [--runs R]
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
  p.add_argument("--layout", default=None,
                 help="PyTorch key layout: official (default) or timm; --format onnx: the input "
                      "layout, nchw (default) or nhwc")
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
# the deployable PyTorch file (`mobilevis_jax.torch_models.load`), ONNX or LiteRT (`interop.deploy`),
# or a Core ML .mlpackage (through the PyTorch module).
EXPORT_FORMATS = ("state_dict", "torch", "onnx", "tflite", "coreml")


def _check_export_format(fmt: str) -> None:
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


def _export_coreml(args, variables, kwargs) -> int:
  from mobilevis_jax import interop
  from mobilevis_jax.interop.coreml_export import export_coreml
  try:
    info = export_coreml(args.model, variables, args.out, resolution=args.resolution,
                         fuse=args.fuse, precision=args.precision, **kwargs)
  except (ValueError, FileNotFoundError, interop.StateDictError) as e:
    raise SystemExit(f"export of {args.model} failed: {e}") from e
  (iname, ishape), = info["inputs"].items()
  (oname, oshape), = info["outputs"].items()
  form = "fused" if info["fused"] else "unfused"
  print(f"wrote {args.model} ({info['precision']}, {form}"
        f"{', ParC kernels baked' if info['baked'] else ''}) as a Core ML ML program to "
        f"{args.out}: {iname} {list(ishape)} -> {oname} {list(oshape)}, "
        f"{sum(info['ops'].values())} ops")
  return 0


def _export_graph(args, variables, kwargs) -> int:
  """``--format onnx|tflite``: the deployable JAX graph (``interop.deploy``) in that runtime."""
  from mobilevis_jax import interop
  opts = {"resolution": args.resolution, "fuse": args.fuse}
  try:
    if args.format == "onnx":
      from mobilevis_jax.interop.onnx_export import export_onnx
      info = export_onnx(args.model, variables, args.out, layout=args.layout or "nchw",
                         dynamic_batch=args.dynamic_batch, **opts, **kwargs)
    else:
      from mobilevis_jax.data.calibration import calibration_images
      from mobilevis_jax.interop.export import parse_resolution
      from mobilevis_jax.interop.tflite_export import export_tflite
      from mobilevis_jax.models import model_info
      calibration = None
      if args.quantize == "int8":
        dataset, _, split = args.calibration_data.partition(":")
        h, w = parse_resolution(args.resolution, args.model)
        if h != w:
          raise ValueError(f"int8 calibration images are square, the resolution is {h}x{w}")
        calibration = calibration_images(
            args.calibration_count, image_size=h, dataset=dataset, split=split or "train",
            normalization=model_info(args.model).input_convention)
      info = export_tflite(args.model, variables, args.out, quantize=args.quantize,
                           calibration=calibration, **opts, **kwargs)
  except (ValueError, FileNotFoundError, RuntimeError, interop.StateDictError) as e:
    raise SystemExit(f"export of {args.model} failed: {e}") from e
  form = "fused" if info["fused"] == "true" else "unfused"
  if info["parc_baked"] == "true":
    form += ", ParC kernels baked"
  if args.format == "tflite":
    form += f", {args.quantize or 'fp32'}"
  print(f"wrote {args.model} ({form}) for {info['resolution']} inputs, input "
        f"{info['input_shape']} ({info['layout'].upper()}), to {args.out}")
  return 0


def _check_graph_args(args) -> None:
  """Refuse flags of another format before the checkpoint is read."""
  if args.format == "onnx" and args.layout not in (None, "nchw", "nhwc"):
    raise SystemExit(f"--format onnx: --layout is the input layout, nchw or nhwc, not {args.layout!r}")
  if args.format != "onnx" and args.layout in ("nchw", "nhwc"):
    raise SystemExit(f"--layout {args.layout} is an input layout of --format onnx only")
  if args.quantize is not None and args.format != "tflite":
    raise SystemExit("--quantize applies to --format tflite only")
  suffix = {"onnx": ".onnx", "tflite": ".tflite"}.get(args.format)
  if suffix:
    from mobilevis_jax.interop.deploy import check_output_path
    from mobilevis_jax.interop.export import parse_resolution
    from mobilevis_jax.models import model_info
    try:
      model_info(args.model)
      check_output_path(args.out, suffix)
      parse_resolution(args.resolution, args.model)
    except (KeyError, ValueError, FileNotFoundError) as e:
      raise SystemExit(f"export of {args.model}: {e}") from e


def cmd_export(args) -> int:
  from mobilevis_jax import interop
  from mobilevis_jax.train.checkpoint import restore_variables
  _check_export_format(args.format)
  _check_graph_args(args)
  if args.format in ("torch", "coreml"):
    # Fail before reading the checkpoint: a bad output path or resolution is known up front.
    from mobilevis_jax.interop.export import parse_resolution
    from mobilevis_jax.models import model_info
    try:
      model_info(args.model)
      if args.format == "coreml":
        from mobilevis_jax.interop.coreml_export import check_coreml_path, check_precision
        check_coreml_path(args.out)
        check_precision(args.precision)
      else:
        from mobilevis_jax.interop.export import check_torch_output_path
        check_torch_output_path(args.out)
      parse_resolution(args.resolution, args.model)
    except (KeyError, ValueError, FileNotFoundError, FileExistsError) as e:
      raise SystemExit(f"export of {args.model}: {e}") from e
  variables, meta = restore_variables(args.checkpoint)
  if meta.get("model_name") not in (None, args.model):
    raise SystemExit(f"checkpoint {args.checkpoint} holds {meta['model_name']!r}, not {args.model!r}")
  kwargs = {**meta.get("model_kwargs", {}), **_model_kwargs(args)}
  if args.format == "torch":
    return _export_torch(args, variables, kwargs)
  if args.format == "coreml":
    return _export_coreml(args, variables, kwargs)
  if args.format in ("onnx", "tflite"):
    # How the checkpoint's model computed ParC is not a property of its weights; the export
    # picks a method the runtime has ('direct').
    kwargs.pop("parc_method", None)
    return _export_graph(args, variables, kwargs)
  args.layout = args.layout or "official"
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


def cmd_latency(args) -> int:
  from mobilevis_jax import latency
  from mobilevis_jax.models import model_info
  try:
    model_info(args.model)
    formats = latency.check_formats(args.format)
    if args.threads is not None and args.threads < 1:
      raise ValueError(f"--threads must be >= 1, got {args.threads}")
  except (KeyError, ValueError) as e:
    raise SystemExit(f"latency of {args.model}: {e.args[0] if e.args else e}") from e
  missing = {f: latency.unavailable(f) for f in formats}
  missing = {f: why for f, why in missing.items() if why}
  if missing and args.format != "all":
    raise SystemExit(f"latency of {args.model}: " + "; ".join(missing.values()))
  for why in missing.values():
    print(f"skipped: {why}")
  # Before JAX's backend starts (nothing above ran a JAX computation): XLA fixes its pool then.
  latency.limit_jax_threads(args.threads)
  try:
    rows = latency.measure(args.model, [f for f in formats if f not in missing],
                           threads=args.threads, runs=args.runs, warmup=args.warmup,
                           resolution=args.resolution, **_model_kwargs(args))
  except ValueError as e:
    raise SystemExit(f"latency of {args.model}: {e}") from e
  print(latency.format_table(rows, baseline=rows[0]["format"]))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


def cmd_import(args) -> int:
  from mobilevis_jax import interop
  from mobilevis_jax.train.checkpoint import save_variables
  sd = interop.load_state_dict(args.weights, checkpoint_key=args.checkpoint_key)
  kwargs = _model_kwargs(args)
  variables = interop.from_torch_state_dict(args.model, sd, layout=args.layout or "official",
                                            **kwargs)
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
  p.add_argument("--out", required=True,
                 help="output file (.safetensors or .pth; .onnx, .tflite for those formats)")
  p.add_argument("--format", default="state_dict",
                 help="state_dict (default: the weights in --layout), torch (a deployable "
                      "file of the packaged PyTorch module), onnx, tflite (LiteRT) or coreml; the last "
                      "four fused and with ParC kernels baked for --resolution")
  p.add_argument("--resolution", default=None,
                 help="--format torch|onnx|tflite: input size H or HxW (default: the model's)")
  p.add_argument("--fuse", default=True, action=argparse.BooleanOptionalAction,
                 help="--format torch|onnx|tflite|coreml: write the fused form where the family has one")
  p.add_argument("--dynamic-batch", default=True, action=argparse.BooleanOptionalAction,
                 help="--format onnx: a symbolic batch axis (default) or batch 1")
  p.add_argument("--quantize", default=None, choices=("fp16", "int8"),
                 help="--format tflite: float16 weights or full-integer int8 (default: float32)")
  p.add_argument("--calibration-data", default="mobilevis_digits:train",
                 help="--quantize int8: DATASET[:SPLIT] whose first images, through the eval "
                      "transform, calibrate the activation ranges (default mobilevis_digits:train)")
  p.add_argument("--calibration-count", type=int, default=128,
                 help="--quantize int8: number of calibration images (default 128)")
  p.add_argument("--precision", default="fp32",
                 help="--format coreml: fp32 (default) or fp16 compute precision")
  p.set_defaults(func=cmd_export)

  p = sub.add_parser("import", help="PyTorch .safetensors/.pth -> orbax variables checkpoint")
  _add_model_args(p)
  p.add_argument("--weights", required=True, help="PyTorch weights (.safetensors or .pth)")
  p.add_argument("--checkpoint-key", default=None,
                 help="entry of a .pth training checkpoint holding the state_dict (default: model/state_dict)")
  p.add_argument("--out", required=True, help="output directory for the orbax checkpoint")
  p.set_defaults(func=cmd_import)

  p = sub.add_parser("latency", help="batch-1 CPU latency in JAX, PyTorch, ONNX Runtime, LiteRT")
  p.add_argument("--model", required=True, help="registered model name (see `mobilevis zoo`)")
  p.add_argument("--format", default="jax,torch",
                 help="jax, torch, onnx, tflite, a comma-separated list, or all (default jax,torch)")
  p.add_argument("--threads", type=int, default=1,
                 help="threads per runtime (default 1; JAX: see mobilevis_jax.latency)")
  p.add_argument("--runs", type=int, default=50, help="timed calls per format (default 50)")
  p.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
  p.add_argument("--resolution", default=None, help="input size H or HxW (default: the model's)")
  p.add_argument("--num-classes", type=int, default=None)
  p.add_argument("--json", default=None, help="also write the rows to this JSON file")
  p.set_defaults(func=cmd_latency)

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
