"""`mobilevis train` and `mobilevis eval`: flags only; the work happens in train.py.

    mobilevis train [--config NAME[:ARG] | PATH.py[:ARG]] --workdir DIR [--config.key=value ...]
    mobilevis eval  --config NAME[:ARG] --checkpoint DIR [--config.key=value ...]

NAME is a packaged recipe (`mobilevis_jax/configs/NAME.py`: repvit_m1_1_in1k, mobilevig_s_in1k,
parcnet_s_in1k, parameternet_600m_in22k, parameternet_600m_in22k_ft_in1k, default); ARG is passed
to its `get_config(ARG)`, e.g. `repvit_m1_1_in1k:runlocal` for the laptop-sized smoke version.
Without --config the default recipe (the embedded digits dataset) is used. Overrides use the
config's own types; an unknown key is an error naming it (`model_kwargs.*` keys are free).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates '--config.a.b=v' / '--config.a.b v' overrides from the other flags."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config.'):
      body = arg[len('--config.'):]
      if '=' not in body:
        if i + 1 >= len(argv):
          raise ValueError(f'{arg} needs a value')
        body = f'{body}={argv[i + 1]}'
        i += 1
      overrides.append(body)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _parse(argv, prog: str, checkpoint: bool):
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default=None,
                      help='packaged recipe name or config file, optionally :ARG (default: the '
                           'digits recipe)')
  if checkpoint:
    parser.add_argument('--checkpoint', required=True,
                        help='variables checkpoint (mobilevis import) or training work directory')
    parser.add_argument('--workdir', default=None, help='unused by eval; accepted for symmetry')
  else:
    parser.add_argument('--workdir', required=True,
                        help='checkpoints, metrics.jsonl and TensorBoard events')
  rest, overrides = _split_overrides(list(argv))
  args = parser.parse_args(rest)
  from mobilevis_jax.train.config import load_config  # here: `mobilevis --help` stays fast
  cfg = load_config(args.config, overrides)
  return args, cfg


def _run(argv: list[str] | None, command: str, work: Callable[..., dict]) -> int:
  """The skeleton of both commands: flags -> config -> distributed init -> work -> summary.

  Exit codes: 0 success, 2 a config or checkpoint error, 3 a non-finite loss (train only).
  """
  prog = f'mobilevis {command}'
  argv = sys.argv[1:] if argv is None else argv
  try:
    args, cfg = _parse(argv, prog, checkpoint=command == 'eval')
  except (ValueError, FileNotFoundError) as e:
    print(f'{prog}: error: {e}', file=sys.stderr)
    return 2
  # Here, not at the top: these load JAX (and the trainer); flag errors are reported without it.
  import jax

  from mobilevis_jax.train import distributed, train
  distributed.initialize_distributed(cfg.distributed)
  try:
    result = work(train, cfg, args)
  except train.NonFiniteLossError as e:
    print(f'{prog}: stopped: {e}', file=sys.stderr)
    return 3
  except (train.ConfigError, FileNotFoundError) as e:
    print(f'{prog}: error: {e}', file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    if 'eval/top1' in result:
      print(f"test accuracy (top-1): {100 * result['eval/top1']:.2f}% "
            f"on {int(result['eval/count'])} images")
    print(json.dumps(result))
  return 0


def main(argv: list[str] | None = None) -> int:
  """`mobilevis train`; returns 0 on success, 2 on a config error, 3 on a non-finite loss."""
  return _run(argv, 'train', lambda train, cfg, args: train.train_and_evaluate(cfg, args.workdir))


def eval_main(argv: list[str] | None = None) -> int:
  """`mobilevis eval`: top-1/top-5 of a checkpoint on the config's eval split (and fused if set)."""
  return _run(argv, 'eval',
              lambda train, cfg, args: train.evaluate_checkpoint(cfg, args.checkpoint))


if __name__ == '__main__':
  sys.exit(main())
