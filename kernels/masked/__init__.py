"""Masked-image-modelling ops: masked-token scatter, masked-row gather, chunked masked cross-entropy."""

from kernels.masked.ce_function import LinearCrossEntropyFunction, masked_cross_entropy
from kernels.masked.gather_function import GatherMaskedFunction, gather_masked
from kernels.masked.modules import MaskedLMHead, MaskedTokenEmbedding
from kernels.masked.scatter_function import MaskedTokenScatterFunction, masked_token_scatter

__all__ = [
    "GatherMaskedFunction",
    "LinearCrossEntropyFunction",
    "MaskedLMHead",
    "MaskedTokenEmbedding",
    "MaskedTokenScatterFunction",
    "gather_masked",
    "masked_cross_entropy",
    "masked_token_scatter",
]
