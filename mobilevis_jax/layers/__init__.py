"""Shared building blocks: PyTorch-compatible BatchNorm and convolutions, activations,
squeeze-excite, stochastic depth, layer scale and the re-parameterisation algebra.

The family-specific operators (ParC, SVGA, dynamic convolution) live in their own modules here
(``parc``, ``svga``, ``knn_graph``, ``dynamic_conv``) and are imported from them directly.
"""
from mobilevis_jax.layers import reparam
from mobilevis_jax.layers.activations import gelu, hard_sigmoid, hard_swish, relu, relu6, silu
from mobilevis_jax.layers.conv import (
                                       Conv,
                                       Conv2d,
                                       ConvBN,
                                       Dense,
                                       Linear,
                                       explicit_padding,
                                       fan_in_uniform,
                                       fan_out_normal_init,
                                       kaiming_normal_init,
                                       make_divisible,
                                       torch_default_bias_init,
                                       torch_default_kernel_init,
                                       trunc_normal_init,
)
from mobilevis_jax.layers.norm import BatchNorm, sync_batch_stats
from mobilevis_jax.layers.regularization import DropPath, LayerScale
from mobilevis_jax.layers.squeeze_excite import SqueezeExcite

__all__ = [
    "BatchNorm", "Conv", "Conv2d", "ConvBN", "Dense", "DropPath", "LayerScale", "Linear",
    "SqueezeExcite", "explicit_padding", "fan_in_uniform", "fan_out_normal_init", "gelu",
    "hard_sigmoid", "hard_swish", "kaiming_normal_init", "make_divisible", "relu", "relu6",
    "reparam", "silu", "sync_batch_stats",
    "torch_default_bias_init", "torch_default_kernel_init", "trunc_normal_init",
]
