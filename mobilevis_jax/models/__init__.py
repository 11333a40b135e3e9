"""Model families. Importing this package registers every model."""
from mobilevis_jax.models import (  # noqa: F401
                                           mobilevig,
                                           parameternet,
                                           parc_convnets,
                                           parcnet,
                                           pretrained_cfgs,  # noqa: F401  (fills the registry's cfg table)
                                           regnet,
                                           repvit,
)
from mobilevis_jax.models.registry import (
                                           ModelInfo,
                                           can_fuse,
                                           create_model,
                                           fuse,
                                           list_models,
                                           model_info,
                                           register_fuse,
                                           register_model,
)

__all__ = ["ModelInfo", "can_fuse", "create_model", "fuse", "list_models", "model_info",
           "register_fuse", "register_model"]
