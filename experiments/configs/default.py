"""Default recipe: RepViT-M0.6 on the embedded digits dataset at 32x32 (the README quick start).

Reproduces: no paper number; >= 95% test top-1 on scikit-learn's digits within 10 minutes on
2 CPU cores, JAX compilation included (see mobilevis_jax/train/default_config.py, which this file
returns so that `mobilevis train` without --config runs the same thing on an installed package).

Run:      mobilevis train --config experiments/configs/default.py --workdir /tmp/digits
Hardware: 2 CPU cores (any accelerator works unchanged).
"""

from mobilevis_jax.train import default_config


def get_config():
  return default_config.get_config()
