"""ParameterNet-600M, ImageNet-1K fine-tuning from the 22K checkpoint (classifier re-initialised).

Paper: 81.6% top-1 on ImageNet-1K (vs 79.0% trained on 1K only), 34.5M params, 0.6 GMACs.
Hardware: 8 accelerators, 1024 images per step.

Paper Table 1 (as summarised): fine-tuning uses AdamW + cosine, layer-wise lr decay 0.5 and no
random erasing. Batch, lr and epochs are not published; the values below are ASSUMED (30 epochs,
lr 5e-5 per 512 images as in DeiT/ConvNeXt 22K->1K fine-tunes). Layer-wise lr decay is NOT
implemented by this trainer (a uniform lr is used); see the README's list of gaps.

Run:
  mobilevis train --config experiments/configs/parameternet_600m_in22k_ft_in1k.py --workdir DIR \
      --config.init_from=/path/to/in22k_workdir --config.data.manual_dir=/path/to/imagenet_tars
`init_from` takes the 22K work directory (its newest checkpoint) or a variables checkpoint; every
parameter is loaded except the classifier (`init_exclude`), which starts from its fresh init.
"""

from mobilevis_jax.data.config import imagenet_deit_config
from mobilevis_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model = 'parameternet_600m'
  c.num_classes = 1000
  c.data = imagenet_deit_config(image_size=224, crop_pct=0.875)
  c.data.random_erasing = 0.0            # paper: random erasing off for fine-tuning
  c.data.repeated_aug = 1
  c.data.interpolation = 'bilinear'
  c.data.eval_interpolation = 'bilinear'
  c.global_batch_size = 1024
  c.num_epochs = 30.0
  c.seed = 0

  c.init_from = ''                       # required: the 22K run's work directory
  c.init_exclude = ('^classifier/',)     # new 1000-way head

  c.optimizer.base_lr = 5e-5             # assumed (see docstring), per 512 images
  c.optimizer.lr_scaling_batch = 512
  c.optimizer.weight_decay = 0.05
  c.optimizer.weight_decay_rule = 'timm'
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.min_lr = 1e-6

  c.ema_decay = 0.9999
  c.half_precision = True
  c.eval_batch_size = 1000
  c.checkpoint_every_steps = 2000
  c.log_every_steps = 100
  return c
