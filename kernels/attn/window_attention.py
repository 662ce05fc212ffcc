"""``window_attention(q, k, v, bias, window_mask=None, scale=None)``: Swin's window attention with its relative
position bias and shifted-window mask, fused; one op (kernels/_op.py).

Swin's blocks attend inside windows of N = Wh*Ww tokens (36 for 6x6, 49 for 7x7). q, k, v are
[B*nW, H, N, d] with the window index of row b equal to ``b mod nW`` (the order of Swin's window partition);
the learnable relative position bias [H, N, N] is shared by every window, and in shifted blocks a constant
mask [nW, N, N] (0 / -100) keeps tokens of different regions apart. timm and the official code add both to a
materialised [B*nW, H, N, N] score tensor; here they are added inside the kernels.

Forward (row b of B*nW, window ``w = b mod nW``; ``S = scale q k^T + bias + mask[w]``, ``P = softmax_row(S)``)::

    out = P v                    [B*nW, H, N, d], memory [B*nW, N, H, d]-contiguous

Backward (``g`` = dL/d out; P recomputed, nothing saved but the inputs)::

    dv = P^T g    dP = g v^T    dS = P * (dP - rowsum(P dP))
    dq = scale dS k    dk = scale dS^T q    dbias = sum_b dS[b]   (no gradient for the constant mask)

Backends (see :mod:`kernels._backend`):

* ``triton``     one fused forward and one fused backward kernel (:mod:`kernels.attn.window_attention_triton`):
  the whole N x N tile of a (window, head) stays in registers, so no [B*nW, H, N, N] tensor is written; dbias
  is summed over the windows in float32 per program and reduced once on the host (no atomics: bitwise
  reproducible). CUDA tensors of float16/bfloat16/float32 with N <= 64 and head dim <= 64; on sm_8x,
  float16/bfloat16 windows of more than 32 tokens need head dim <= 32 (:func:`capability_reasons`: the one
  launch config whose compile spills). CPU only under ``TRITON_INTERPRET=1`` when forced.
* ``reference``  the math path of :mod:`kernels.attn.reference` (any device, dtype, N and head dim); the CPU
  default; its backward is autograd's.

The output layout is the same on every backend (the fake implementation promises it). float32 inputs: the
Triton dots use TF32 when ``torch.get_float32_matmul_precision()`` is ``"high"`` or ``"medium"`` and full
IEEE float32 otherwise, as :func:`kernels.attention` does, except the backward of windows over 32 tokens,
which always runs IEEE dots (its TF32 build spills registers).
"""

# ruff: noqa: UP045
from __future__ import annotations

import dataclasses
import functools
from typing import Optional  # custom-op schema inference: Optional[Tensor] works on every torch >= 2.11

import torch
from torch import Tensor

from kernels._backend import define_op, triton_reasons
from kernels._op import custom_op, eager_function, nothing, reference_grads
from kernels.attn.attention import check_qkv, check_table, resolve_scale, tensor_core_reasons
from kernels.attn.reference import heads_last_empty, window_attention_reference

TRITON_MAX_TOKENS = 64
TRITON_MAX_HEAD_DIM = 64

# ----------------------------------------------------------------------------------------------------------
# inputs


@dataclasses.dataclass(frozen=True)
class WindowAttentionInputs:
    """Checked arguments: ``scale`` resolved to a float."""

    q: Tensor
    k: Tensor
    v: Tensor
    bias: Optional[Tensor]
    window_mask: Optional[Tensor]
    scale: float

    @property
    def args(self) -> tuple:
        return (self.q, self.k, self.v, self.bias, self.window_mask, self.scale)


