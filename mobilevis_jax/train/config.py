"""Trainer configuration: the base ConfigDict every recipe starts from, and command-line overrides.

A recipe file in `experiments/configs/` defines `get_config()` returning `base_config()` with its
values changed. Every field is documented here, once. `load_config` imports a recipe file and applies
`--config.key=value` overrides; a key that the config does not have is an error that names it (a
typo must never silently train the default).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Sequence

import ml_collections

# The recipe used when no --config is given (the embedded digits dataset).
DEFAULT_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'default_config.py')


def _data_config() -> ml_collections.ConfigDict:
  # The data section belongs to the data pipeline (mobilevis_jax.data.config); the trainer only
  # embeds it. The 'synthetic' source (mobilevis_jax.data.synthetic) reads `image_size`,
  # `synthetic_num_classes` and `synthetic_num_train/eval` from the same section.
  # Imported here: importing mobilevis_jax.data loads TensorFlow, which `import train.config` need not.
  from mobilevis_jax.data.config import default_data_config
  cfg = default_data_config()
  with cfg.unlocked():
    cfg.synthetic_num_classes = 10
    cfg.synthetic_num_train = 512
    cfg.synthetic_num_eval = 128
    cfg.synthetic_nan_step = -1      # tests: the batch of this step is NaN (exercises the NaN stop)
  return cfg


def base_config() -> ml_collections.ConfigDict:
  """All trainer fields with neutral defaults (no recipe-specific values)."""
  c = ml_collections.ConfigDict()

  # --- model ---------------------------------------------------------------------------------
  c.model = 'repvit_m0_6'            # any name from mobilevis_jax.list_models()
  c.model_kwargs = ml_collections.ConfigDict()  # extra create_model kwargs (distillation, drop_path_rate, ...)
  c.num_classes = -1                 # -1: take it from the dataset (dataset_info)

  # --- data (owned by mobilevis_jax.data.config; see its docstrings) -------------------------
  c.data = _data_config()

  # --- schedule length -----------------------------------------------------------------------
  c.seed = 0
  c.global_batch_size = 128          # images per optimiser step, summed over all devices/processes
  c.num_epochs = 1.0                 # length in epochs of the train split ...
  c.num_train_steps = -1             # ... unless > 0, which sets the number of steps directly
  c.grad_accum_steps = 1             # micro-batches per step (the local batch is split k ways)

  # --- optimiser (optax AdamW) ---------------------------------------------------------------
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.base_lr = 1e-3         # learning rate at the reference batch size below
  c.optimizer.lr_scaling_batch = 0   # peak lr = base_lr * global_batch / this; 0: no scaling
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.05
  # 'timm': no decay for parameters with ndim <= 1 (biases, BN and LayerScale vectors) as timm's
  # param-group filter does; 'all': decay everything (cvnets with no_decay_bn_filter_bias false).
  c.optimizer.weight_decay_rule = 'timm'
  # Regexes over '/'-joined parameter paths that are decayed even when the rule excludes them
  # (MobileViG's layer_scale_2 is (C,1,1) in PyTorch, hence decayed by timm, but (C,) here).
  c.optimizer.weight_decay_force = ()
  c.optimizer.schedule = 'cosine'    # 'cosine' | 'constant'
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.warmup_steps = -1      # > 0 overrides warmup_epochs (cvnets counts iterations)
  c.optimizer.warmup_lr = 1e-6       # lr at step 0 of the linear warm-up
  c.optimizer.min_lr = 1e-5          # lr at the end of the cosine
  c.optimizer.grad_clip_norm = 0.0   # > 0: clip the global gradient norm
  c.optimizer.agc_clip = 0.0         # > 0: adaptive gradient clipping factor (timm 'agc')

  # --- loss ----------------------------------------------------------------------------------
  # Label smoothing and mixup/cutmix come from c.data (label_smoothing, mixup_alpha, ...).
  c.distillation = ml_collections.ConfigDict()
  c.distillation.type = 'none'       # 'none' | 'hard' (DeiT: argmax of the teacher)
  c.distillation.alpha = 0.5         # loss = (1-alpha) * CE(head) + alpha * CE(dist_head, teacher)
  c.distillation.teacher_model = ''  # a registered model name
  c.distillation.teacher_checkpoint = ''  # a directory written by checkpoint.save_variables
  c.distillation.teacher_model_kwargs = ml_collections.ConfigDict()

  # --- EMA of parameters and BN statistics ---------------------------------------------------
  c.ema_decay = 0.0                  # 0: off; else ema <- decay*ema + (1-decay)*weights per step

  # --- numerics and parallelism --------------------------------------------------------------
  c.sync_batchnorm = False           # False: per-device BN statistics (PyTorch DDP); True: SyncBN
  c.half_precision = False           # bfloat16 compute, float32 parameters and optimiser state
  c.distributed = ml_collections.ConfigDict()
  # Multi-host: jax.distributed.initialize(...) is called when a coordinator is given here or in
  # the environment (MOBILEVIS_COORDINATOR_ADDRESS, MOBILEVIS_NUM_PROCESSES, MOBILEVIS_PROCESS_ID),
  # or when `auto` is True (cluster auto-detection: TPU pods, SLURM, ...).
  c.distributed.coordinator_address = ''
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  c.distributed.auto = False

  # --- initialisation from another checkpoint ------------------------------------------------
  c.init_from = ''                   # directory written by checkpoint.save_variables (e.g. `mobilevis import`)
  c.init_exclude = ()                # regexes over '/'-joined paths kept at their fresh init (new head)

  # --- evaluation ----------------------------------------------------------------------------
  c.eval_every_epochs = 1.0          # <= 0: only at the end
  c.eval_batch_size = 256            # global eval batch
  c.eval_ema = True                  # also evaluate the EMA weights (when ema_decay > 0)
  c.eval_fused = False               # also evaluate after mobilevis_jax.fuse (RepViT)

  # --- checkpoints and logs ------------------------------------------------------------------
  c.checkpoint_every_steps = 500
  c.checkpoint_keep = 3
  c.checkpoint_async = True
  c.log_every_steps = 50
  c.tensorboard = True               # TensorBoard event files (metrics.jsonl is always written)
  c.progress_bar = True
  c.debug_step_sleep = 0.0           # seconds slept per step; tests use it to kill a run mid-way
  return c


# ------------------------------------------------------------------------------------------------
# Loading recipe files and applying overrides
# ------------------------------------------------------------------------------------------------

def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Imports `path` and returns its `get_config()`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist')
  spec = importlib.util.spec_from_file_location(f'_mobilevis_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'config file {path!r} defines no get_config()')
  return module.get_config()


def _all_keys(cfg: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  keys = []
  for k, v in cfg.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(_all_keys(v, prefix + k + '.'))
  return keys


def _parse_value(text: str, current: Any, key: str) -> Any:
  """Converts a command-line string to the type of the field it replaces."""
  if isinstance(current, bool):
    low = text.lower()
    if low in ('true', '1', 'yes'):
      return True
    if low in ('false', '0', 'no'):
      return False
    raise ValueError(f'config key {key!r} is a bool; got {text!r}')
  if isinstance(current, str):
    return text
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise ValueError(f'config key {key!r} is an int; got {text!r}') from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise ValueError(f'config key {key!r} is a float; got {text!r}') from None
  # tuples, lists, dicts, None: Python literal syntax ('(160,192)', "('a','b')", '[]').
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ValueError(f'config key {key!r} needs a Python literal; got {text!r}') from None
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies 'a.b=value' strings in order; unknown keys raise ValueError naming the key."""
  known = _all_keys(cfg)
  for item in overrides:
    if '=' not in item:
      raise ValueError(f'config override {item!r} must look like key=value')
    key, text = item.split('=', 1)
    key = key.strip()
    if key not in known:
      close = difflib.get_close_matches(key, known, n=3)
      hint = f' (did you mean {", ".join(close)}?)' if close else ''
      raise ValueError(f'unknown config key {key!r}{hint}')
    *parents, leaf = key.split('.')
    node = cfg
    for p in parents:
      node = node[p]
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
      raise ValueError(f'config key {key!r} is a section; set one of its fields instead')
    value = _parse_value(text, current, key)
    with node.ignore_type():
      node[leaf] = value
  return cfg


def load_config(path: str | None, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config of `path` (the default recipe when None) with `overrides` applied."""
  # The default recipe is a recipe file like any other, loaded (not imported): a recipe imports
  # this module for base_config(), so this module must not import a recipe (no cycle).
  cfg = load_config_file(DEFAULT_CONFIG_FILE if path is None else path)
  return apply_overrides(cfg, overrides)
