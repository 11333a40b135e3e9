"""Best evaluations of a run, and averaging of the k best EMA checkpoints (`mobilevis average`).

The papers report best epochs, not the last one: RepViT the raw model's best top-1 over all
evaluations, ParC-Net the average of its 5 best EMA checkpoints (cvnets `checkpoint_ema_avg.pt`).
`BestTracker` keeps, beside the training checkpoints of a work directory:

    <workdir>/best/best.json          {'raw': {'step', 'top1'}, 'ema': {...}, 'ema_top': [...]}
    <workdir>/best/raw/               variables checkpoint of the best raw top-1
    <workdir>/best/ema/               variables checkpoint of the best EMA top-1
    <workdir>/best/ema_top/<step>/    the `keep_best_ema` best EMA evaluations (for averaging)

Each is a `checkpoint.save_variables` directory (meta: model, kwargs, step, top1), so `mobilevis
eval`, `export` and `init_from` read them. The record survives a restart (it is re-read from
best.json). `average_variables` is the elementwise mean of parameters and BatchNorm statistics, as
cvnets averages the EMA state_dicts (buffers included).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mobilevis_jax import fs
from mobilevis_jax.train import checkpoint as ckpt_lib

_BEST = 'best'
_RECORD = 'best.json'


def best_dir(workdir: str) -> str:
  return fs.join(workdir, _BEST)


class BestTracker:
  """Saves the variables of the best raw / EMA evaluation (and the k best EMA ones)."""

  def __init__(self, workdir: str, *, keep_best_ema: int = 0, meta: dict | None = None) -> None:
    self.directory = best_dir(workdir)
    self.keep_best_ema = int(keep_best_ema)
    self.meta = dict(meta or {})
    path = fs.join(self.directory, _RECORD)
    self.record = json.loads(fs.read_text(path)) if fs.exists(path) else {'ema_top': []}
    self.record.setdefault('ema_top', [])

  def _save(self, sub: str, variables: Any, step: int, top1: float) -> None:
    target = fs.join(self.directory, sub)
    if jax.process_index() == 0:
      fs.rmtree(target)
    extra = {k: v for k, v in self.meta.items() if k != 'model_name'}
    ckpt_lib.save_variables(target, variables, model_name=self.meta.get('model_name', ''),
                            extra={**extra, 'step': int(step), 'top1': float(top1)})

  def update(self, step: int, results: dict[str, float], raw_variables: Any,
             ema_variables: Any | None) -> dict[str, float]:
    """Records `results` (eval/top1, eval_ema/top1) of `step`; returns best/* metrics to log.

    `*_variables` are host trees ({'params', 'batch_stats'?}); ema_variables None without EMA.
    """
    out = {}
    for kind, key, variables in (('raw', 'eval/top1', raw_variables),
                                 ('ema', 'eval_ema/top1', ema_variables)):
      if key not in results or variables is None:
        continue
      top1 = float(results[key])
      best = self.record.get(kind)
      if best is None or top1 > best['top1']:
        self._save(kind, variables, step, top1)
        self.record[kind] = {'step': int(step), 'top1': top1}
      out[f'best/{kind}_top1'] = self.record[kind]['top1']
      if kind == 'ema' and self.keep_best_ema > 0:
        self._update_top(step, top1, variables)
    self._write_record()
    return out

  def _update_top(self, step: int, top1: float, variables: Any) -> None:
    top = [e for e in self.record['ema_top'] if e['step'] != step]
    # Ties keep the earlier evaluation, as a strict '>' on the k-th best does.
    ranked = sorted(top + [{'step': int(step), 'top1': top1}],
                    key=lambda e: (-e['top1'], e['step']))
    keep, drop = ranked[:self.keep_best_ema], ranked[self.keep_best_ema:]
    if any(e['step'] == step for e in keep):
      self._save(f'ema_top/{step}', variables, step, top1)
    if jax.process_index() == 0:
      for e in drop:
        fs.rmtree(fs.join(self.directory, 'ema_top', str(e['step'])))
    self.record['ema_top'] = keep

  def _write_record(self) -> None:
    if jax.process_index() != 0:
      return
    fs.makedirs(self.directory)
    fs.write_text_atomic(fs.join(self.directory, _RECORD), json.dumps(self.record, indent=1))


def best_ema_checkpoints(workdir: str, k: int) -> list[str]:
  """The directories of the k best EMA evaluations of a work directory, best first."""
  path = fs.join(best_dir(workdir), _RECORD)
  if not fs.exists(path):
    raise FileNotFoundError(f'{workdir} has no {_BEST}/{_RECORD}: train with keep_best_ema > 0')
  top = json.loads(fs.read_text(path)).get('ema_top', [])
  if len(top) < k:
    raise ValueError(f'{workdir} kept {len(top)} best EMA checkpoints, fewer than k={k} '
                     '(raise keep_best_ema for the run, or lower k)')
  return [fs.join(best_dir(workdir), 'ema_top', str(e['step'])) for e in top[:k]]


def average_variables(trees: Sequence[Any]) -> Any:
  """Elementwise mean (in float64, returned in each leaf's dtype) of variables of one model."""
  if not trees:
    raise ValueError('nothing to average')
  structs = [jax.tree.structure(t) for t in trees]
  if any(s != structs[0] for s in structs[1:]):
    raise ValueError('the checkpoints to average hold different variable trees (different models?)')

  def mean(*xs):
    shapes = {np.shape(x) for x in xs}
    if len(shapes) != 1:
      raise ValueError(f'the checkpoints to average disagree in shape: {sorted(shapes)}')
    mean = np.sum([np.asarray(x, np.float64) for x in xs], 0) / len(xs)
    return mean.astype(np.asarray(xs[0]).dtype)

  return jax.tree.map(mean, *trees)


def average_checkpoints(paths: Sequence[str], out: str) -> dict:
  """Averages variables checkpoints (or work directories) into `out`; returns its meta."""
  loaded = [ckpt_lib.restore_variables(p) for p in paths]
  names = {m.get('model_name') for _, m in loaded}
  if len(names) > 1:
    raise ValueError(f'the checkpoints hold different models: {sorted(map(str, names))}')
  variables = average_variables([dict(v) for v, _ in loaded])
  meta = dict(loaded[0][1])
  model_name = meta.pop('model_name', '') or ''
  meta.pop('step', None)
  meta.pop('top1', None)
  meta['averaged'] = [{'path': fs.join(p), 'step': m.get('step'), 'top1': m.get('top1')}
                      for p, (_, m) in zip(paths, loaded)]
  ckpt_lib.save_variables(out, variables, model_name=model_name, extra=meta)
  return {'model_name': model_name, **meta}


def average_main(argv: list[str] | None = None) -> int:
  """`mobilevis average (--checkpoints DIR ... | --workdir DIR --k K) --out DIR`."""
  import argparse
  import sys
  parser = argparse.ArgumentParser(
      prog='mobilevis average',
      description='average variables checkpoints (e.g. the k best EMA ones of a run, as ParC-Net '
                  'reports)')
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument('--checkpoints', nargs='+', help='variables checkpoints or work directories')
  src.add_argument('--workdir',
                   help='a training work directory: average its k best EMA evaluations')
  parser.add_argument('--k', type=int, default=5,
                      help='with --workdir: how many best EMA checkpoints')
  parser.add_argument('--out', required=True, help='output variables checkpoint directory')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    paths = args.checkpoints or best_ema_checkpoints(args.workdir, args.k)
    meta = average_checkpoints(paths, args.out)
  except (ValueError, FileNotFoundError) as e:
    print(f'mobilevis average: error: {e}', file=sys.stderr)
    return 2
  print(f'averaged {len(paths)} checkpoints of {meta["model_name"] or "?"} into {args.out}')
  return 0
