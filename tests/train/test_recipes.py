"""Every packaged recipe starts and trains: 2 steps of its `runlocal` version on fake ImageNet
(generated ILSVRC2012 tars through TFDS's own imagenet2012 builder) on 8 simulated CPU devices.

runlocal keeps what makes each recipe (its global-batch layout, repeated augmentation or
multi-scale batches, hard distillation from a teacher checkpoint, synchronised or per-device
BatchNorm, the schedule kind, the optimiser) and shrinks resolution, model and length; the
structure is checked here against the full recipe. The teacher is a tiny checkpoint made by the
worker. All recipes run in one worker process (one JAX start, one dataset build); each recipe's
outcome is its own test.
"""

import json
import os
import subprocess
import sys

import pytest

from mobilevis_jax.train import config as config_lib

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, 'worker.py')
ROOT = os.path.abspath(os.path.join(HERE, '..', '..'))
# The fine-tune starts from the 22K run's work directory, so the 22K recipe runs before it.
ORDER = ['default', 'repvit_m1_1_in1k', 'mobilevig_s_in1k', 'parcnet_s_in1k',
         'parameternet_600m_in22k', 'parameternet_600m_in22k_ft_in1k']
# Two worker processes, each a few recipes (~10 min on 2 cores, mostly XLA compiles): under
# `pytest -n 2 --dist loadgroup` each group is one xdist work unit, so the two run side by side
# and each is started once. '_bad_input' is the bad-override checks, run after the group's recipes.
GROUPS = {'recipes_a': ['default', 'repvit_m1_1_in1k', 'mobilevig_s_in1k'],
          'recipes_b': ['parcnet_s_in1k', 'parameternet_600m_in22k',
                        'parameternet_600m_in22k_ft_in1k', '_bad_input']}
GROUP_OF = {name: group for group, names in GROUPS.items() for name in names}
# Recipes that cannot run on 8 devices until the data pipeline's samplers are fixed (issue 10):
# ParC-Net's multi-scale batches (e.g. 163 images at 40x40 for base 64 at 64x64) are not
# multiples of the device count; cvnets' sampler makes every per-device batch divisible.
PIPELINE_BUGS: dict[str, str] = {}  # recipe -> known pipeline bug (strict xfail); none today
# What makes a recipe: runlocal must keep these fields equal to the full recipe's.
STRUCTURE = ('data.name', 'data.repeated_aug', 'data.normalization', 'data.randaugment',
             'data.mixup_alpha', 'data.cutmix_alpha', 'data.label_smoothing', 'distillation.type',
             'distillation.alpha', 'distillation.teacher_model', 'sync_batchnorm', 'half_precision',
             'optimizer.schedule', 'optimizer.weight_decay_rule', 'optimizer.agc_clip',
             'optimizer.layer_decay', 'optimizer.layer_decay_groups', 'ema_decay', 'model_kwargs',
             'init_exclude', 'keep_best_ema')


def test_every_packaged_recipe_is_in_the_test():
  assert sorted(ORDER) == config_lib.list_recipes()


def _get(cfg, key):
  for part in key.split('.'):
    cfg = cfg[part]
  return cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg


@pytest.mark.parametrize('name', ORDER)
def test_runlocal_keeps_the_recipe_structure(name):
  import mobilevis_jax
  full, local = config_lib.load_config(name), config_lib.load_config(f'{name}:runlocal')
  for key in STRUCTURE:
    assert _get(local, key) == _get(full, key), key
  assert mobilevis_jax.create_model  # the models both name are registered, of the same family
  for cfg in (full, local):
    assert cfg.model in mobilevis_jax.list_models()
  assert local.model.split('_')[0] == full.model.split('_')[0]
  assert local.data.image_size <= full.data.image_size and local.global_batch_size % 8 == 0
  if full.data.multi_scale:  # the scales keep their ratios to the base resolution
    ratios = [r / full.data.image_size for r in full.data.multi_scale]
    local_ratios = [r / local.data.image_size for r in local.data.multi_scale]
    assert local_ratios == pytest.approx(ratios)
  if full.data.repeated_aug > 1:
    assert local.global_batch_size % local.data.repeated_aug == 0


