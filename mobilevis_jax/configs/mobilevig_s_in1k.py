"""MobileViG-S, ImageNet-1K, 300 epochs, DeiT hard distillation (SLDGroup/MobileViG main.py).

Paper: 78.2% top-1, 7.2M params, 1.0 GMACs (CVPRW 2023); the number is the best epoch of the
non-EMA model (kept here in `<workdir>/best/raw`).
Official command: `python -m torch.distributed.launch --nproc_per_node=8 --use_env main.py
  --data-path ~/imagenet --model mobilevig_s --output_dir mobilevig_results` (main.py defaults:
  batch 128 per GPU, lr 2e-3 x batch x world / 1024, AdamW eps 1e-8, wd 0.05, 20 warm-up epochs
  from 1e-6, min lr 1e-5, EMA 0.99996, SyncBN, drop path 0.1, seed 42, repeated augmentation 3,
  colour jitter 0.4, random train interpolation, hard distillation alpha 0.5 from regnety_160).
Hardware: the authors used 8 GPUs x 128 images with SyncBN; here 1024 images per step over any
device count that divides it, BatchNorm synchronised over all of them.

Run (prepare the data once, import the teacher once, then train):
  mobilevis data prepare imagenet2012 --manual-dir DIR_WITH_ILSVRC2012_TARS \
      --data-dir ~/tensorflow_datasets
  # the DeiT teacher, RegNetY-16GF (82.9%): on a machine with internet and timm,
  #   python -c "import timm, safetensors.torch as st; st.save_file(timm.create_model( \
  #     'regnety_160.deit_in1k', pretrained=True).state_dict(), 'regnety_160.safetensors')"
  mobilevis import --model regnety_160 --layout timm --weights regnety_160.safetensors \
      --out ~/teachers/regnety_160
  mobilevis train --config mobilevig_s_in1k --workdir ~/runs/mobilevig_s \
      --config.distillation.teacher_checkpoint ~/teachers/regnety_160
Smoke run of the same recipe (MobileViG-Ti at 64x64, 48 images per step, 40 steps):
  mobilevis train --config mobilevig_s_in1k:runlocal --workdir /tmp/mobilevig_smoke \
      --config.distillation.teacher_checkpoint ~/teachers/regnety_160
(`data.data_dir` defaults to $TFDS_DATA_DIR or ~/tensorflow_datasets, where prepare wrote.)

Differences from the PyTorch run, all of them:
- AMP fp16 becomes bfloat16 compute with float32 parameters, optimiser state and BN statistics.
- The lr is timm's CosineLRScheduler stepped at epoch ends as DeiT's loop steps it (epoch e
  trains at f(e - 1)); the cooldown epochs are never run in either.
- layer_scale_2 is (C,) here and (C,1,1) in PyTorch; `weight_decay_force` decays it as timm does.
"""

import ml_collections

from mobilevis_jax.configs import runlocal
from mobilevis_jax.data.config import imagenet_deit_config
from mobilevis_jax.train.config import base_config, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, runlocal=False)
  c = base_config()
  c.model = 'mobilevig_s'
  c.model_kwargs.distillation = True
  c.model_kwargs.drop_path_rate = 0.1
  c.num_classes = 1000
  c.data = imagenet_deit_config(image_size=224, crop_pct=224 / 248)  # Resize 248 -> CenterCrop 224
  c.data.interpolation = 'random'        # timm --train-interpolation random
  c.data.color_jitter = 0.4
  c.global_batch_size = 1024             # 128 per GPU x 8
  c.num_epochs = 300.0
  c.seed = 42

  c.optimizer.base_lr = 2e-3             # lr * batch * world / 1024
  c.optimizer.lr_scaling_batch = 1024
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.05
  c.optimizer.weight_decay_rule = 'timm'
  # layer_scale_2 is (C,1,1) in PyTorch, so timm decays it; it is (C,) here.
  c.optimizer.weight_decay_force = ('layer_scale_2/scale$',)
  c.optimizer.schedule = 'cosine'        # timm CosineLRScheduler, t_in_epochs, DeiT's step(epoch)
  c.optimizer.schedule_unit = 'epoch'
  c.optimizer.schedule_epoch_lag = 1
  c.optimizer.warmup_epochs = 20.0
  c.optimizer.warmup_lr = 1e-6
  c.optimizer.min_lr = 1e-5

  c.distillation.type = 'hard'
  c.distillation.alpha = 0.5
  c.distillation.teacher_model = 'regnety_160'
  c.distillation.teacher_checkpoint = ''  # required: a `mobilevis import` of regnety_160

  c.ema_decay = 0.99996
  c.track_best = True
  c.sync_batchnorm = True                # the recipe uses SyncBN
  c.half_precision = True
  c.eval_batch_size = 1024
  c.checkpoint_every_steps = 2000
  c.log_every_steps = 100

  if arg.runlocal:
    # 48: a multiple of repeated_aug=3 and of 8 devices
    runlocal(c, model='mobilevig_ti', global_batch_size=48)
  return c
