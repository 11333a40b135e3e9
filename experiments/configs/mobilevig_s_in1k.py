"""MobileViG-S, ImageNet-1K, 300 epochs, DeiT hard distillation (SLDGroup/MobileViG main.py).

Paper: 78.2% top-1, 7.2M params, 1.0 GMACs (CVPRW 2023).
Hardware: the authors used 8 GPUs x 128 images with SyncBN; here 1024 images per step.

Run:
  mobilevis train --config experiments/configs/mobilevig_s_in1k.py --workdir DIR \
      --config.data.manual_dir=/path/to/imagenet_tars \
      --config.distillation.teacher_checkpoint=/path/to/teacher_variables
The official teacher is DeiT's RegNetY-16GF; any registered model restored from a variables
checkpoint can stand in (the run refuses to start without one).

Differences from the PyTorch run: per-step lr schedule; bfloat16 instead of fp16 AMP.
"""

from mobilevis_jax.data.config import imagenet_deit_config
from mobilevis_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model = 'mobilevig_s'
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
  c.optimizer.warmup_epochs = 20.0
  c.optimizer.warmup_lr = 1e-6
  c.optimizer.min_lr = 1e-5

  c.distillation.type = 'hard'
  c.distillation.alpha = 0.5
  c.distillation.teacher_checkpoint = ''

  c.ema_decay = 0.99996
  c.sync_batchnorm = True                # the recipe uses SyncBN
  c.half_precision = True
  c.eval_batch_size = 1024
  c.checkpoint_every_steps = 2000
  c.log_every_steps = 100
  return c
