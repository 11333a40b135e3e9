"""ParameterNet-600M, ImageNet-1K fine-tuning from the 22K checkpoint (classifier re-initialised).

Paper: 81.6% top-1 on ImageNet-1K (vs 79.0% trained on 1K only), 34.5M params, 0.6 GMACs.
Official command: none (no training scripts are published). Paper Table 1 (as summarised):
fine-tuning uses AdamW + cosine, layer-wise lr decay 0.5 and no random erasing. Batch, lr and
epochs are not published; the values below are ASSUMED (30 epochs, lr 5e-5 per 512 images as in
DeiT/ConvNeXt 22K -> 1K fine-tunes, no warm-up, timm's per-epoch cosine).
Hardware: 8 accelerators, 1024 images per step.

Layer-wise lr decay: layers are timm's GhostNet `group_matcher` (fine): the stem (conv_stem, bn1)
is layer 0, every block `blocks.i.j` one layer in order (conv_head shares the last block's), the
classifier the last; layer i of L = 19 trains at lr x 0.5 ** (L - 1 - i)
(`optimizer.layer_decay_groups`; tested against timm's param_groups_layer_decay).

Run (prepare the data once; the 22K run's work directory is the starting point):
  mobilevis data prepare imagenet2012 --manual-dir DIR_WITH_ILSVRC2012_TARS \
      --data-dir ~/tensorflow_datasets
  mobilevis train --config parameternet_600m_in22k_ft_in1k --workdir ~/runs/parameternet_600m_ft \
      --config.init_from ~/runs/parameternet_600m_in22k
Smoke run of the same recipe (ParameterNet-300M at 64x64, 32 images per step, 40 steps; init_from
a smoke run of the 22K recipe):
  mobilevis train --config parameternet_600m_in22k_ft_in1k:runlocal \
      --workdir /tmp/parameternet_ft_smoke \
      --config.init_from /tmp/parameternet_smoke
(`data.data_dir` defaults to $TFDS_DATA_DIR or ~/tensorflow_datasets, where prepare wrote.)
`init_from` takes the 22K work directory (its newest checkpoint) or a variables checkpoint; every
parameter is loaded except the classifier (`init_exclude`), which starts from its fresh init.

Differences from a timm run with these values: bfloat16 compute instead of AMP fp16; no
repeated augmentation.
"""

import ml_collections

from mobilevis_jax.configs import runlocal
from mobilevis_jax.data.config import imagenet_deit_config
from mobilevis_jax.train.config import base_config, parse_arg

# timm ghostnet group_matcher(coarse=False): stem, blocks.i.j, conv_head joining the last block
# ('+', timm's MATCH_PREV_GROUP), then the classifier.
GHOSTNET_LAYERS = (r'^(?:conv_stem|bn1)/', r'^blocks_(\d+)_(\d+)/', r'+^conv_head/')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, runlocal=False)
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
  c.optimizer.schedule = 'cosine'
  c.optimizer.schedule_unit = 'epoch'
  c.optimizer.schedule_epoch_lag = 0
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.min_lr = 1e-6
  c.optimizer.layer_decay = 0.5          # paper Table 1 (as summarised)
  c.optimizer.layer_decay_groups = GHOSTNET_LAYERS

  c.ema_decay = 0.9999
  c.half_precision = True
  c.eval_batch_size = 1000
  c.checkpoint_every_steps = 2000
  c.log_every_steps = 100

  if arg.runlocal:
    runlocal(c, model='parameternet_300m', global_batch_size=32)
  return c
