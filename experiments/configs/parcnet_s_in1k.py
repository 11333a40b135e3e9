"""ParC-Net-S, ImageNet-1K, 300 epochs (hkzhang91/ParC-Net config/classification/edgeformer/edgeformer_s.yaml).

Paper: 78.6% top-1, 5.0M params, 1.74 GMACs at 256x256 (ECCV 2022).
Hardware: the authors used 8 GPUs x 128 images at 256x256 (mixed precision); here 1024 images per
step at 256, with the multi-scale sampler varying resolution and batch per step.

Run:
  mobilevis train --config experiments/configs/parcnet_s_in1k.py --workdir DIR \
      --config.data.manual_dir=/path/to/imagenet_tars

Input convention: cv2 BGR / 255, no mean/std (data.normalization='parc_bgr'); eval resize 288 ->
centre crop 256. Multi-scale: resolutions {160,192,256,288,320}, batch scaled to keep pixels per
step constant; each resolution compiles its own step once. The lr schedule counts optimiser steps
(the base batch), as cvnets does.
"""

from mobilevis_jax.data.config import parc_config
from mobilevis_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model = 'parcnet_s'
  c.num_classes = 1000
  c.data = parc_config()
  c.global_batch_size = 1024             # 128 per GPU x 8 at 256x256
  c.num_epochs = 300.0
  c.seed = 0

  c.optimizer.base_lr = 0.004            # absolute (no batch scaling in cvnets)
  c.optimizer.lr_scaling_batch = 0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 0.025
  c.optimizer.weight_decay_rule = 'all'  # no_decay_bn_filter_bias: false
  c.optimizer.warmup_steps = 3000        # warm-up in iterations from 0.0004
  c.optimizer.warmup_lr = 0.0004
  c.optimizer.min_lr = 0.0004            # cosine 0.004 -> 0.0004

  c.ema_decay = 0.9995                   # cvnets EMA momentum 0.0005
  c.sync_batchnorm = False
  c.half_precision = True
  c.eval_batch_size = 1000
  c.checkpoint_every_steps = 2000
  c.log_every_steps = 100
  return c
