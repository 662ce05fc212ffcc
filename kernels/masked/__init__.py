"""Masked-image-modelling ops: masked-token scatter, masked-row gather, chunked masked cross-entropy.

One module per op, named as the op (``masked_token_scatter.py``, ``gather_masked.py``,
``masked_cross_entropy.py``; their kernels in ``<op>_triton.py``), the family's pure-PyTorch oracle in
``reference.py``, the nn.Module wrappers in ``modules.py``. The op functions are imported from ``kernels``
(``from kernels import gather_masked``); this package does not re-export them, so that
``kernels.masked.<op>`` always names the module.
"""

from kernels.masked.gather_masked import GatherMaskedFunction
from kernels.masked.masked_cross_entropy import MaskedCrossEntropyFunction
from kernels.masked.modules import MaskedLMHead, MaskedTokenEmbedding

__all__ = [
    "GatherMaskedFunction",
    "MaskedCrossEntropyFunction",
    "MaskedLMHead",
    "MaskedTokenEmbedding",
]
