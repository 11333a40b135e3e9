"""Configs, overrides, packaged recipes, schedule and weight-decay mask, bad-input errors."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from mobilevis_jax.train import config as config_lib
from mobilevis_jax.train import optim

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
RECIPES = config_lib.list_recipes()


def test_unknown_config_key_is_a_clear_error(capsys):
  from mobilevis_jax.train import main
  code = main.main(['--workdir', '/tmp/unused', '--config.optimizer.base_lrr=1e-3'])
  err = capsys.readouterr().err
  assert code == 2
  assert "unknown config key 'optimizer.base_lrr'" in err and 'optimizer.base_lr' in err
  with pytest.raises(ValueError, match="config key 'seed' is an int"):
    config_lib.apply_overrides(config_lib.base_config(), ['seed=abc'])
  with pytest.raises(ValueError, match='is a section'):
    config_lib.apply_overrides(config_lib.base_config(), ['optimizer=1'])


def test_overrides_keep_types():
  cfg = config_lib.apply_overrides(config_lib.base_config(), [
      'optimizer.base_lr=0.01', 'sync_batchnorm=true', 'data.multi_scale=(160,192)',
      'init_exclude=["^head/"]', 'model=repvit_m1_1'])
  assert cfg.optimizer.base_lr == 0.01 and cfg.sync_batchnorm is True
  assert tuple(cfg.data.multi_scale) == (160, 192) and tuple(cfg.init_exclude) == ('^head/',)
  assert cfg.model == 'repvit_m1_1'


@pytest.mark.parametrize('name', RECIPES)
def test_packaged_recipes_load_by_name_and_document_themselves(name):
  import mobilevis_jax
  path, _ = config_lib.resolve_recipe(name)
  assert os.path.dirname(path) == config_lib.configs_dir()
  doc = open(path).read().split('"""')[1]
  assert 'Run' in doc and 'mobilevis train --config ' + name in doc
  if name != 'default':
    for part in ('Paper:', 'Official command', 'Hardware:', 'Differences from'):
      assert part in doc, part
  for arg in (None, 'runlocal'):
    cfg = config_lib.load_config(name if arg is None else f'{name}:{arg}')
    assert cfg.model in mobilevis_jax.list_models()
    assert set(config_lib.base_config().keys()) <= set(cfg.keys())
    assert not any(k in str(cfg.to_dict()) for k in ('debug_step_sleep', 'synthetic_'))
  # By path too, with the same argument syntax.
  assert config_lib.load_config(path + ':runlocal').model == config_lib.load_config(name + ':runlocal').model


def test_docstring_commands_use_only_existing_keys():
  """Every --config.KEY in a recipe docstring is a key of that recipe (no dead fields)."""
  import re
  for name in RECIPES:
    path, _ = config_lib.resolve_recipe(name)
    doc = open(path).read().split('"""')[1]
    cfg = config_lib.load_config(name)
    for key in re.findall(r'--config\.([\w.]+)', doc):
      config_lib.apply_overrides(cfg, [f'{key}={_get(cfg, key)}'])


def _get(cfg, key):
  for part in key.split('.'):
    cfg = cfg[part]
  return cfg


def test_unknown_recipe_lists_the_packaged_ones():
  with pytest.raises(FileNotFoundError, match="no recipe named 'repvit_m1_1'") as err:
    config_lib.load_config('repvit_m1_1')
  assert 'did you mean repvit_m1_1_in1k' in str(err.value)
  for name in RECIPES:
    assert name in str(err.value)
  with pytest.raises(ValueError, match="unknown config argument 'runlocall'"):
    config_lib.load_config('repvit_m1_1_in1k:runlocall')


def test_model_kwargs_are_settable_from_the_command_line(capsys):
  cfg = config_lib.load_config('parcnet_s_in1k', [
      'model_kwargs.drop_path_rate=0.1', 'model_kwargs.parc_method=fft',
      'distillation.teacher_model_kwargs.num_classes=10'])
  assert cfg.model_kwargs.to_dict() == {'drop_path_rate': 0.1, 'parc_method': 'fft'}
  assert cfg.distillation.teacher_model_kwargs.num_classes == 10
  # An existing kwarg keeps its type; other sections still reject unknown keys.
  cfg = config_lib.load_config('repvit_m1_1_in1k', ['model_kwargs.distillation=false'])
  assert cfg.model_kwargs.distillation is False
  with pytest.raises(ValueError, match="unknown config key 'optimizer.drop_path_rate'"):
    config_lib.load_config('repvit_m1_1_in1k', ['optimizer.drop_path_rate=0.1'])
  # The model rejects a kwarg it does not take, naming the section, before anything is built.
  from mobilevis_jax.train import train
  with pytest.raises(train.ConfigError, match='does not accept model_kwargs'):
    train.build_model('repvit_m0_6', {'num_classes': 10, 'drop_path_rat': 0.1})
  with pytest.raises(train.ConfigError, match='not a registered model'):
    train.build_model('regnety_1600', {})


