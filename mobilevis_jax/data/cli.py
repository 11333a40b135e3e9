"""``mobilevis data prepare|stats``: run a TFDS builder, or print split sizes as JSON.

    mobilevis data prepare imagenet2012 --manual-dir /data/ilsvrc --data-dir /data/tfds
    mobilevis data prepare imagenet22k --config winter21 --manual-dir /data/in21k \\
        --data-dir /data/tfds --file-format array_record
    mobilevis data prepare imagenet22k --manual-dir /data/in21k_tars --data-dir /data/tfds \\
        --file-format array_record --beam-runner DirectRunner --num-workers 8
    mobilevis data prepare mobilevis_digits --data-dir /data/tfds
    mobilevis data stats imagenet2012 --data-dir /data/tfds
        -> last line: {"splits": {"train": 1281167, "validation": 50000}, "num_classes": 1000}
"""
from __future__ import annotations

import argparse
import json
import shlex

from mobilevis_jax.data.config import DATASETS


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="mobilevis data", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  prep = sub.add_parser("prepare", help="run the TFDS builder (download_and_prepare)")
  stats = sub.add_parser("stats", help="print split sizes and class count as JSON")
  for q in (prep, stats):
    q.add_argument("name", choices=DATASETS)
    q.add_argument("--data-dir", default="", help="TFDS data dir (default $TFDS_DATA_DIR or "
                   "~/tensorflow_datasets)")
    q.add_argument("--config", default="", help="builder config (imagenet22k: fall11|winter21)")
  prep.add_argument("--manual-dir", default="", help="directory holding the source archives")
  prep.add_argument("--file-format", default="tfrecord", choices=("tfrecord", "array_record"))
  prep.add_argument("--skip-corrupt", action="store_true",
                    help="imagenet22k: skip (count, log, record) undecodable images")
  prep.add_argument("--beam-runner", default="",
                    help="imagenet22k: prepare on Apache Beam with this runner (DirectRunner, "
                    "DataflowRunner, FlinkRunner, SparkRunner; needs the beam extra)")
  prep.add_argument("--num-workers", type=int, default=0,
                    help="DirectRunner: number of local worker processes (multi_processing)")
  prep.add_argument("--beam-options", default="",
                    help="further Beam pipeline options, one string, e.g. "
                    "\"--project=p --region=r --temp_location=gs://b/tmp\"")
  return p


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  from mobilevis_jax.data import sources
  if args.command == "prepare":
    builder = sources.prepare(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir,
                              builder_config=args.config, file_format=args.file_format,
                              skip_corrupt=args.skip_corrupt, beam_runner=args.beam_runner,
                              num_workers=args.num_workers,
                              beam_options=shlex.split(args.beam_options))
    print(f"prepared {builder.name} {builder.version} in {builder.data_dir}")
  else:
    builder = sources.get_builder(args.name, data_dir=args.data_dir, builder_config=args.config)
    if not builder.is_prepared():
      raise SystemExit(f"{args.name} is not prepared in {builder.data_dir}; run "
                       f"`mobilevis data prepare {args.name} ...` first")
  info = {"splits": {k: int(v.num_examples) for k, v in builder.info.splits.items()},
          "num_classes": int(builder.info.features["label"].num_classes)}
  print(json.dumps(info))
  return 0
