"""PyTorch interop: export Flax variables as PyTorch state_dicts and import them back.

Each family describes its PyTorch key layout(s) in ``interop/<family>.py`` as a list of
:class:`~mobilevis_jax.interop.keymap.Entry`; the converters here are generic.
"""
from mobilevis_jax.interop import mobilevig, parameternet, parc_convnets, parcnet, regnet, repvit  # noqa: F401,E402
from mobilevis_jax.interop.export import export_torch
from mobilevis_jax.interop.io import load_state_dict, read_metadata, save_state_dict
from mobilevis_jax.interop.keymap import Entry, register_torch_layout
from mobilevis_jax.interop.state_dict import (
  StateDictError,
  from_torch_state_dict,
  to_torch_state_dict,
)

__all__ = ["Entry", "StateDictError", "export_torch", "from_torch_state_dict", "load_state_dict",
           "read_metadata", "register_torch_layout", "save_state_dict", "to_torch_state_dict"]
