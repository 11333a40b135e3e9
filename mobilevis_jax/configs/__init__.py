"""The papers' training recipes, shipped with the package (`mobilevis train --config NAME`).

Each module defines `get_config(arg=None)` returning a trainer config
(`mobilevis_jax.train.config.base_config()` with the recipe's values). `arg` is big_vision's config
argument, given after a colon: `mobilevis train --config repvit_m1_1_in1k:runlocal ...` builds the
same recipe (global-batch layout, augmentation, repeated augmentation or multi-scale batches,
distillation, BatchNorm mode, schedule kind) at a laptop-sized resolution, model and length, for a
smoke run. Every recipe's docstring gives the paper number, the official command it mirrors, the
hardware, the commands to prepare the data and train, and every remaining difference from the
official run.

`mobilevis_jax.train.config.list_recipes()` lists the names; `load_config('NAME[:ARG]')` loads one.
This package imports nothing: the recipe modules are loaded by file when asked for. What the
ImageNet-scale recipes' smoke runs share is :func:`runlocal`; a recipe states only what differs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
  import ml_collections


def runlocal(c: ml_collections.ConfigDict, *, model: str,
             global_batch_size: int) -> ml_collections.ConfigDict:
  """Turns recipe `c` into its smoke run, in place: `model` (a small variant of the same family)
  at 64x64 for 40 steps of `global_batch_size` images, no evaluation during the run.

  Everything that makes the recipe what it is (augmentation, repeated augmentation, mixup,
  distillation, BatchNorm mode, schedule kind, weight decay rule, EMA) is left alone. The
  schedule counts steps (40 steps are less than one ImageNet epoch) and a recipe that warms up
  warms up over 5 of them. cvnets' cosine (ParC-Net) counts iterations whatever the unit, so
  its unit is left as the recipe has it.
  """
  c.model = model
  c.data.image_size = 64
  c.data.shuffle_buffer = 1000
  c.global_batch_size = global_batch_size
  c.eval_batch_size = 64
  c.num_train_steps = 40
  opt = c.optimizer
  if opt.schedule != 'cvnets_cosine':
    opt.schedule_unit = 'step'
    if opt.warmup_epochs > 0:
      opt.warmup_epochs = 0.0
      opt.warmup_steps = 5
  if opt.warmup_steps > 0:
    opt.warmup_steps = 5
  c.eval_every_epochs = 0.0
  c.checkpoint_every_steps = 20
  c.log_every_steps = 5
  return c
