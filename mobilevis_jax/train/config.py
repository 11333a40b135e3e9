"""Trainer configuration: the base ConfigDict every recipe starts from, and command-line overrides.

A recipe (a packaged one in `mobilevis_jax/configs/`, or any file) defines `get_config(arg=None)`
returning `base_config()` with its values changed. Every field is documented here, once.
`load_config('NAME[:ARG]')` finds a packaged recipe by name (or a file by path), calls
`get_config(ARG)` and applies `--config.key=value` overrides; a key that the config does not have
is an error that names it and suggests close matches (a typo must never silently train the
default). The free-form dicts `model_kwargs` and `distillation.teacher_model_kwargs` accept any
key (they are the model's constructor arguments; the model rejects unknown ones when it is built).

`ARG` is big_vision's config argument: `parse_arg('runlocal')` -> `{'runlocal': True}`,
`parse_arg('runlocal,res=64')` -> `{'runlocal': True, 'res': 64}`. Every packaged recipe takes
`runlocal` (`mobilevis train --config repvit_m1_1_in1k:runlocal ...`): the same recipe structure
at a laptop-sized resolution, model and length.
"""

from __future__ import annotations

import ast
import difflib
import glob
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

# Sections whose keys are free (constructor kwargs): an override may add a key to them.
FREE_SECTIONS = ('model_kwargs', 'distillation.teacher_model_kwargs')


def _data_config() -> ml_collections.ConfigDict:
  # The data section belongs to the data pipeline (mobilevis_jax.data.config); the trainer only
  # embeds it.
  from mobilevis_jax.data.config import default_data_config
  return default_data_config()


