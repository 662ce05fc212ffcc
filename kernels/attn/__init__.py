"""Fused attention with a learnable additive bias (relative position bias) and its gradient."""

from kernels.attn.attention import AttentionFunction, attention, attention_op
from kernels.attn.modules import MultiheadSelfAttention
from kernels.attn.reference import attention_probabilities, attention_reference
from kernels.attn.relative_position import RelativePositionBias, relative_position_index
from kernels.attn.window_attention import WindowAttentionFunction, window_attention, window_attention_op
from kernels.attn.window_attention_reference import window_attention_reference

__all__ = [
    "AttentionFunction",
    "MultiheadSelfAttention",
    "RelativePositionBias",
    "attention",
    "attention_op",
    "attention_probabilities",
    "attention_reference",
    "relative_position_index",
    "WindowAttentionFunction",
    "window_attention",
    "window_attention_op",
    "window_attention_reference",
]
