"""RepViT-M1.1, ImageNet-1K, 300 epochs, DeiT hard distillation (THU-MIG/RepViT main.py defaults).

Paper: 80.7% top-1 (300e; 81.2% at 450e), 8.2M params / 1.3 GMACs fused (CVPR 2024, Table 2); the
number is the raw (non-EMA) model's best epoch over the 300 evaluations (kept here in
`<workdir>/best/raw`, see `mobilevis_jax.train.best`).
Official command: `python -m torch.distributed.launch --nproc_per_node=8 --use_env main.py
  --model repvit_m1_1 --data-path ~/imagenet --dist-eval` (main.py defaults: batch 256 per GPU,
  lr 1e-3 x batch / 512, AdamW eps 1e-8, wd 0.025, AGC 0.02, 5 warm-up epochs from 1e-6, min lr
  1e-5, EMA 0.99996, repeated augmentation 3, hard distillation alpha 0.5 from regnety_160).
Hardware: the authors used 8 GPUs x 256 images (~6.5 min per epoch on 8x3090); here 2048 images
per step over any device count that divides it (8 GPUs, a v4-32 slice, ...).

Run (prepare the data once, import the teacher once, then train):
  mobilevis data prepare imagenet2012 --manual-dir DIR_WITH_ILSVRC2012_TARS \
      --data-dir ~/tensorflow_datasets
  # the DeiT teacher, RegNetY-16GF (82.9%): on a machine with internet and timm,
  #   python -c "import timm, safetensors.torch as st; st.save_file(timm.create_model( \
  #     'regnety_160.deit_in1k', pretrained=True).state_dict(), 'regnety_160.safetensors')"
  mobilevis import --model regnety_160 --layout timm --weights regnety_160.safetensors \
      --out ~/teachers/regnety_160
  mobilevis train --config repvit_m1_1_in1k --workdir ~/runs/repvit_m1_1 \
      --config.distillation.teacher_checkpoint ~/teachers/regnety_160
Smoke run of the same recipe (RepViT-M0.6 at 64x64, 48 images per step, 40 steps):
  mobilevis train --config repvit_m1_1_in1k:runlocal --workdir /tmp/repvit_smoke \
      --config.distillation.teacher_checkpoint ~/teachers/regnety_160
(`data.data_dir` defaults to $TFDS_DATA_DIR or ~/tensorflow_datasets, where prepare wrote.) The run
refuses to start without the teacher checkpoint, or with a checkpoint of another model.

Differences from the PyTorch run, all of them:
- AMP fp16 becomes bfloat16 compute with float32 parameters, optimiser state and BN statistics.
- The lr is timm's CosineLRScheduler stepped at epoch ends exactly as main.py steps it
  (`step(epoch)`: epoch e trains at f(e - 1)); the 10 cooldown epochs are never run in either.
- Evaluation runs on the raw, the EMA and the fused raw weights each epoch; the official loop
  evaluates the raw unfused model (fused and unfused agree to float32 rounding).
"""

import ml_collections

from mobilevis_jax.configs import runlocal
from mobilevis_jax.data.config import imagenet_deit_config
from mobilevis_jax.train.config import base_config, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, runlocal=False)
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
  c.optimizer.schedule = 'cosine'        # timm CosineLRScheduler, t_in_epochs, DeiT's step(epoch)
  c.optimizer.schedule_unit = 'epoch'
  c.optimizer.schedule_epoch_lag = 1
  c.optimizer.warmup_epochs = 5.0
  c.optimizer.warmup_lr = 1e-6
  c.optimizer.min_lr = 1e-5
  c.optimizer.agc_clip = 0.02            # --clip-grad 0.02 --clip-mode agc

  c.distillation.type = 'hard'
  c.distillation.alpha = 0.5
  c.distillation.teacher_model = 'regnety_160'
  c.distillation.teacher_checkpoint = ''  # required: a `mobilevis import` of regnety_160

  c.ema_decay = 0.99996                  # kept, but the paper reports the raw model ...
  c.eval_ema = True
  c.eval_fused = True                    # ... after replace_batchnorm (fused), as evaluated here
  c.track_best = True                    # best raw epoch = the paper's number
  c.sync_batchnorm = False               # DDP, per-GPU BatchNorm
  c.half_precision = True
  c.eval_batch_size = 1024
  c.checkpoint_every_steps = 2000
  c.log_every_steps = 100

  if arg.runlocal:
    # 48: a multiple of repeated_aug=3 and of 8 devices
    runlocal(c, model='repvit_m0_6', global_batch_size=48)
  return c
