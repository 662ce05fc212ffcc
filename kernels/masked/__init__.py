"""Masked-image-modelling ops: masked-token scatter, masked-row gather, chunked masked cross-entropy.

One module per op, named as the op (``masked_token_scatter.py``, its kernels in ``masked_token_scatter_triton.py``,
the family's pure-PyTorch oracle in ``reference.py``). The op functions are imported from ``kernels``
(``from kernels import masked_token_scatter``); this package does not re-export them, so that
``kernels.masked.masked_token_scatter`` always names the module.
"""

from kernels.masked.ce_function import LinearCrossEntropyFunction, masked_cross_entropy
from kernels.masked.gather_function import GatherMaskedFunction, gather_masked
from kernels.masked.modules import MaskedLMHead, MaskedTokenEmbedding

__all__ = [
    "GatherMaskedFunction",
    "LinearCrossEntropyFunction",
    "MaskedLMHead",
    "MaskedTokenEmbedding",
    "gather_masked",
    "masked_cross_entropy",
]