def base_config() -> ml_collections.ConfigDict:
  """All trainer fields with neutral defaults (no recipe-specific values)."""
  c = ml_collections.ConfigDict()

  # --- model ---------------------------------------------------------------------------------
  c.model = 'repvit_m0_6'            # any name from mobilevis_jax.list_models()
  # extra create_model kwargs (distillation, drop_path_rate, ...)
  c.model_kwargs = ml_collections.ConfigDict()
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
  # Learning-rate schedule (mobilevis_jax.train.optim.learning_rate_schedule):
  #   'cosine': timm CosineLRScheduler (warmup_prefix=False): linear warm-up from warmup_lr over
  #             warmup_epochs, cosine from the peak to min_lr over the whole run (t_initial = the
  #             run's epochs, warm-up included);
  #   'cvnets_cosine': cvnets' CosineScheduler (ParC-Net): linear warm-up over warmup_steps
  #             iterations, then cosine on the integer epoch with period = the run's epochs;
  #   'constant': the peak throughout (after the warm-up).
  c.optimizer.schedule = 'cosine'
  # 'epoch': the lr changes once per epoch (timm t_in_epochs=True, the official runs); 'step': the
  # same curve evaluated at every step (timm t_in_epochs=False: t counts steps). 'cosine' only.
  c.optimizer.schedule_unit = 'epoch'
  # DeiT's loops call scheduler.step(epoch) at the END of epoch `epoch`, so epoch e trains at
  # f(e - 1) (epochs 0 and 1 both at warmup_lr): lag 1. timm's own train.py calls step(epoch + 1):
  # lag 0. Only for schedule_unit='epoch'.
  c.optimizer.schedule_epoch_lag = 1
  c.optimizer.warmup_epochs = 0.0    # timm warmup_t (epochs; whole epochs when stepping per epoch)
  c.optimizer.warmup_steps = -1      # > 0: warm-up in iterations (cvnets; also overrides the above)
  c.optimizer.warmup_lr = 1e-6       # lr at the start of the linear warm-up (timm warmup_lr_init)
  c.optimizer.min_lr = 1e-5          # lr at the end of the cosine (timm lr_min)
  c.optimizer.grad_clip_norm = 0.0   # > 0: clip the global gradient norm
  c.optimizer.agc_clip = 0.0         # > 0: timm's adaptive_clip_grad per output unit (eps 1e-3)
  # Layer-wise lr decay (BEiT / timm param_groups_layer_decay): 0 = off. Layer ids come from
  # `layer_decay_groups`, regexes over '/'-joined parameter paths tried in order: a parameter's
  # layer is (index of the first matching regex, its captured integers), layers numbered in that
  # order ('+regex' joins the layer before it); unmatched parameters are one more, last layer (the
  # classifier). lr multiplier of layer i of L: layer_decay ** (L - 1 - i).
  c.optimizer.layer_decay = 0.0
  c.optimizer.layer_decay_groups = ()

  # --- loss ----------------------------------------------------------------------------------
  # Label smoothing and mixup/cutmix come from c.data (label_smoothing, mixup_alpha, ...).
  c.distillation = ml_collections.ConfigDict()
  c.distillation.type = 'none'       # 'none' | 'hard' (DeiT: argmax of the teacher)
  c.distillation.alpha = 0.5         # loss = (1-alpha) * CE(head) + alpha * CE(dist_head, teacher)
  # A registered model name; when set, the teacher checkpoint's meta must name the same model.
  c.distillation.teacher_model = ''
  c.distillation.teacher_checkpoint = ''  # a directory written by checkpoint.save_variables
  c.distillation.teacher_model_kwargs = ml_collections.ConfigDict()

  # --- EMA of parameters and BN statistics ---------------------------------------------------
  c.ema_decay = 0.0                  # 0: off; else ema <- decay*ema + (1-decay)*weights per step

  # --- numerics and parallelism --------------------------------------------------------------
  c.sync_batchnorm = False           # False: per-device BN statistics (PyTorch DDP); True: SyncBN
  c.half_precision = False           # bfloat16 compute, float32 parameters and optimiser state
  # CPU only: compile the train/eval steps at XLA's backend optimisation level 0 (compile
  # 0.6-0.9x the CPU time, each step 2-5x slower, by model; train/step.py FAST_COMPILE_OPTIONS).
  # Pays only for very short runs (a smoke test of a few steps), where compile is everything.
  c.xla_fast_compile = False
  # The train step as XLA programs (train/step.py TrainStep): 'split' = forward + backward and the
  # optimiser update as two programs compiled concurrently (a shorter first step on a multi-core
  # CPU), 'one' = one program, 'auto' = 'split' on CPU, 'one' elsewhere.
  c.train_step_programs = 'auto'
  # CPU, split step: XLA:CPU's fusion emitter for the forward + backward program, 'mlir' (XLA's
  # default) or 'elemental' (the older emitter); 'auto' = the family's measured choice
  # (train/step.py GRADS_EMITTER_TABLE). Compile time only: same program, same step time.
  c.xla_cpu_grads_emitter = 'auto'
  c.distributed = ml_collections.ConfigDict()
  # Multi-host: jax.distributed.initialize(...) is called when a coordinator is given here or in
  # the environment (MOBILEVIS_COORDINATOR_ADDRESS, MOBILEVIS_NUM_PROCESSES, MOBILEVIS_PROCESS_ID),
  # or when `auto` is True (cluster auto-detection: TPU pods, SLURM, ...).
  c.distributed.coordinator_address = ''
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  c.distributed.auto = False

  # --- initialisation from another checkpoint ------------------------------------------------
  # init_from: a directory written by checkpoint.save_variables (e.g. `mobilevis import`);
  # init_exclude: regexes over '/'-joined paths kept at their fresh init (a new head).
  c.init_from = ''
  c.init_exclude = ()

  # --- evaluation ----------------------------------------------------------------------------
  c.eval_every_epochs = 1.0          # <= 0: only at the end
  c.eval_batch_size = 256            # global eval batch
  c.eval_ema = True                  # also evaluate the EMA weights (when ema_decay > 0)
  c.eval_fused = False               # also evaluate after mobilevis_jax.fuse (RepViT)
  # Best evaluations: `<workdir>/best/raw` and `<workdir>/best/ema` hold the variables of the best
  # raw / EMA top-1 so far (with `best.json`); the `keep_best_ema` best EMA evaluations are kept
  # in `<workdir>/best/ema_top/<step>` for `mobilevis average` (ParC-Net reports the mean of its 5
  # best EMA checkpoints). 0: no top-k copies.
  c.track_best = True
  c.keep_best_ema = 0

  # --- checkpoints and logs ------------------------------------------------------------------
  c.checkpoint_every_steps = 500
  c.checkpoint_keep = 3
  c.checkpoint_async = True
  c.log_every_steps = 50
  c.tensorboard = True               # TensorBoard event files (metrics.jsonl is always written)
  c.progress_bar = True
  return c


