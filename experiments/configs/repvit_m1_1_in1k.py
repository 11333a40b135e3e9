"""RepViT-M1.1, ImageNet-1K, 300 epochs, DeiT hard distillation (THU-MIG/RepViT main.py defaults).

Paper: 80.7% top-1 (300e; 81.2% at 450e), 8.2M params / 1.3 GMACs fused (CVPR 2024, Table 2).
Hardware: the authors used 8 GPUs x 256 images; here 2048 images per step over any device count
(e.g. a v4-32 TPU slice or 8 GPUs); ~34 GPU-hours on 8x3090 for the M1 run.

Run:
  mobilevis import --model regnety_160 ...   # the DeiT teacher is not a registered model here:
  mobilevis train --config experiments/configs/repvit_m1_1_in1k.py --workdir gs://.../repvit_m1_1 \
      --config.data.manual_dir=/path/to/imagenet_tars \
      --config.distillation.teacher_model=repvit_m2_3 \
      --config.distillation.teacher_checkpoint=/path/to/teacher_variables
The official teacher is RegNetY-16GF (DeiT weights). Any registered model restored from a
`save_variables` checkpoint (e.g. RepViT-M2.3 imported with `mobilevis import`) can stand in; the
run refuses to start without a teacher checkpoint.

Differences from the PyTorch run: the lr schedule is evaluated per step instead of per epoch; AMP
fp16 becomes bfloat16 compute with float32 parameters.
"""

from mobilevis_jax.data.config import imagenet_deit_config
from mobilevis_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model = 'repvit_m1_1'
  c.model_kwargs.distillation = True
  c.num_classes = 1000
  c.data = imagenet_deit_config(image_size=224, crop_pct=0.875)  # Resize 256 -> CenterCrop 224
  c.global_batch_size = 2048             # 256 per GPU x 8
  c.num_epochs = 300.0
  c.seed = 0

  c.optimizer.base_lr = 1e-3             # lr = 1e-3 * batch / 512 -> 4e-3
  c.optimizer.lr_scaling_batch = 512
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.025
  c.optimizer.weight_decay_rule = 'timm'
  c.optimizer.warmup_epochs = 5.0
  c.optimizer.warmup_lr = 1e-6
  c.optimizer.min_lr = 1e-5
  c.optimizer.agc_clip = 0.02            # --clip-grad 0.02 --clip-mode agc

  c.distillation.type = 'hard'
  c.distillation.alpha = 0.5
  c.distillation.teacher_model = ''      # taken from the teacher checkpoint's meta unless set
  c.distillation.teacher_checkpoint = ''

  c.ema_decay = 0.99996                  # kept, but the paper reports the raw model ...
  c.eval_ema = True
  c.eval_fused = True                    # ... after replace_batchnorm (fused), as evaluated here
  c.sync_batchnorm = False               # DDP, per-GPU BatchNorm
  c.half_precision = True
  c.eval_batch_size = 1024
  c.checkpoint_every_steps = 2000
  c.log_every_steps = 100
  return c