def test_batch_layout_errors_say_what_to_change():
  from mobilevis_jax.train import train
  cfg = config_lib.load_config('repvit_m1_1_in1k')
  train.check_batch_layout(cfg, 8)
  cfg.global_batch_size = 4
  with pytest.raises(train.ConfigError, match=r'global_batch_size=4 cannot be split over the 8 devices.*global_batch_size=8'):
    train.check_batch_layout(cfg, 8)
  cfg.global_batch_size, cfg.eval_batch_size = 2048, 1020
  with pytest.raises(train.ConfigError, match='eval_batch_size=1020 .* --config.eval_batch_size=1016 or 1024'):
    train.check_batch_layout(cfg, 8)


def test_train_step_layout_from_config():
  from mobilevis_jax.train import train
  cfg = config_lib.load_config('parameternet_600m_in22k')
  assert train.train_step_layout(cfg) == (None, 'elemental')  # the family's measured emitter
  cfg.train_step_programs, cfg.xla_cpu_grads_emitter = 'one', 'mlir'
  assert train.train_step_layout(cfg) == (False, 'mlir')
  cfg.train_step_programs = 'two'
  with pytest.raises(train.ConfigError, match="train_step_programs='two': use 'auto', 'split' or 'one'"):
    train.train_step_layout(cfg)
  cfg.train_step_programs, cfg.xla_cpu_grads_emitter = 'split', 'llvm'
  with pytest.raises(train.ConfigError, match="xla_cpu_grads_emitter must be 'auto' or one of"):
    train.train_step_layout(cfg)
  cfg = config_lib.load_config('repvit_m1_1_in1k')
  assert train.train_step_layout(cfg) == (None, 'mlir')


def test_wrong_teacher_checkpoint_fails_naming_the_fix(tmp_path):
  import jax

  from mobilevis_jax.train import checkpoint as ckpt_lib
  from mobilevis_jax.train import train
  from tests.train.tiny_model import TinyCNN
  tvars = jax.device_get(train.init_variables(TinyCNN(num_classes=10), jax.random.PRNGKey(0), 16))
  ckpt_lib.save_variables(str(tmp_path / 't'), tvars, model_name='trainer_test_tiny_cnn',
                          extra={'model_kwargs': {'num_classes': 10}})
  cfg = config_lib.load_config('repvit_m1_1_in1k', [f'distillation.teacher_checkpoint={tmp_path / "t"}'])
  with pytest.raises(train.ConfigError, match="holds 'trainer_test_tiny_cnn', but distillation.teacher_model='regnety_160'"):
    train.load_teacher(cfg, 10, 16)
  # The right name but another label set than the student's.
  cfg.distillation.teacher_model = 'trainer_test_tiny_cnn'
  with pytest.raises(train.ConfigError, match='predicts 10 classes and the student 1000'):
    train.load_teacher(cfg, 1000, 16)
  # Kwargs that disagree with the checkpoint: the shapes are checked against the teacher model.
  cfg.distillation.teacher_model_kwargs.width = 4
  with pytest.raises(train.ConfigError, match=r'params/head/kernel: checkpoint \(16, 10\) vs trainer_test_tiny_cnn \(8, 10\)'):
    train.load_teacher(cfg, 10, 16)
  del cfg.distillation.teacher_model_kwargs['width']
  model, variables = train.load_teacher(cfg, 10, 16)
  assert model.num_classes == 10 and 'params' in variables
  cfg.distillation.teacher_checkpoint = ''
  with pytest.raises(train.ConfigError, match='mobilevis import'):
    train.load_teacher(cfg, 10, 16)


