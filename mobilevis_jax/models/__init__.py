"""Model families. Importing this package registers every model."""
from mobilevis_jax.models import mobilevig, parameternet, parc_convnets, parcnet, regnet, repvit  # noqa: F401
from mobilevis_jax.models.registry import (ModelInfo, can_fuse, create_model, fuse, list_models,
                                           model_info, register_fuse, register_model)

__all__ = ["ModelInfo", "can_fuse", "create_model", "fuse", "list_models", "model_info",
           "register_fuse", "register_model"]
