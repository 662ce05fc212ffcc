"""masked_token_scatter: BEiT/SimMIM input embedding, one op (the worked example of kernels/_op.py).

With ``C = 1`` when a cls token is prepended and ``S = N + C - P`` the shift of a P-row position table
(P = N: patch rows only; P = N + 1: row 0 is cls's)::

    out[b, C + n] = (mask[b, n] ? mask_token : x[b, n]) + pos[C + n - S]      n < N
    out[b, 0]     = cls_token + pos[0]                                        (C = 1)

    grad_x = g[:, C:] * ~mask      grad_mask_token = sum of g over masked rows
    grad_pos[p] = sum_b g[b, p + S]    grad_cls = sum_b g[b, 0]

Cost (Triton): forward one launch, reads the unmasked rows of x once (masked rows are never read) and
writes ``B (N + C) D`` elements; backward one launch writing grad_x plus fp32 per-split partial sums for the
parameter grads (a tiny torch reduction; no atomics, deterministic). No host sync. Bytes moved, forward:
``(B N (1 - ratio) + B (N + C)) D e`` (+ ``P D e`` for pos), ``e`` = element size.

Backends: ``triton`` (CUDA tensors; CPU under ``TRITON_INTERPRET=1`` when forced) and ``reference``
(``kernels/masked/reference.py``, pure PyTorch, whose backward is autograd's).
"""

# ruff: noqa: UP045
from __future__ import annotations

import dataclasses
import functools
from typing import Optional  # custom-op schema inference: Optional[Tensor] works on every torch >= 2.11

import torch
from torch import Tensor

from kernels._backend import define_op, triton_reasons
from kernels._checks import FLOAT_DTYPES, acc_dtype, check_mask, check_same_device, check_tensor, check_vector
from kernels._op import custom_op, eager_function, nothing, reference_grads
from kernels.masked.reference import masked_token_scatter_reference

# ----------------------------------------------------------------------------------------------------------
# inputs


@dataclasses.dataclass(frozen=True)
class ScatterInputs:
    """Checked arguments: ``mask_token``/``cls_token`` as [D], ``pos_embed`` as [P, D] (or None)."""

    x: Tensor
    mask: Tensor
    mask_token: Tensor
    pos_embed: Optional[Tensor]
    cls_token: Optional[Tensor]

    @property
    def tensors(self) -> tuple:
        return (self.x, self.mask, self.mask_token, self.pos_embed, self.cls_token)


def validate(x, mask, mask_token, pos_embed=None, cls_token=None) -> ScatterInputs:
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    B, N, D = x.shape
    check_mask(mask, (B, N))
    check_vector("mask_token", mask_token, D)
    if cls_token is not None:
        check_vector("cls_token", cls_token, D)
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=(2, 3), dtypes=FLOAT_DTYPES)
        rows = N + (1 if cls_token is not None else 0)
        if pos_embed.dim() == 3 and pos_embed.shape[0] != 1:
            raise ValueError(f"pos_embed: expected shape (P, {D}) or (1, P, {D}), got {tuple(pos_embed.shape)}")
        if pos_embed.shape[-1] != D or pos_embed.shape[-2] not in (N, rows):
            want = f"({N}, {D})" + (f" or ({rows}, {D}) (row 0 for cls)" if cls_token is not None else "")
            hint = "" if cls_token is not None else "; N+1 rows need cls_token"
            raise ValueError(f"pos_embed: expected shape {want}, got {tuple(pos_embed.shape)}{hint}")
    check_same_device(x=x, mask=mask, mask_token=mask_token, pos_embed=pos_embed, cls_token=cls_token)
    return ScatterInputs(x, mask, mask_token.reshape(D), None if pos_embed is None else pos_embed.reshape(-1, D),
                         None if cls_token is None else cls_token.reshape(D))


# ----------------------------------------------------------------------------------------------------------
# backends

OP = define_op("masked_token_scatter", doc="replace masked tokens by a mask token, add cls and pos embed")


@OP.register("triton", lambda i: triton_reasons(*i.tensors))
def _forward_triton(i: ScatterInputs) -> Tensor:
    from kernels.masked.masked_token_scatter_triton import masked_token_scatter_forward

    return masked_token_scatter_forward(i.x, i.mask, i.mask_token, i.pos_embed, i.cls_token)


@OP.register("reference")
def _forward_reference(i: ScatterInputs) -> Tensor:
    return masked_token_scatter_reference(*i.tensors)


# ----------------------------------------------------------------------------------------------------------
# forward, backward and the autograd formula (once)


def _forward(x: Tensor, mask: Tensor, mask_token: Tensor, pos_embed: Optional[Tensor],
             cls_token: Optional[Tensor]) -> Tensor:
    """x [B, N, D], mask [B, N] bool, mask_token [D], pos_embed [P, D] or None, cls_token [D] or None."""
    i = ScatterInputs(x, mask, mask_token, pos_embed, cls_token)
    return OP.select(i).fn(i).contiguous()