def validate(q, k, v, bias=None, window_mask=None, scale=None) -> WindowAttentionInputs:
    check_qkv("window_attention", "[B*nW, H, N, d]", q, k, v)
    BW, H, N, d = q.shape
    if min(BW, H, N, d) < 1:
        raise ValueError(f"window_attention: q has an empty dimension: {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"window_attention: {name} must have the shape of q [B*nW, H, N, d] = {tuple(q.shape)} "
                             f"(self-attention inside each window), got {tuple(t.shape)}")
    check_table("bias", bias, q)
    if bias is not None and tuple(bias.shape) != (H, N, N):
        raise ValueError(f"window_attention: bias must be the relative position bias [H, N, N] = [{H}, {N}, {N}] "
                         f"of q {tuple(q.shape)}, got {tuple(bias.shape)}")
    check_table("window_mask", window_mask, q)
    if window_mask is not None:
        if window_mask.dim() != 3 or tuple(window_mask.shape[1:]) != (N, N) or window_mask.shape[0] < 1:
            raise ValueError(f"window_attention: window_mask must be [nW, N, N] = [nW, {N}, {N}], "
                             f"got {tuple(window_mask.shape)}")
        if BW % window_mask.shape[0]:
            raise ValueError(f"window_attention: window_mask has nW = {window_mask.shape[0]} windows, which does not "
                             f"divide the B*nW = {BW} rows of q")
        if window_mask.requires_grad:
            raise ValueError("window_attention: window_mask is a constant and gets no gradient; pass it detached "
                             "(e.g. a buffer)")
    return WindowAttentionInputs(q, k, v, bias, window_mask, resolve_scale(scale, d))


# ----------------------------------------------------------------------------------------------------------
# backends

OP = define_op(
    "window_attention",
    "Swin window attention softmax(q k^T * scale + bias + mask[b mod nW]) v, dbias summed over the windows",
)


def capability_reasons(dtype: torch.dtype, n: int, head_dim: int, capability: tuple[int, int]) -> list[str]:
    """Launch configs the Triton kernels do not take on a GPU of this compute capability because their compile
    spills registers (``python -m bench.static_gpu_check --ops window_attention``): the fused backward of
    windows over 32 tokens at head dim over 32 in float16/bfloat16 on sm_8x (8 warps: 32 B; Swin's heads are
    32 wide)."""
    if capability[0] < 9 and dtype in (torch.float16, torch.bfloat16) and n > 32 and head_dim > 32:
        return [f"windows of {n} tokens at head dim {head_dim} in {dtype} are not supported by the Triton kernel "
                f"on compute capability {capability[0]}.{capability[1]} (its fused backward spills registers there; "
                "at most 32 tokens or head dim 32)"]
    return []


def _triton_reasons(i: WindowAttentionInputs) -> list[str]:
    reasons = triton_reasons(i.q, i.k, i.v, i.bias, i.window_mask)
    reasons += tensor_core_reasons(i.q, TRITON_MAX_HEAD_DIM, bias=i.bias, window_mask=i.window_mask)
    if i.q.is_cuda:
        reasons += capability_reasons(i.q.dtype, i.q.shape[2], i.q.shape[3],
                                      torch.cuda.get_device_capability(i.q.device))
    if i.q.shape[2] > TRITON_MAX_TOKENS:
        reasons.append(f"windows of {i.q.shape[2]} tokens are not supported by the Triton kernel (at most "
                       f"{TRITON_MAX_TOKENS}, an 8x8 window)")
    return reasons


@OP.register("triton", _triton_reasons, note="fused fwd + fused bwd, dbias without atomics")
def _forward_triton(i: WindowAttentionInputs) -> Tensor:
    from kernels.attn.window_attention_triton import window_attention_forward

    return window_attention_forward(*i.args)


@OP.register("reference", note="math path")
def _forward_reference(i: WindowAttentionInputs) -> Tensor:
    """The custom op's reference forward (in the kernels' output layout); eager calls run
    :func:`window_attention_reference` directly instead."""
    return heads_last_empty(i.q).copy_(window_attention_reference(*i.args))


# ----------------------------------------------------------------------------------------------------------
# forward, backward and the autograd formula (once)


