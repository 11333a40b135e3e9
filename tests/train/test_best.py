"""Best-eval tracking (raw and EMA top-1, the k best EMA kept) and `mobilevis average`."""

import json

import numpy as np
import pytest

from mobilevis_jax.train import best as best_lib
from mobilevis_jax.train import checkpoint as ckpt_lib


def _vars(value):
  return {'params': {'conv': {'kernel': np.full((3, 3, 2, 4), value, np.float32)}},
          'batch_stats': {'bn': {'mean': np.full((4,), 2 * value, np.float32)}}}


def test_tracker_keeps_best_raw_best_ema_and_k_best_ema(tmp_path):
  meta = {'model_name': 'trainer_test_tiny_cnn', 'model_kwargs': {'num_classes': 10}}
  tracker = best_lib.BestTracker(str(tmp_path), keep_best_ema=3, meta=meta)
  evals = {10: (0.30, 0.20), 20: (0.50, 0.40), 30: (0.45, 0.60), 40: (0.40, 0.55), 50: (0.20, 0.10)}
  for step, (raw, ema) in evals.items():
    out = tracker.update(step, {'eval/top1': raw, 'eval_ema/top1': ema}, _vars(step), _vars(-step))
  assert out == {'best/raw_top1': 0.50, 'best/ema_top1': 0.60}
  variables, m = ckpt_lib.restore_variables(str(tmp_path / 'best' / 'raw'))
  assert m['step'] == 20 and m['top1'] == 0.50 and m['model_name'] == 'trainer_test_tiny_cnn'
  np.testing.assert_array_equal(variables['params']['conv']['kernel'], 20)
  variables, m = ckpt_lib.restore_variables(str(tmp_path / 'best' / 'ema'))
  assert m['step'] == 30
  np.testing.assert_array_equal(variables['params']['conv']['kernel'], -30)
  # Only the 3 best EMA evaluations stay on disk, best first.
  assert sorted(p.name for p in (tmp_path / 'best' / 'ema_top').iterdir()) == ['20', '30', '40']
  assert best_lib.best_ema_checkpoints(str(tmp_path), 3) == [
      str(tmp_path / 'best' / 'ema_top' / s) for s in ('30', '40', '20')]
  # The record survives a restart: a worse evaluation after resuming changes nothing.
  again = best_lib.BestTracker(str(tmp_path), keep_best_ema=3, meta=meta)
  assert again.update(60, {'eval/top1': 0.1, 'eval_ema/top1': 0.1}, _vars(60), _vars(-60)) == out
  record = json.loads((tmp_path / 'best' / 'best.json').read_text())
  assert [e['step'] for e in record['ema_top']] == [30, 40, 20]
  with pytest.raises(ValueError, match='fewer than k=5'):
    best_lib.best_ema_checkpoints(str(tmp_path), 5)


def test_average_command_averages_the_k_best_ema_checkpoints(tmp_path, capsys):
  from mobilevis_jax import cli
  tracker = best_lib.BestTracker(str(tmp_path / 'run'), keep_best_ema=2,
                                 meta={'model_name': 'trainer_test_tiny_cnn'})
  for step, ema in ((1, 0.1), (2, 0.3), (3, 0.2)):
    tracker.update(step, {'eval/top1': 0.0, 'eval_ema/top1': ema}, _vars(0), _vars(step))
  assert cli.main(['average', '--workdir', str(tmp_path / 'run'), '--k', '2', '--out', str(tmp_path / 'avg')]) == 0
  variables, meta = ckpt_lib.restore_variables(str(tmp_path / 'avg'))
  np.testing.assert_allclose(variables['params']['conv']['kernel'], 2.5)      # steps 2 and 3
  np.testing.assert_allclose(variables['batch_stats']['bn']['mean'], 5.0)     # buffers too, as cvnets
  assert meta['model_name'] == 'trainer_test_tiny_cnn' and [a['step'] for a in meta['averaged']] == [2, 3]
  # Explicit checkpoints, and the errors.
  assert cli.main(['average', '--checkpoints', str(tmp_path / 'run' / 'best' / 'ema'),
                   str(tmp_path / 'run' / 'best' / 'raw'), '--out', str(tmp_path / 'avg2')]) == 0
  np.testing.assert_allclose(ckpt_lib.restore_variables(str(tmp_path / 'avg2'))[0]['params']['conv']['kernel'], 1.0)
  assert cli.main(['average', '--workdir', str(tmp_path / 'run'), '--k', '3', '--out', str(tmp_path / 'x')]) == 2
  assert 'fewer than k=3' in capsys.readouterr().err
  other = {'params': {'conv': {'kernel': np.zeros((3, 3, 2, 8), np.float32)}}}
  with pytest.raises(ValueError, match='different variable trees|disagree in shape'):
    best_lib.average_variables([_vars(1), other])
