"""Kernels for self-supervised visual pre-training.

Every op dispatches between a native extension (``kernels._C``), Triton and a pure-PyTorch reference;
see :mod:`kernels._backend`. Importing this package never imports triton, never loads the extension
and never initialises CUDA.
"""

from kernels._backend import (
    BACKENDS,
    REGISTRY,
    NativeUnavailableError,
    NotSupportedError,
    forced_backend,
    use_backend,
)
from kernels.attn import MultiheadSelfAttention, RelativePositionBias
from kernels.attn.attention import attention
from kernels.attn.window_attention import window_attention
from kernels.masks import blockwise_masks, random_masks, simmim_masks, spark_masks
from kernels.sparse_conv import SparseBatchNorm2d, SparseConv2d, SparseLayerNorm, sparse_context, to_sparse
from kernels.sparse_conv.masked_batch_norm import masked_batch_norm
from kernels.sparse_conv.sparse_conv2d import sparse_conv2d
from kernels.masked import MaskedLMHead, MaskedTokenEmbedding
from kernels.masked.gather_masked import gather_masked
from kernels.masked.masked_cross_entropy import masked_cross_entropy
from kernels.masked.masked_token_scatter import masked_token_scatter
from kernels.codebook import VectorQuantizer
from kernels.codebook.codebook_usage import codebook_usage
from kernels.codebook.commitment_loss import commitment_loss
from kernels.codebook.ema_codebook_update import ema_codebook_update
from kernels.codebook.kmeans_init_codebook import kmeans_init_codebook
from kernels.codebook.nearest_code import nearest_code
from kernels import library  # registers the torch.library custom ops (namespace ssl_kernels)
from kernels.patch import PatchReport, patch_timm

__all__ = [
    "BACKENDS",
    "REGISTRY",
    "NativeUnavailableError",
    "NotSupportedError",
    "forced_backend",
    "use_backend",
    "attention",
    "window_attention",
    "MultiheadSelfAttention",
    "RelativePositionBias",
    "blockwise_masks",
    "random_masks",
    "simmim_masks",
    "spark_masks",
    "sparse_conv2d",
    "SparseConv2d",
    "SparseBatchNorm2d",
    "SparseLayerNorm",
    "masked_batch_norm",
    "sparse_context",
    "to_sparse",
    "masked_token_scatter",
    "gather_masked",
    "masked_cross_entropy",
    "MaskedTokenEmbedding",
    "MaskedLMHead",
    "nearest_code",
    "ema_codebook_update",
    "commitment_loss",
    "kmeans_init_codebook",
    "codebook_usage",
    "VectorQuantizer",
    "library",
    "PatchReport",
    "patch_timm",
]
