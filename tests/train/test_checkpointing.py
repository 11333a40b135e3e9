"""Checkpoints: SIGKILL mid-run + restart equals an uninterrupted run, a corrupt newest checkpoint
falls back to the previous one, a NaN loss stops the run keeping the last good checkpoint, and
variables-only checkpoints round-trip."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mobilevis_jax.train import checkpoint as ckpt_lib
from mobilevis_jax.train import train
from tests.train import tiny_config

WORKER = os.path.join(os.path.dirname(__file__), 'worker.py')
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
CONFIG = os.path.join(os.path.dirname(__file__), 'tiny_config.py')


def _cli(workdir, *overrides):
  return [sys.executable, WORKER, 'train', '--config', CONFIG, '--workdir', str(workdir), *overrides]


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)
  env.update(extra)
  return env


def _final_params(workdir):
  variables, meta = ckpt_lib.restore_variables(str(workdir))
  return variables, meta


def test_sigkill_and_restart_matches_uninterrupted_run(tmp_path):
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  ref = subprocess.Popen(_cli(straight), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  # Slow the second run down so it can be killed between checkpoints (every 4 steps of 24).
  victim = subprocess.Popen(_cli(killed), env=_env(MOBILEVIS_TEST_STEP_SLEEP='0.5'),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  ckpt_dir = killed / 'checkpoints'
  deadline = time.time() + 400
  while time.time() < deadline:
    done = [int(s) for s in os.listdir(ckpt_dir) if s.isdigit()] if ckpt_dir.exists() else []
    done = [s for s in done if (ckpt_dir / str(s) / 'commit_success.txt').exists()]
    if done and max(done) >= 8:
      break
    assert victim.poll() is None, victim.stdout.read().decode()
    time.sleep(0.2)
  else:
    pytest.fail('the run to be killed never reached step 8')
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert victim.returncode == -signal.SIGKILL
  out, _ = ref.communicate(timeout=600)
  assert ref.returncode == 0, out.decode()

  resumed = subprocess.run(_cli(killed), env=_env(), capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert 'resumed from step' in resumed.stdout
  a, meta_a = _final_params(straight)
  b, meta_b = _final_params(killed)
  assert meta_a['step'] == meta_b['step'] == 24
  # Bitwise: same compiled program, same data (a function of seed and step), same RNG key.
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _short_cfg(steps, **kw):
  cfg = tiny_config.get_config()
  cfg.num_train_steps = steps
  cfg.checkpoint_async = False
  for k, v in kw.items():
    node = cfg
    *parents, leaf = k.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = v
  return cfg


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, capsys):
  train.train_and_evaluate(_short_cfg(8), str(tmp_path))
  newest = tmp_path / 'checkpoints' / '8' / 'state'
  # Truncate every data file of the newest checkpoint (what a kill during a write leaves).
  for root, _, files in os.walk(newest):
    for f in files:
      if f not in ('commit_success.txt',):
        open(os.path.join(root, f), 'wb').close()
  capsys.readouterr()
  result = train.train_and_evaluate(_short_cfg(10), str(tmp_path))
  out = capsys.readouterr().out
  assert 'checkpoint at step 8' in out and 'falling back to step 4' in out, out
  assert 'resumed from step 4' in out
  assert result['step'] == 10


def test_nan_loss_stops_with_diagnostic_and_keeps_last_good_checkpoint(tmp_path):
  cfg = _short_cfg(20, **{'data.synthetic_nan_step': 9})  # the 10th batch is NaN
  with pytest.raises(train.NonFiniteLossError) as err:
    train.train_and_evaluate(cfg, str(tmp_path))
  msg = str(err.value)
  assert 'non-finite' in msg and 'at step 10' in msg and 'last good checkpoint is step 8' in msg
  steps = ckpt_lib.TrainCheckpointer(str(tmp_path), use_async=False).all_steps()
  assert max(steps) == 8
  variables, meta = ckpt_lib.restore_variables(str(tmp_path))
  assert meta['step'] == 8
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(variables))


def test_nan_loss_cli_exit_code(tmp_path):
  import tests.train.tiny_model  # noqa: F401
  from mobilevis_jax.train import main
  code = main.main(['--config', CONFIG, '--workdir', str(tmp_path), '--config.num_train_steps=6',
                    '--config.data.synthetic_nan_step=1', '--config.checkpoint_async=false'])
  assert code == 3


def test_variables_checkpoint_roundtrip_and_init_from(tmp_path):
  from tests.train.tiny_model import TinyCNN
  model = TinyCNN(num_classes=10)
  variables = jax.device_get(train.init_variables(model, jax.random.PRNGKey(3), 16))
  ckpt_lib.save_variables(str(tmp_path / 'v'), variables, model_name='trainer_test_tiny_cnn',
                          extra={'model_kwargs': {'num_classes': 10}})
  restored, meta = ckpt_lib.restore_variables(str(tmp_path / 'v'))
  assert meta['model_name'] == 'trainer_test_tiny_cnn'
  for x, y in zip(jax.tree.leaves(variables), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # init_from with a re-initialised head: head differs, the rest is loaded.
  fresh = jax.device_get(train.init_variables(TinyCNN(num_classes=7), jax.random.PRNGKey(4), 16))
  merged = train.merge_pretrained(fresh, restored, exclude=('^head/',))
  np.testing.assert_array_equal(merged['params']['stem']['conv']['kernel'], variables['params']['stem']['conv']['kernel'])
  np.testing.assert_array_equal(merged['params']['head']['kernel'], fresh['params']['head']['kernel'])
  with pytest.raises(ValueError, match='head/kernel'):
    train.merge_pretrained(fresh, restored)


def test_distillation_mixup_accumulation_bf16_and_init_from_run_together(tmp_path):
  """A short run with every option on: a hard-distillation teacher restored from a variables
  checkpoint, init_from the same checkpoint, mixup/cutmix, 2-way accumulation, bfloat16."""
  from tests.train.tiny_model import TinyCNN
  teacher = jax.device_get(train.init_variables(TinyCNN(num_classes=10, distillation=True),
                                                jax.random.PRNGKey(5), 16))
  ckpt_lib.save_variables(str(tmp_path / 'teacher'), teacher, model_name='trainer_test_tiny_cnn',
                          extra={'model_kwargs': {'num_classes': 10, 'distillation': True}})
  cfg = _short_cfg(3, **{'distillation.type': 'hard', 'distillation.teacher_checkpoint': str(tmp_path / 'teacher'),
                         'init_from': str(tmp_path / 'teacher'), 'data.mixup_alpha': 0.8,
                         'data.cutmix_alpha': 1.0, 'grad_accum_steps': 2, 'half_precision': True,
                         'log_every_steps': 1})
  cfg.model_kwargs.distillation = True
  result = train.train_and_evaluate(cfg, str(tmp_path / 'run'))
  assert result['step'] == 3 and 0.0 <= result['eval/top1'] <= 1.0
  import json
  rows = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
  losses = [r['train/loss'] for r in rows if 'train/loss' in r]
  assert len(losses) == 3 and all(np.isfinite(losses))
  # Without a teacher checkpoint the run refuses to start, naming the field.
  cfg.distillation.teacher_checkpoint = ''
  with pytest.raises(ValueError, match='teacher_checkpoint'):
    train.train_and_evaluate(cfg, str(tmp_path / 'run2'))


def test_eval_command_on_a_variables_checkpoint(tmp_path, capsys):
  from mobilevis_jax.train import main
  from tests.train.tiny_model import TinyCNN
  variables = jax.device_get(train.init_variables(TinyCNN(num_classes=10), jax.random.PRNGKey(3), 16))
  ckpt_lib.save_variables(str(tmp_path / 'v'), variables, model_name='trainer_test_tiny_cnn',
                          extra={'model_kwargs': {'num_classes': 10}})
  assert main.eval_main(['--config', CONFIG, '--checkpoint', str(tmp_path / 'v')]) == 0
  out = capsys.readouterr().out
  import json
  result = json.loads(out.strip().splitlines()[-1])
  assert result['eval/count'] == 64 and 0.0 <= result['eval/top1'] <= result['eval/top5'] <= 1.0
  assert main.eval_main(['--config', CONFIG, '--checkpoint', str(tmp_path / 'missing')]) == 2
  assert 'neither a variables checkpoint' in capsys.readouterr().err
