"""ParC-Net-S, ImageNet-1K, 300 epochs (hkzhang91/ParC-Net
config/classification/edgeformer/edgeformer_s.yaml).

Paper: 78.6% top-1, 5.0M params, 1.74 GMACs at 256x256 (ECCV 2022); the released number is
`checkpoint_ema_avg.pt`, the average of the 5 best EMA checkpoints (here `keep_best_ema=5` and
`mobilevis average`, below).
Official command: `CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 python main_train.py --common.config-file
  ./config/classification/edgeformer/edgeformer_s.yaml` (cvnets: AdamW (0.9, 0.999), wd 0.025 on
  every parameter, cosine 4e-3 -> 4e-4 on the integer epoch with period 300 after 3000 warm-up
  iterations from 4e-4, label smoothing 0.1, EMA momentum 0.0005, variable-batch sampler over
  {160, 192, 256, 288, 320} with 128 images per GPU at 256, eval resize 288 -> crop 256).
Hardware: the authors used 8 V100 (32 GB) or A100 GPUs, ~2 days; here 1024 images per step at
256x256 over any device count that divides the per-step batches.

Run (prepare the data once, train, then average the 5 best EMA evaluations and evaluate that):
  mobilevis data prepare imagenet2012 --manual-dir DIR_WITH_ILSVRC2012_TARS \
      --data-dir ~/tensorflow_datasets
  mobilevis train --config parcnet_s_in1k --workdir ~/runs/parcnet_s
  mobilevis average --workdir ~/runs/parcnet_s --k 5 --out ~/runs/parcnet_s/ema_avg
  mobilevis eval --config parcnet_s_in1k --checkpoint ~/runs/parcnet_s/ema_avg
Smoke run of the same recipe (ParC-Net-XS at 64x64 with scales {40, 48, 64, 72, 80}, 40 steps):
  mobilevis train --config parcnet_s_in1k:runlocal --workdir /tmp/parcnet_smoke
(`data.data_dir` defaults to $TFDS_DATA_DIR or ~/tensorflow_datasets, where prepare wrote.)

Input convention: cv2 BGR / 255, no mean/std (data.normalization='parc_bgr'); each resolution of
the multi-scale sampler compiles its own step once.

Differences from the PyTorch run, all of them:
- AMP fp16 becomes bfloat16 compute with float32 parameters, optimiser state and BN statistics.
- The per-step batches and the epoch length come from `mobilevis_jax.data.pipeline`'s multi-scale
  sampler; an epoch is counted as train-split size // 1024 steps (cvnets: one pass through its
  variable-batch sampler), which sets the schedule's epoch boundaries and the eval interval.
- The eval resize is TensorFlow's bilinear resize, not cv2's (differences of one grey level).
"""

import ml_collections

from mobilevis_jax.configs import runlocal
from mobilevis_jax.data.config import parc_config
from mobilevis_jax.train.config import base_config, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, runlocal=False)
  c = base_config()
  c.model = 'parcnet_s'
  c.num_classes = 1000
  c.data = parc_config()
  c.data.eval_interpolation = 'bilinear'  # cvnets resizes with cv2 INTER_LINEAR
  c.global_batch_size = 1024             # 128 per GPU x 8 at 256x256
  c.num_epochs = 300.0
  c.seed = 0

  c.optimizer.base_lr = 0.004            # absolute (no batch scaling in cvnets)
  c.optimizer.lr_scaling_batch = 0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 0.025
  c.optimizer.weight_decay_rule = 'all'  # no_decay_bn_filter_bias: false
  c.optimizer.schedule = 'cvnets_cosine'
  c.optimizer.warmup_steps = 3000        # warm-up in iterations from 0.0004
  c.optimizer.warmup_lr = 0.0004
  c.optimizer.min_lr = 0.0004            # cosine 0.004 -> 0.0004

  c.ema_decay = 0.9995                   # cvnets EMA momentum 0.0005
  c.track_best = True
  c.keep_best_ema = 5                    # checkpoint_ema_avg.pt: mean of the 5 best EMA epochs
  c.sync_batchnorm = False
  c.half_precision = True
  c.eval_batch_size = 1000
  c.checkpoint_every_steps = 2000
  c.log_every_steps = 100

  if arg.runlocal:
    runlocal(c, model='parcnet_xs', global_batch_size=64)
    c.data.multi_scale = (40, 48, 64, 72, 80)  # {160, ..., 320} around 256, scaled by 1/4
    c.data.crop_pct = 64 / 72                  # resize 288 -> crop 256, scaled
  return c
