"""Trainer-test recipe: the tiny registered CNN (tests/train/tiny_model.py) on synthetic 16x16 data.

Run (from the repository root): python tests/train/worker.py train --config tests/train/tiny_config.py --workdir DIR
"""

from mobilevis_jax.train.config import base_config
from tests.train import tiny_model  # noqa: F401  (registers the model this recipe names)


def get_config():
  c = base_config()
  c.model = 'trainer_test_tiny_cnn'
  c.data.name = 'synthetic'
  c.data.image_size = 16
  with c.data.unlocked():  # the synthetic source's knobs (mobilevis_jax/train/synthetic.py)
    c.data.synthetic_num_classes = 10
    c.data.synthetic_num_train = 512
    c.data.synthetic_num_eval = 64
    c.data.synthetic_nan_step = -1
  c.global_batch_size = 16
  c.num_train_steps = 24
  c.eval_batch_size = 32
  c.eval_every_epochs = 0.0
  c.optimizer.base_lr = 3e-3
  c.optimizer.schedule_unit = 'step'   # a 24-step run: per-step warm-up and cosine
  c.optimizer.warmup_steps = 4
  c.optimizer.weight_decay = 0.05
  c.ema_decay = 0.9
  c.data.label_smoothing = 0.1
  c.checkpoint_every_steps = 4
  c.checkpoint_keep = 10
  c.log_every_steps = 4
  c.progress_bar = False
  c.tensorboard = False
  return c
