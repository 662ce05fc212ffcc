"""Pure-PyTorch attention with an additive bias: the oracle in tests and the CPU default.

.. math::

    S = \\mathrm{scale}\\; Q K^\\top + \\mathrm{bias}, \\qquad
    P = \\mathrm{softmax}_{\\text{row}}(S), \\qquad O = P V

with ``q`` [B,H,Nq,d], ``k`` [B,H,Nk,d], ``v`` [B,H,Nk,d] and ``bias`` broadcastable to [B,H,Nq,Nk].
Autograd gives every gradient, including ``dbias`` summed over the broadcast dimensions.
No triton import here.
"""

from __future__ import annotations

import math

import torch


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def attention_probabilities(q, k, bias=None, scale=None):
    """``softmax(q k^T * scale + bias)`` over the last dim, in the promoted dtype of q and bias.

    Low-precision inputs keep their dtype for the matmul (as eager PyTorch would) but the softmax is
    taken in float32 and rounded back, which is what ``torch.softmax`` does internally on every device.
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias
    if scores.dtype in (torch.float16, torch.bfloat16):
        return torch.softmax(scores.float(), dim=-1).to(scores.dtype)
    return torch.softmax(scores, dim=-1)


def attention_reference(q, k, v, bias=None, scale=None, deterministic=None, dropout_p: float = 0.0,
                        training: bool = False):
    """Math path ``softmax(q k^T * scale + bias) v``; ``deterministic`` is accepted and ignored.

    ``dropout_p`` applies dropout to the probabilities (only when ``training``), which the fused kernel
    does not support; :class:`kernels.attention.MultiheadSelfAttention` routes ``attn_drop > 0`` here.
    """
    p = attention_probabilities(q, k, bias, scale)
    if dropout_p > 0.0 and training:
        p = torch.nn.functional.dropout(p, p=dropout_p, training=True)
    return torch.matmul(p.to(v.dtype), v)
