"""ParameterNet-600M, ImageNet-22K pretraining (first stage of the 22K -> 1K result).

Paper: 81.6% ImageNet-1K top-1 after 22K pretraining + 1K fine-tuning (79.0% trained on 1K only);
34.5M params, 0.6 GMACs (CVPR 2024). Next stage: parameternet_600m_in22k_ft_in1k.
Official command: none. huawei-noah/Efficient-AI-Backbones publishes the model file only ("train
it using timm"); the paper states AdamW with a cosine schedule. The values below are ASSUMED timm
ImageNet-22K defaults of that era (the DeiT/ConvNeXt 22K recipe: 90 epochs, lr 4e-3 at batch 4096,
wd 0.05, 5 warm-up epochs, RandAugment, mixup/cutmix, label smoothing, timm's per-epoch cosine),
not published numbers; check them against the paper before a comparison.
Hardware: sized for 32 accelerators (e.g. a v4-64 slice or 4 x 8 GPUs), 4096 images per step.

Run (prepare the data once, then train):
  mobilevis data prepare imagenet22k --config fall11 --manual-dir DIR_WITH_fall11_whole.tar \
      --data-dir ~/tensorflow_datasets --file-format array_record
  mobilevis train --config parameternet_600m_in22k --workdir ~/runs/parameternet_600m_in22k
Smoke run of the same recipe (ParameterNet-300M at 64x64, 32 images per step, 40 steps):
  mobilevis train --config parameternet_600m_in22k:runlocal --workdir /tmp/parameternet_smoke
(`data.data_dir` defaults to $TFDS_DATA_DIR or ~/tensorflow_datasets, where prepare wrote.)

Differences from a timm run with these values: bfloat16 compute instead of AMP fp16; no
repeated augmentation (timm's train.py default).
"""

import ml_collections

from mobilevis_jax.configs import runlocal
from mobilevis_jax.data.config import imagenet_deit_config
from mobilevis_jax.train.config import base_config, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, runlocal=False)
  c = base_config()
  c.model = 'parameternet_600m'
  c.num_classes = 21841                  # fall11 release
  c.data = imagenet_deit_config(image_size=224, crop_pct=0.875)
  c.data.name = 'imagenet22k'
  c.data.builder_config = 'fall11'
  c.data.eval_split = 'validation'
  c.data.repeated_aug = 1
  c.data.interpolation = 'bilinear'      # the model's eval cfg: bilinear, crop_pct 0.875
  c.data.eval_interpolation = 'bilinear'
  c.global_batch_size = 4096
  c.num_epochs = 90.0
  c.seed = 0

  c.optimizer.base_lr = 4e-3             # assumed (see docstring)
  c.optimizer.lr_scaling_batch = 4096
  c.optimizer.weight_decay = 0.05
  c.optimizer.weight_decay_rule = 'timm'
  c.optimizer.schedule = 'cosine'        # timm CosineLRScheduler per epoch (timm train.py: lag 0)
  c.optimizer.schedule_unit = 'epoch'
  c.optimizer.schedule_epoch_lag = 0
  c.optimizer.warmup_epochs = 5.0
  c.optimizer.warmup_lr = 1e-6
  c.optimizer.min_lr = 1e-5

  c.ema_decay = 0.0
  c.half_precision = True
  c.eval_every_epochs = 5.0
  c.eval_batch_size = 2048
  c.checkpoint_every_steps = 5000
  c.log_every_steps = 100

  if arg.runlocal:
    runlocal(c, model='parameternet_300m', global_batch_size=32)
  return c