def _forward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], window_mask: Optional[Tensor],
             scale: float) -> Tensor:
    """out [B*nW, H, N, d] in q's dtype."""
    i = WindowAttentionInputs(q, k, v, bias, window_mask, scale)
    return OP.select(i).fn(i)


def _backward_kernels(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                      window_mask: Optional[Tensor], scale: float,
                      need_dbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The Triton backward: (dq, dk, dv, dbias); dbias [H, N, N] in bias's dtype, or 0 elements unless
    ``need_dbias``."""
    from kernels.attn.window_attention_triton import window_attention_backward

    need_dbias = bool(need_dbias and bias is not None)
    dq, dk, dv, db = window_attention_backward(grad_out, q, k, v, bias, window_mask, scale, need_dbias)
    return dq, dk, dv, db if need_dbias else nothing(q)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, window_mask, scale = inputs
    ctx.backend = OP.select(WindowAttentionInputs(*inputs)).backend
    ctx.save_for_backward(q, k, v, bias, window_mask)  # both backends recompute P from the inputs
    ctx.scale = scale


def _grads(bwd, ctx, grad_out):
    needs = ctx.needs_input_grad
    if ctx.backend == "reference":
        grads = reference_grads(window_attention_reference, ctx.saved_tensors, needs[:5], (grad_out,),
                                scale=ctx.scale)
        return (*grads, None)
    q, k, v, bias, window_mask = ctx.saved_tensors
    need_dbias = bias is not None and needs[3]
    dq, dk, dv, db = bwd(grad_out, q, k, v, bias, window_mask, ctx.scale, need_dbias)
    return dq, dk, dv, (db if need_dbias else None), None, None


fwd_op = custom_op("window_attention_fwd", _forward)
bwd_op = custom_op("window_attention_bwd", _backward_kernels)


@fwd_op.register_fake
def _(q, k, v, bias, window_mask, scale):
    return heads_last_empty(q)


@bwd_op.register_fake
def _(grad_out, q, k, v, bias, window_mask, scale, need_dbias):
    db = bias.new_empty(bias.shape) if (need_dbias and bias is not None) else nothing(q)
    return heads_last_empty(q), heads_last_empty(k), heads_last_empty(v), db


fwd_op.register_autograd(functools.partial(_grads, bwd_op), setup_context=_setup_context)
WindowAttentionFunction = eager_function("WindowAttentionFunction", _forward, _setup_context,
                                         functools.partial(_grads, _backward_kernels))


# ----------------------------------------------------------------------------------------------------------
# public API


def window_attention(q, k, v, bias=None, window_mask=None, scale=None):
    """``softmax(q k^T * scale + bias + window_mask[b mod nW]) v`` for every window row b and head.

    Args:
        q, k, v: [B*nW, H, N, d], any strides, one floating dtype; row b is window ``b mod nW`` of image
            ``b // nW`` (Swin's window partition order).
        bias: optional relative position bias [H, N, N] (learnable; any strides, e.g. the permuted gather of
            the table). Its gradient is summed over all B*nW rows in float32 and returned in its dtype.
        window_mask: optional constant [nW, N, N] (Swin's shifted-window mask: 0 / -100; any finite values or
            -inf); nW must divide B*nW. It never gets a gradient.
        scale: multiplier of ``q k^T``; default ``d ** -0.5``.

    Returns:
        [B*nW, H, N, d] in q's dtype. The Triton backend returns a [B*nW, N, H, d]-contiguous tensor viewed
        as [B*nW, H, N, d], so ``out.transpose(1, 2).reshape(B*nW, N, H * d)`` is free.
    """
    i = validate(q, k, v, bias, window_mask, scale)
    if torch.compiler.is_compiling():  # one opaque custom op in the graph
        return fwd_op(*i.args)
    impl = OP.select(i)
    if impl.backend == "reference":
        return window_attention_reference(*i.args)
    with OP.pinned(impl):
        return WindowAttentionFunction.apply(*i.args)
