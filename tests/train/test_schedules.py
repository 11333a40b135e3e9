"""The recipes' learning rates against the official schedulers, epoch by epoch.

RepViT and MobileViG (DeiT main.py) build timm's `CosineLRScheduler` with t_initial = epochs,
warmup_t = warm-up epochs, warmup_lr_init, lr_min, t_in_epochs=True, and call
`lr_scheduler.step(epoch)` at the END of epoch `epoch`; so epoch e trains at the lr set after
epoch e - 1 (epochs 0 and 1 both at warmup_lr). The reference below runs exactly that loop with
timm's scheduler on a torch optimizer and reads the lr each epoch trains at.

ParC-Net (cvnets, epoch-based CosineScheduler) sets, before every iteration, with `epoch` the
0-based epoch and `it` the number of iterations done so far:

    lr = warmup_init_lr + it * (max_lr - warmup_init_lr) / warmup_iterations   if it < warmup_iterations
    lr = min_lr + 0.5 * (max_lr - min_lr) * (1 + cos(pi * epoch / max_epochs))    otherwise

(our transcription of `get_lr(epoch, curr_iter)`; its `period` is `max_epochs` when
`is_iteration_based` is false, clipped at 0).
"""

import math

import numpy as np
import pytest

from mobilevis_jax.train import config as config_lib
from mobilevis_jax.train import optim

STEPS_PER_EPOCH = 3  # the trainer's epoch length is a parameter; a short one keeps the test fast


def _trainer_lrs(cfg, steps_per_epoch, epochs, epoch_starts=None):
  schedule = optim.learning_rate_schedule(cfg.optimizer, global_batch_size=cfg.global_batch_size,
                                          steps_per_epoch=steps_per_epoch,
                                          total_steps=epochs * steps_per_epoch, epoch_starts=epoch_starts)
  steps = np.arange(epochs * steps_per_epoch if epoch_starts is None else epoch_starts[-1])
  import jax
  return np.asarray(jax.jit(jax.vmap(schedule))(steps))


def _deit_loop_lrs(cfg, epochs):
  """The lr each epoch of DeiT's main.py loop trains at, from timm's own scheduler."""
  torch = pytest.importorskip('torch')
  from timm.scheduler.cosine_lr import CosineLRScheduler
  peak = optim.peak_learning_rate(cfg.optimizer, cfg.global_batch_size)
  opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
  sched = CosineLRScheduler(opt, t_initial=epochs, lr_min=cfg.optimizer.min_lr,
                            warmup_lr_init=cfg.optimizer.warmup_lr,
                            warmup_t=int(cfg.optimizer.warmup_epochs), cycle_limit=1, t_in_epochs=True)
  out = []
  for epoch in range(epochs):
    out.append(opt.param_groups[0]['lr'])   # what this epoch trains at
    sched.step(epoch)                       # main.py: lr_scheduler.step(epoch) after the epoch
  return np.asarray(out)


@pytest.mark.parametrize('recipe', ['repvit_m1_1_in1k', 'mobilevig_s_in1k'])
def test_deit_recipes_follow_timm_per_epoch(recipe):
  cfg = config_lib.load_config(recipe)
  epochs = int(cfg.num_epochs)
  ours = _trainer_lrs(cfg, STEPS_PER_EPOCH, epochs)
  ref = _deit_loop_lrs(cfg, epochs)
  # Every step of epoch e trains at the epoch's lr (per-epoch stepping, not a per-step curve).
  per_epoch = ours.reshape(epochs, STEPS_PER_EPOCH)
  assert np.all(per_epoch == per_epoch[:, :1])
  np.testing.assert_allclose(per_epoch[:, 0], ref, rtol=2e-6, atol=0)
  assert per_epoch[0, 0] == per_epoch[1, 0] == np.float32(cfg.optimizer.warmup_lr)


