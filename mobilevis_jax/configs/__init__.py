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
This package imports nothing: the recipe modules are loaded by file when asked for.
"""
