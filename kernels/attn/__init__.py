"""The attention family: fused attention with a learnable additive bias (``attention.py``, the functional op
``kernels.attention``), Swin window attention (``window_attention.py``, ``kernels.window_attention``), their
Triton kernels (``*_triton.py``), the pure-PyTorch oracles (``reference.py``), BEiT's relative position bias
(``relative_position.py``) and the self-attention module (``modules.py``).

The op functions are not re-exported here (their names are the modules'): use ``from kernels import attention``.
"""

from kernels.attn.modules import MultiheadSelfAttention
from kernels.attn.reference import attention_probabilities, attention_reference, window_attention_reference
from kernels.attn.relative_position import RelativePositionBias, relative_position_index

__all__ = [
    "MultiheadSelfAttention",
    "RelativePositionBias",
    "attention_probabilities",
    "attention_reference",
    "relative_position_index",
    "window_attention_reference",
]
