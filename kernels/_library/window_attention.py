"""``ssl_kernels::window_attention_fwd`` / ``ssl_kernels::window_attention_bwd``: Swin window attention as custom ops.

Forward (row b of B*nW, window ``w = b mod nW``; ``S = scale q k^T + bias + mask[w]``, ``P = softmax_row(S)``)::

    out = P v                    [B*nW, H, N, d], memory [B*nW, N, H, d]-contiguous

Backward (``g`` = dL/d out; P recomputed, nothing saved but the inputs)::

    dv = P^T g    dP = g v^T    dS = P * (dP - rowsum(P dP))
    dq = scale dS k    dk = scale dS^T q    dbias = sum_b dS[b]   (no gradient for the constant mask)

The Triton backend runs the fused kernels of :mod:`kernels.attn.window_attention_triton`; the reference
backend evaluates the formulas above in float32 (float64 for float64 inputs). The output layout is the same on
every backend (the fake implementation promises it).
"""

# ruff: noqa: UP045
from __future__ import annotations

from typing import Optional  # custom-op schema inference: Optional[Tensor] works on every torch >= 2.11

import torch
from torch import Tensor

from kernels._library import acc_dtype, backend_for, nothing, qualname


def _out_buffer(q: Tensor) -> Tensor:
    BW, H, N, d = q.shape
    return torch.empty((BW, N, H, d), dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)


def _dtypes(q, bias, mask):
    return acc_dtype(q.dtype, *(t.dtype for t in (bias, mask) if t is not None))


def _probabilities(q, k, bias, mask, scale, ct):
    from kernels.attn.window_attention_reference import window_scores

    s = window_scores(q.to(ct), k.to(ct), None if bias is None else bias.to(ct),
                      None if mask is None else mask.to(ct), scale)
    return torch.softmax(s, dim=-1)


@torch.library.custom_op(qualname("window_attention_fwd"), mutates_args=())
def window_attention_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], window_mask: Optional[Tensor],
                         scale: float) -> Tensor:
    """out [B*nW, H, N, d] in q's dtype."""
    if backend_for("window_attention", q, k, v, bias, window_mask, scale) == "triton":
        from kernels.attn import window_attention_triton as wt

        return wt.window_attention_forward(q, k, v, bias, window_mask, scale)
    ct = _dtypes(q, bias, window_mask)
    out = _out_buffer(q)
    out.copy_(torch.matmul(_probabilities(q, k, bias, window_mask, scale, ct), v.to(ct)))
    return out


@window_attention_fwd.register_fake
def _(q, k, v, bias, window_mask, scale):
    return _out_buffer(q)


@torch.library.custom_op(qualname("window_attention_bwd"), mutates_args=())
def window_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                         window_mask: Optional[Tensor], scale: float,
                         need_dbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dbias); dbias [H, N, N] in bias's dtype, or 0 elements unless ``need_dbias``."""
    need_dbias = bool(need_dbias and bias is not None)
    if backend_for("window_attention", q, k, v, bias, window_mask, scale) == "triton":
        from kernels.attn import window_attention_triton as wt

        dq, dk, dv, db = wt.window_attention_backward(grad_out, q, k, v, bias, window_mask, scale, need_dbias)
        return dq, dk, dv, db if need_dbias else nothing(q)
    ct = _dtypes(q, bias, window_mask)
    p = _probabilities(q, k, bias, window_mask, scale, ct)
    g = grad_out.to(ct)
    dv = torch.matmul(p.transpose(-2, -1), g)
    dp = torch.matmul(g, v.to(ct).transpose(-2, -1))
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    dq = torch.matmul(ds, k.to(ct)) * scale
    dk = torch.matmul(ds.transpose(-2, -1), q.to(ct)) * scale
    grads = [_out_buffer(t).copy_(d) for t, d in ((q, dq), (k, dk), (v, dv))]
    return (*grads, ds.sum(0).to(bias.dtype) if need_dbias else nothing(q))


@window_attention_bwd.register_fake
def _(grad_out, q, k, v, bias, window_mask, scale, need_dbias):
    db = bias.new_empty(bias.shape) if (need_dbias and bias is not None) else nothing(q)
    return _out_buffer(q), _out_buffer(k), _out_buffer(v), db


def _setup_context(ctx, inputs, output):
    q, k, v, bias, window_mask, scale = inputs
    ctx.save_for_backward(q, k, v, bias, window_mask)
    ctx.scale = scale


def _backward(ctx, grad_out):
    q, k, v, bias, window_mask = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, db = window_attention_bwd(grad_out, q, k, v, bias, window_mask, ctx.scale, need_dbias)
    return dq, dk, dv, (db if need_dbias else None), None, None


window_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def window_attention(q, k, v, bias=None, window_mask=None, scale=None):
    """Window attention through the registered ops; same checks as :func:`kernels.window_attention`."""
    from kernels.attn.window_attention import _check_inputs

    _check_inputs(q, k, v, bias, window_mask, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return window_attention_fwd(q, k, v, bias, window_mask, scale)