def test_recipe_learning_rates():
  repvit = config_lib.load_config('repvit_m1_1_in1k')
  assert optim.peak_learning_rate(repvit.optimizer, repvit.global_batch_size) == pytest.approx(4e-3)
  vig = config_lib.load_config('mobilevig_s_in1k')
  assert optim.peak_learning_rate(vig.optimizer, vig.global_batch_size) == pytest.approx(2e-3)
  parc = config_lib.load_config('parcnet_s_in1k')
  sched = optim.learning_rate_schedule(parc.optimizer, global_batch_size=1024, steps_per_epoch=1251,
                                       total_steps=300 * 1251)
  np.testing.assert_allclose([sched(0), sched(3000), sched(300 * 1251 - 1)],
                             [4e-4, 4e-4 + 0.5 * 3.6e-3 * (1 + np.cos(np.pi * 2 / 300)),
                              4e-4 + 0.5 * 3.6e-3 * (1 + np.cos(np.pi * 299 / 300))], rtol=1e-5)


def test_schedule_per_step_warmup_then_cosine_over_the_whole_run():
  o = config_lib.base_config().optimizer
  o.base_lr, o.lr_scaling_batch, o.warmup_epochs, o.warmup_lr, o.min_lr = 1e-3, 512, 2.0, 1e-6, 1e-5
  o.schedule_unit = 'step'
  sched = optim.learning_rate_schedule(o, global_batch_size=1024, steps_per_epoch=10, total_steps=100)
  peak = 2e-3
  np.testing.assert_allclose(float(sched(0)), 1e-6, rtol=1e-5)
  np.testing.assert_allclose(float(sched(10)), (1e-6 + peak) / 2, rtol=1e-5)
  # timm, warmup_prefix=False: the cosine runs over the whole run, the warm-up included.
  np.testing.assert_allclose(float(sched(50)), 1e-5 + (peak - 1e-5) * 0.5, rtol=1e-4)
  np.testing.assert_allclose(float(sched(20)), 1e-5 + (peak - 1e-5) * 0.5 * (1 + np.cos(np.pi * 0.2)), rtol=1e-5)
  np.testing.assert_allclose(float(sched(100)), 1e-5, rtol=1e-4)


def test_weight_decay_masks():
  params = {'conv': {'kernel': jnp.zeros((3, 3, 4, 8)), 'bias': jnp.zeros(8)},
            'bn': {'scale': jnp.zeros(8), 'bias': jnp.zeros(8)},
            'block': {'layer_scale_2': {'scale': jnp.zeros(8)}},
            'head': {'kernel': jnp.zeros((8, 10)), 'bias': jnp.zeros(10)}}
  timm = optim.weight_decay_mask(params, 'timm')
  assert timm['conv'] == {'kernel': True, 'bias': False} and timm['head'] == {'kernel': True, 'bias': False}
  assert timm['bn'] == {'scale': False, 'bias': False} and timm['block']['layer_scale_2']['scale'] is False
  forced = optim.weight_decay_mask(params, 'timm', ('layer_scale_2/scale$',))
  assert forced['block']['layer_scale_2']['scale'] is True and forced['bn']['scale'] is False
  assert all(optim.weight_decay_mask(params, 'all').values().__iter__().__next__().values())
  with pytest.raises(ValueError, match='weight_decay_rule'):
    optim.weight_decay_mask(params, 'some')


def test_agc_clips_per_output_unit_like_timm():
  p = {'w': jnp.ones((1, 1, 2, 2))}            # HWIO: two output channels with norm sqrt(2)
  g = {'w': jnp.array([[[[10.0, 0.001], [10.0, 0.001]]]])}
  tx = optim.adaptive_grad_clip(0.02, eps=1e-3)
  out, _ = tx.update(g, tx.init(p), p)
  # channel 0: |g| = 10*sqrt(2) > 0.02*sqrt(2) -> scaled to norm 0.02*sqrt(2); channel 1 untouched.
  np.testing.assert_allclose(np.linalg.norm(out['w'][..., 0]), 0.02 * np.sqrt(2), rtol=1e-5)
  np.testing.assert_allclose(out['w'][..., 1], g['w'][..., 1])
  # Depthwise (kh, kw, 1, C): one norm per channel C, not one per tensor.
  p = {'dw': jnp.ones((3, 3, 1, 4))}
  g = {'dw': jnp.ones((3, 3, 1, 4)) * jnp.array([10.0, 1e-4, 10.0, 1e-4])}
  out, _ = tx.update(g, tx.init(p), p)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out['dw'])[..., 0]), 0.02 * 3, rtol=1e-5)
  np.testing.assert_array_equal(out['dw'][..., 1], g['dw'][..., 1])
