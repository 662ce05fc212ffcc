"""Sparse (submanifold) convolution for masked convnets (SparK): kernels, activity maps, sparse modules.

The ops live in their own modules (``from kernels import sparse_conv2d, masked_batch_norm``):
:mod:`kernels.sparse_conv.sparse_conv2d` (``sparse_conv2d(x, active, weight, ...) -> (out, active_out)``) and
:mod:`kernels.sparse_conv.masked_batch_norm`; their oracles in :mod:`kernels.sparse_conv.reference`. The
modules and ``to_sparse(model)`` run a dense ResNet/ConvNeXt sparsely inside ``with sparse_context(active):``.
"""

from kernels.sparse_conv.active import active_site_index, conv_output_size, downsample_active, upsample_active
from kernels.sparse_conv.context import ActivityMaps, current_maps, sparse_context
from kernels.sparse_conv.convert import SparseReport, to_sparse
from kernels.sparse_conv.masked_batch_norm import MaskedBatchNormFunction
from kernels.sparse_conv.modules import (
    SparseAdaptiveAvgPool2d,
    SparseAvgPool2d,
    SparseBatchNorm2d,
    SparseConv2d,
    SparseLayerNorm,
    SparseMaxPool2d,
)
from kernels.sparse_conv.sparse_conv2d import SparseConv2dFunction

__all__ = [
    "ActivityMaps",
    "MaskedBatchNormFunction",
    "SparseAdaptiveAvgPool2d",
    "SparseAvgPool2d",
    "SparseBatchNorm2d",
    "SparseConv2d",
    "SparseConv2dFunction",
    "SparseLayerNorm",
    "SparseMaxPool2d",
    "SparseReport",
    "active_site_index",
    "conv_output_size",
    "current_maps",
    "downsample_active",
    "sparse_context",
    "to_sparse",
    "upsample_active",
]