def test_repvit_epoch_6_matches_the_official_log():
  cfg = config_lib.load_config('repvit_m1_1_in1k')
  lrs = _trainer_lrs(cfg, STEPS_PER_EPOCH, 300).reshape(300, STEPS_PER_EPOCH)[:, 0]
  assert f'{lrs[6]:.3e}' == '3.997e-03'     # logs/repvit_m1_1_distill_300e.txt, epoch 6
  assert lrs[5] == pytest.approx(1e-6 + 4 * (4e-3 - 1e-6) / 5, rel=1e-6)  # still warming up


def test_per_step_option_is_timm_with_t_in_steps():
  pytest.importorskip('torch')
  import torch
  from timm.scheduler.cosine_lr import CosineLRScheduler
  cfg = config_lib.load_config('repvit_m1_1_in1k', ['optimizer.schedule_unit=step'])
  spe, epochs = 4, 12
  ours = _trainer_lrs(cfg, spe, epochs)
  opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=4e-3)
  sched = CosineLRScheduler(opt, t_initial=spe * epochs, lr_min=1e-5, warmup_lr_init=1e-6,
                            warmup_t=5 * spe, t_in_epochs=False)
  ref = []
  for step in range(spe * epochs):
    ref.append(opt.param_groups[0]['lr'])
    sched.step_update(step + 1)             # timm train.py: after each optimiser step
  # Evaluated in float32 per step (cos near pi): a few 1e-11 absolute at the tail.
  np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=1e-10)


def _cvnets_lr(epoch, it, *, max_lr=4e-3, min_lr=4e-4, warmup_init_lr=4e-4, warmup_iterations=3000,
               max_epochs=300):
  if it < warmup_iterations:
    lr = warmup_init_lr + it * (max_lr - warmup_init_lr) / warmup_iterations
  else:
    lr = min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * epoch / max_epochs))
  return max(0.0, lr)


def test_parcnet_follows_cvnets_cosine():
  cfg = config_lib.load_config('parcnet_s_in1k')
  spe = 1251                                # so that the 3000 warm-up iterations span epochs 0-2
  epochs = 300
  ours = _trainer_lrs(cfg, spe, epochs)
  epoch_of = np.arange(epochs * spe) // spe
  # every iteration of the warm-up, every epoch boundary and the step before it
  check = sorted(set(range(0, 3100)) | set(range(0, epochs * spe, spe)) | set(range(spe - 1, epochs * spe, spe)))
  ref = [_cvnets_lr(int(epoch_of[s]), s) for s in check]
  np.testing.assert_allclose(ours[check], ref, rtol=2e-6)
  assert ours[0] == pytest.approx(4e-4) and ours[2999] < 4e-3 and ours[3000] == pytest.approx(_cvnets_lr(2, 3000))


def test_parcnet_epochs_of_unequal_length():
  """The variable-batch sampler makes epochs of different step counts: the cosine follows the
  epoch each step belongs to (given as the first step of every epoch)."""
  cfg = config_lib.load_config('parcnet_s_in1k', ['optimizer.warmup_steps=4'])
  starts = np.array([0, 5, 7, 12, 13])     # 4 epochs of 5, 2, 5 and 1 steps
  ours = _trainer_lrs(cfg, 5, 4, epoch_starts=starts)
  epoch_of = np.searchsorted(starts[1:], np.arange(13), side='right')
  ref = [_cvnets_lr(int(e), s, warmup_iterations=4, max_epochs=4) for s, e in enumerate(epoch_of)]
  np.testing.assert_allclose(ours, ref, rtol=2e-6)


def test_schedule_errors_name_the_field():
  cfg = config_lib.load_config('parcnet_s_in1k', ['optimizer.warmup_steps=-1'])
  with pytest.raises(ValueError, match='warmup_steps'):
    optim.learning_rate_schedule(cfg.optimizer, global_batch_size=1024, steps_per_epoch=10, total_steps=100)
  cfg = config_lib.load_config('repvit_m1_1_in1k', ['optimizer.schedule=linear'])
  with pytest.raises(ValueError, match='optimizer.schedule'):
    optim.learning_rate_schedule(cfg.optimizer, global_batch_size=1024, steps_per_epoch=10, total_steps=100)
