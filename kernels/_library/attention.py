"""``ssl_kernels::attention_fwd`` / ``ssl_kernels::attention_bwd``: attention with an additive bias as custom ops.

Forward (``S = scale q k^T + bias``, ``P = softmax_row(S)``)::

    out  = P v                                   [B, H, Nq, d], memory [B, Nq, H, d]-contiguous
    lse2 = log2 sum_j exp(S_ij) = logsumexp(S) / ln 2      [B, H, Nq] float32 (saved for the backward)

Backward (``g`` = dL/d out, ``delta_i = sum_j P_ij dP_ij``)::

    dv = P^T g        dP = g v^T        dS = P * (dP - delta)
    dq = scale dS k   dk = scale dS^T q   dbias = dS summed over the dims the bias broadcasts

The Triton backend runs the fused kernels of :mod:`kernels.attn.attention_triton` (its backward uses
``lse2``); the reference backend evaluates the formulas above in float32 (float64 for float64 inputs)
and recomputes P instead of reading ``lse2``, so a forward and backward may even run on different
backends. The output layout is the same on every backend (the fake implementation promises it), so
``out.transpose(1, 2).reshape(B, Nq, H * d)`` is a free view after the op as well.
"""

# ruff: noqa: UP045
from __future__ import annotations

import math
from typing import Optional  # custom-op schema inference: Optional[Tensor] works on every torch >= 2.11

import torch
from torch import Tensor

from kernels._library import acc_dtype, backend_for, nothing, qualname

LN2 = math.log(2.0)


def _out_buffer(q: Tensor) -> Tensor:
    B, H, n_q, d = q.shape
    return torch.empty((B, n_q, H, d), dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)


def _scores(q, k, bias, scale, dtype):
    s = torch.matmul(q.to(dtype), k.to(dtype).transpose(-2, -1)) * scale
    return s if bias is None else s + bias.to(dtype)


def _reduce_to(grad: Tensor, bias: Tensor) -> Tensor:
    """Sum ``grad`` [B, H, Nq, Nk] over the dims ``bias`` broadcasts along; result in bias's shape and dtype."""
    shape4 = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    dims = [i for i in range(2) if shape4[i] == 1 and grad.shape[i] != 1]
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
    return grad.reshape(bias.shape).to(bias.dtype)


@torch.library.custom_op(qualname("attention_fwd"), mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float,
                  deterministic: bool) -> tuple[Tensor, Tensor]:
    """(out, lse2); ``deterministic`` only matters to the backward (saved with the inputs)."""
    if backend_for("attention", q, k, v, bias, scale, deterministic) == "triton":
        from kernels.attn import attention_triton as triton_kernels

        return triton_kernels.attention_forward(q, k, v, bias, scale)
    from kernels.attn.reference import attention_reference

    s = _scores(q, k, bias, scale, acc_dtype(q.dtype, *(() if bias is None else (bias.dtype,))))
    lse2 = (torch.logsumexp(s, dim=-1) / LN2).to(torch.float32)
    out = _out_buffer(q)
    out.copy_(attention_reference(q, k, v, bias, scale))
    return out, lse2


@attention_fwd.register_fake
def _(q, k, v, bias, scale, deterministic):
    B, H, n_q, _ = q.shape
    return _out_buffer(q), q.new_empty((B, H, n_q), dtype=torch.float32)


@torch.library.custom_op(qualname("attention_bwd"), mutates_args=())
def attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], out: Tensor,
                  lse2: Tensor, scale: float, need_dbias: bool,
                  deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dbias); dbias has bias's shape and dtype, or 0 elements unless ``need_dbias``."""
    need_dbias = bool(need_dbias and bias is not None)
    if backend_for("attention", q, k, v, bias, scale, deterministic) == "triton":
        from kernels.attn import attention_triton as triton_kernels

        dq, dk, dv, db = triton_kernels.attention_backward(
            grad_out, q, k, v, bias, out, lse2, scale, need_dbias=need_dbias, deterministic=deterministic
        )
        return dq, dk, dv, db if need_dbias else nothing(q)
    ct = acc_dtype(q.dtype, *(() if bias is None else (bias.dtype,)))
    p = torch.softmax(_scores(q, k, bias, scale, ct), dim=-1)
    g = grad_out.to(ct)
    dv = torch.matmul(p.transpose(-2, -1), g)
    dp = torch.matmul(g, v.to(ct).transpose(-2, -1))
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    dq = torch.matmul(ds, k.to(ct)) * scale
    dk = torch.matmul(ds.transpose(-2, -1), q.to(ct)) * scale
    grads = [torch.empty_like(t).copy_(d) for t, d in ((q, dq), (k, dk), (v, dv))]
    return (*grads, _reduce_to(ds, bias) if need_dbias else nothing(q))


@attention_bwd.register_fake
def _(grad_out, q, k, v, bias, out, lse2, scale, need_dbias, deterministic):
    db = bias.new_empty(bias.shape) if (need_dbias and bias is not None) else nothing(q)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), db


def _setup_context(ctx, inputs, output):
    q, k, v, bias, scale, deterministic = inputs
    out, lse2 = output
    ctx.save_for_backward(q, k, v, bias, out, lse2)
    ctx.scale, ctx.deterministic = scale, deterministic
    ctx.mark_non_differentiable(lse2)


def _backward(ctx, grad_out, _grad_lse2):
    q, k, v, bias, out, lse2 = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, db = attention_bwd(grad_out, q, k, v, bias, out, lse2, ctx.scale, need_dbias, ctx.deterministic)
    return dq, dk, dv, (db if need_dbias else None), None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(q, k, v, bias=None, scale=None, deterministic=False):
    """``softmax(q k^T * scale + bias) v`` through the registered ops; same checks as :func:`kernels.attention`."""
    from kernels.attn.attention import _check_inputs

    _check_inputs(q, k, v, bias, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return attention_fwd(q, k, v, bias, scale, bool(deterministic))[0]