_RESULTS: dict[str, dict] = {}


def _run_group(tmp_path_factory, group: str) -> dict:
  """Runs one group's worker process (once per test process) and returns its JSON results."""
  if group not in _RESULTS:
    tmp = tmp_path_factory.mktemp(group)
    out = tmp / 'results.json'
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
               XLA_FLAGS='--xla_force_host_platform_device_count=8')
    proc = subprocess.run([sys.executable, WORKER, 'recipes', str(out), str(tmp), *GROUPS[group]],
                          capture_output=True, text=True, timeout=2700, env=env)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    results['_worker'] = {'code': proc.returncode, 'tail': (proc.stdout + proc.stderr)[-3000:]}
    _RESULTS[group] = results
  return _RESULTS[group]


@pytest.fixture
def runs(tmp_path_factory, request):
  return _run_group(tmp_path_factory, request.param)


def _params():
  out = []
  for name in ORDER:
    marks = [pytest.mark.xdist_group(GROUP_OF[name])]
    if name in PIPELINE_BUGS:
      marks.append(pytest.mark.xfail(strict=True, reason=PIPELINE_BUGS[name]))
    out.append(pytest.param(GROUP_OF[name], name, marks=marks, id=name))
  return out


def test_every_recipe_is_in_one_group():
  assert sorted(n for names in GROUPS.values() for n in names if n != '_bad_input') == sorted(ORDER)
  b = GROUPS['recipes_b']  # the fine-tune starts from the 22K run's work directory
  assert b.index('parameternet_600m_in22k') < b.index('parameternet_600m_in22k_ft_in1k')


@pytest.mark.parametrize(('runs', 'name'), _params(), indirect=['runs'])
def test_recipe_takes_two_steps_on_eight_devices(runs, name):
  assert runs.get('devices') == 8, runs.get('_worker')
  r = runs.get(name)
  assert r is not None, runs['_worker']
  assert r['code'] == 0, r.get('error', '') + r.get('traceback', '') + r.get('stderr', '')
  steps = [row for row in r['train'] if 'train/loss' in row]
  assert [row['step'] for row in steps] == [1, 2]
  for row in steps:
    assert row['train/loss'] == pytest.approx(row['train/loss']) and 0 < row['train/lr'] < 1
  result = r['result']
  cfg = config_lib.load_config(f'{name}:runlocal')
  count = 360 if cfg.data.name == 'mobilevis_digits' else 5  # the fake ImageNet has 5 val images
  assert result['step'] == 2 and result['eval/count'] == count and 0 <= result['eval/top1'] <= 1
  # The best evaluation is kept beside the latest checkpoint (and the EMA one when there is EMA).
  assert 'raw' in r['best'] and ('ema' in r['best']) == (cfg.ema_decay > 0)
  assert result['best/raw_top1'] == result['eval/top1']


@pytest.mark.xdist_group(GROUP_OF['_bad_input'])
@pytest.mark.parametrize('runs', [GROUP_OF['_bad_input']], indirect=True)
def test_bad_input_fails_before_the_first_step_saying_what_to_change(runs):
  bad = runs['_bad_input']
  small = bad['batch_below_devices']
  assert small['code'] == 2 and not small['stepped']
  assert 'global_batch_size=4 cannot be split over the 8 devices' in small['stderr']
  assert '--config.global_batch_size=8' in small['stderr']
  teacher = bad['wrong_teacher']
  assert teacher['code'] == 2 and not teacher['stepped']
  assert "holds 'trainer_test_tiny_cnn'" in teacher['stderr'] and 'teacher_model' in teacher['stderr']
