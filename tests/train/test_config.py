"""Configs, overrides, schedule and weight-decay mask."""

import glob
import os

import jax.numpy as jnp
import numpy as np
import pytest

from mobilevis_jax.train import config as config_lib
from mobilevis_jax.train import optim

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
RECIPES = sorted(glob.glob(os.path.join(ROOT, 'experiments', 'configs', '*.py')))


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


@pytest.mark.parametrize('path', RECIPES, ids=[os.path.basename(p) for p in RECIPES])
def test_recipe_files_load_and_name_registered_models(path):
  import mobilevis_jax
  module_doc = open(path).read().split('"""')[1]
  assert 'Run' in module_doc and ('Paper' in module_doc or 'paper' in module_doc)
  cfg = config_lib.load_config(path)
  assert cfg.model in mobilevis_jax.list_models()
  assert set(config_lib.base_config().keys()) <= set(cfg.keys())


def test_recipe_learning_rates():
  repvit = config_lib.load_config(os.path.join(ROOT, 'experiments/configs/repvit_m1_1_in1k.py'))
  assert optim.peak_learning_rate(repvit.optimizer, repvit.global_batch_size) == pytest.approx(4e-3)
  vig = config_lib.load_config(os.path.join(ROOT, 'experiments/configs/mobilevig_s_in1k.py'))
  assert optim.peak_learning_rate(vig.optimizer, vig.global_batch_size) == pytest.approx(2e-3)
  parc = config_lib.load_config(os.path.join(ROOT, 'experiments/configs/parcnet_s_in1k.py'))
  sched = optim.learning_rate_schedule(parc.optimizer, global_batch_size=1024, steps_per_epoch=1251,
                                       total_steps=300 * 1251)
  np.testing.assert_allclose([sched(0), sched(3000), sched(300 * 1251)], [4e-4, 4e-3, 4e-4], rtol=1e-5)


def test_schedule_warmup_cosine_min_lr():
  o = config_lib.base_config().optimizer
  o.base_lr, o.lr_scaling_batch, o.warmup_epochs, o.warmup_lr, o.min_lr = 1e-3, 512, 2.0, 1e-6, 1e-5
  sched = optim.learning_rate_schedule(o, global_batch_size=1024, steps_per_epoch=10, total_steps=100)
  peak = 2e-3
  np.testing.assert_allclose(float(sched(0)), 1e-6, rtol=1e-5)
  np.testing.assert_allclose(float(sched(10)), (1e-6 + peak) / 2, rtol=1e-5)
  np.testing.assert_allclose(float(sched(20)), peak, rtol=1e-5)
  np.testing.assert_allclose(float(sched(60)), 1e-5 + (peak - 1e-5) * 0.5, rtol=1e-4)  # cosine midpoint
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
  import optax
  p = {'w': jnp.ones((1, 1, 2, 2))}            # HWIO: two output channels with norm sqrt(2)
  g = {'w': jnp.array([[[[10.0, 0.001], [10.0, 0.001]]]])}
  tx = optax.adaptive_grad_clip(0.02, eps=1e-3)
  out, _ = tx.update(g, tx.init(p), p)
  # channel 0: |g| = 10*sqrt(2) > 0.02*sqrt(2) -> scaled to norm 0.02*sqrt(2); channel 1 untouched.
  np.testing.assert_allclose(np.linalg.norm(out['w'][..., 0]), 0.02 * np.sqrt(2), rtol=1e-5)
  np.testing.assert_allclose(out['w'][..., 1], g['w'][..., 1])
