"""Pure-PyTorch window attention (Swin W-MSA / SW-MSA): the oracle in tests and the CPU default.

With ``q, k, v`` [B*nW, H, N, d] (window ``w = b mod nW`` of batch row ``b``, the order in which Swin's
window partition lays the windows out), a relative position bias ``bias`` [H, N, N] shared by every window
and, in shifted blocks, a constant per-window mask ``window_mask`` [nW, N, N] (0 inside a region, -100
across regions)::

    S[b, h] = scale * Q[b, h] K[b, h]^T + bias[h] + window_mask[b mod nW]
    P = softmax_row(S),   O[b, h] = P V[b, h]

Gradients (autograd here; the fused Triton backward evaluates the same formulas)::

    dS = P * (dP - rowsum(P * dP)),  dP = dO V^T
    dQ = scale dS K,  dK = scale dS^T Q,  dV = P^T dO,  dbias[h] = sum_b dS[b, h]

``window_mask`` is a constant: it never receives a gradient. No triton import here.
"""

from __future__ import annotations

import math

import torch


def window_scores(q, k, bias=None, window_mask=None, scale=None):
    """``scale q k^T + bias + window_mask[b mod nW]`` as [B*nW, H, N, N] (materialised: reference only)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if bias is not None:
        s = s + bias
    if window_mask is not None:
        BW, H, N, _ = s.shape
        nW = window_mask.shape[0]
        s = (s.reshape(BW // nW, nW, H, N, N) + window_mask.unsqueeze(1)).reshape(BW, H, N, N)
    return s


def window_attention_probabilities(q, k, bias=None, window_mask=None, scale=None):
    """Row softmax of :func:`window_scores`; low-precision scores go through a float32 softmax (as eager)."""
    s = window_scores(q, k, bias, window_mask, scale)
    if s.dtype in (torch.float16, torch.bfloat16):
        return torch.softmax(s.float(), dim=-1).to(s.dtype)
    return torch.softmax(s, dim=-1)


def window_attention_reference(q, k, v, bias=None, window_mask=None, scale=None, dropout_p: float = 0.0,
                               training: bool = False):
    """Math path of window attention: [B*nW, H, N, d] in the promoted dtype of q and the bias.

    ``dropout_p`` drops attention probabilities while ``training`` (the fused kernel has no dropout).
    """
    p = window_attention_probabilities(q, k, bias, window_mask, scale)
    if dropout_p > 0.0 and training:
        p = torch.nn.functional.dropout(p, p=dropout_p, training=True)
    return torch.matmul(p.to(v.dtype), v)