# ------------------------------------------------------------------------------------------------
# Loading recipe files and applying overrides
# ------------------------------------------------------------------------------------------------

def configs_dir() -> str:
  """The directory of the packaged recipes (`mobilevis_jax/configs/`)."""
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def list_recipes() -> list[str]:
  """Names of the packaged recipes (`mobilevis train --config NAME`)."""
  return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(configs_dir(), '*.py'))
                if not os.path.basename(p).startswith('_'))


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """big_vision's config argument: 'runlocal' -> runlocal=True; 'a=1,b=x' -> a=1, b='x'.

  Keys must be among `defaults` (whose types the values take); an unknown key is an error.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(','):
    key, has_value, text = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; this recipe takes {sorted(defaults)}')
    out[key] = _parse_value(text, defaults[key], key) if has_value else True
  return out


def resolve_recipe(spec: str) -> tuple[str, str | None]:
  """'NAME[:ARG]' or 'PATH[:ARG]' -> (file path, ARG or None); an unknown name lists the recipes."""
  name, arg = spec, None
  if ':' in spec:
    name, arg = spec.rsplit(':', 1)
  if os.path.isfile(name):
    return name, arg
  if name.endswith('.py') or os.sep in name:
    raise FileNotFoundError(f'config file {name!r} does not exist')
  path = os.path.join(configs_dir(), name + '.py')
  if not os.path.isfile(path) or name.startswith('_'):
    close = difflib.get_close_matches(name, list_recipes(), n=3)
    hint = f' (did you mean {", ".join(close)}?)' if close else ''
    raise FileNotFoundError(f'no recipe named {name!r}{hint}; packaged recipes: '
                            f'{", ".join(list_recipes())} (or pass a path to a config file)')
  return path, arg


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Imports `path` and returns its `get_config(arg)` (`get_config()` when arg is None)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist')
  spec = importlib.util.spec_from_file_location(f'_mobilevis_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'config file {path!r} defines no get_config()')
  return module.get_config() if arg is None else module.get_config(arg)


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


def _free_value(text: str) -> Any:
  """A model-kwargs value: a Python literal (0.1, True, (1, 2)) or else the text itself ('fft')."""
  if text.lower() in ('true', 'false'):
    return text.lower() == 'true'
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(cfg: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies 'a.b=value' strings in order; unknown keys raise ValueError naming the key.

  Keys directly under a free section (`model_kwargs.drop_path_rate=0.1`) may be new; their value
  is a Python literal or, failing that, a string.
  """
  known = _all_keys(cfg)
  for item in overrides:
    if '=' not in item:
      raise ValueError(f'config override {item!r} must look like key=value')
    key, text = item.split('=', 1)
    key = key.strip()
    parent = key.rsplit('.', 1)[0] if '.' in key else ''
    if parent in FREE_SECTIONS and parent in known:
      node = cfg
      for p in parent.split('.'):
        node = node[p]
      leaf = key.rsplit('.', 1)[1]
      value = _free_value(text)
      if leaf in node and not isinstance(node[leaf], ml_collections.ConfigDict):
        current = node[leaf]
        value = _parse_value(text, current, key) if current is not None else value
      with node.unlocked(), node.ignore_type():
        node[leaf] = value
      continue
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


def load_config(spec: str | None, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The recipe `spec` ('NAME[:ARG]' or 'PATH[:ARG]'; the packaged `default` when None) with
  `overrides` applied."""
  path, arg = resolve_recipe(spec or 'default')
  return apply_overrides(load_config_file(path, arg), overrides)
