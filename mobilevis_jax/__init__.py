"""mobilevis_jax: mobile vision backbones (RepViT, MobileViG, ParameterNet/GhostNet, ParC-Net) in
JAX/Flax, faithful to the official PyTorch code, with a data-parallel trainer and PyTorch interop.

    >>> import jax, jax.numpy as jnp
    >>> from mobilevis_jax import create_model
    >>> model = create_model('repvit_m1_1')
    >>> variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False)
"""
from mobilevis_jax.models import can_fuse, fuse, list_models, model_info
from mobilevis_jax.models.registry import PretrainedCfg, feature_info
from mobilevis_jax.pretrained import create_model, reset_classifier
from mobilevis_jax.profiling import profile

__version__ = "0.1.0"
__all__ = ["PretrainedCfg", "can_fuse", "create_model", "feature_info", "fuse", "list_models",
           "model_info", "profile", "reset_classifier"]
