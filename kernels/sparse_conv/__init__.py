"""Sparse (submanifold) convolution for masked convnets (SparK): kernels, activity maps, sparse modules.

``sparse_conv2d(x, active, weight, ...) -> (out, active_out)``; modules and ``to_sparse(model)`` run a dense
ResNet/ConvNeXt sparsely inside ``with sparse_context(active):``.
"""

from kernels.sparse_conv.active import active_site_index, conv_output_size, downsample_active, upsample_active
from kernels.sparse_conv.batch_norm import (
    MaskedBatchNormFunction,
    masked_batch_norm,
    masked_batch_norm_reference,
)
from kernels.sparse_conv.context import ActivityMaps, current_maps, sparse_context
from kernels.sparse_conv.convert import SparseReport, to_sparse
from kernels.sparse_conv.function import SparseConv2dFunction, sparse_conv2d
from kernels.sparse_conv.modules import (
    SparseAdaptiveAvgPool2d,
    SparseAvgPool2d,
    SparseBatchNorm2d,
    SparseConv2d,
    SparseLayerNorm,
    SparseMaxPool2d,
)

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
    "masked_batch_norm",
    "masked_batch_norm_reference",
    "sparse_context",
    "sparse_conv2d",
    "to_sparse",
    "upsample_active",
]