def _backward_kernels(grad_out: Tensor, mask: Tensor, pos_rows: int, has_cls: bool, need_x: bool, need_tok: bool,
                      need_pos: bool, need_cls: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The Triton backward: (gx in grad_out's dtype; gtok [D], gpos [pos_rows, D], gcls [D] in the
    accumulation dtype); ``pos_rows = -1``: no position table. Gradients not asked for are 0-element."""
    from kernels.masked.masked_token_scatter_triton import masked_token_scatter_backward

    acc = acc_dtype(grad_out.dtype)
    need_pos, need_cls = need_pos and pos_rows >= 0, need_cls and has_cls
    gx, gtok, gpos, gcls = masked_token_scatter_backward(
        grad_out, mask, None if pos_rows < 0 else pos_rows, has_cls, need_x, need_tok, need_pos, need_cls
    )
    # gpos and gcls may be views of one column-sum buffer: clone so that the outputs never alias
    return (
        gx if gx is not None else nothing(grad_out),
        gtok.to(acc).clone() if gtok is not None else nothing(grad_out, acc),
        gpos.to(acc).clone() if gpos is not None else nothing(grad_out, acc),
        gcls.to(acc).clone() if gcls is not None else nothing(grad_out, acc),
    )


def _setup_context(ctx, inputs, output):
    x, mask, tok, pos, cls = inputs
    ctx.backend = OP.select(ScatterInputs(*inputs)).backend
    ctx.save_for_backward(*(inputs if ctx.backend == "reference" else (mask,)))
    ctx.meta = (x.dtype, tok.dtype, -1 if pos is None else pos.shape[0], None if pos is None else pos.dtype,
                None if cls is None else cls.dtype)


def _grads(bwd, ctx, grad_out):
    needs = ctx.needs_input_grad
    if ctx.backend == "reference":
        return reference_grads(masked_token_scatter_reference, ctx.saved_tensors, needs, (grad_out,))
    (mask,) = ctx.saved_tensors
    x_dt, tok_dt, pos_rows, pos_dt, cls_dt = ctx.meta
    need_x, _, need_tok, need_pos, need_cls = needs
    gx, gtok, gpos, gcls = bwd(grad_out, mask, pos_rows, cls_dt is not None, need_x, need_tok, need_pos, need_cls)
    return (gx.to(x_dt) if need_x else None, None, gtok.to(tok_dt) if need_tok else None,
            gpos.to(pos_dt) if need_pos else None, gcls.to(cls_dt) if need_cls else None)


fwd_op = custom_op("masked_token_scatter_fwd", _forward)
bwd_op = custom_op("masked_token_scatter_bwd", _backward_kernels)


@fwd_op.register_fake
def _(x, mask, mask_token, pos_embed, cls_token):
    B, N, D = x.shape
    return x.new_empty((B, N + (cls_token is not None), D))


@bwd_op.register_fake
def _(grad_out, mask, pos_rows, has_cls, need_x, need_tok, need_pos, need_cls):
    B, N = mask.shape
    D = grad_out.shape[-1]
    acc = acc_dtype(grad_out.dtype)
    return (
        grad_out.new_empty((B, N, D)) if need_x else nothing(grad_out),
        grad_out.new_empty((D,), dtype=acc) if need_tok else nothing(grad_out, acc),
        grad_out.new_empty((pos_rows, D), dtype=acc) if (need_pos and pos_rows >= 0) else nothing(grad_out, acc),
        grad_out.new_empty((D,), dtype=acc) if (need_cls and has_cls) else nothing(grad_out, acc),
    )


fwd_op.register_autograd(functools.partial(_grads, bwd_op), setup_context=_setup_context)
MaskedTokenScatterFunction = eager_function("MaskedTokenScatterFunction", _forward, _setup_context,
                                            functools.partial(_grads, _backward_kernels))


# ----------------------------------------------------------------------------------------------------------
# public API


def masked_token_scatter(x, mask, mask_token, pos_embed=None, cls_token=None):
    """BEiT/SimMIM input embedding: masked patches -> ``mask_token``, optional cls prepended, + ``pos_embed``.

    Args:
        x: [B, N, D] patch embeddings (fp32/bf16/fp16/fp64, any strides).
        mask: [B, N] bool, True where the patch is masked.
        mask_token: [D] (or [1, 1, D]) learned mask embedding.
        pos_embed: optional [N, D] (patch rows only) or [N+1, D] (row 0 for cls; needs ``cls_token``);
            a leading singleton dim is accepted.
        cls_token: optional [D] (or [1, 1, D]) prepended as row 0.

    Returns:
        [B, N (+1), D] in ``x.dtype`` (parameters are cast to it; their grads come back in their own dtype).
    """
    i = validate(x, mask, mask_token, pos_embed, cls_token)
    if torch.compiler.is_compiling():
        return fwd_op(*i.tensors)
    impl = OP.select(i)
    if impl.backend == "reference":
        return impl.fn(i)
    with OP.pinned(impl):
        return MaskedTokenScatterFunction.apply(*i.tensors)
