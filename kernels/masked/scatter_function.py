"""masked_token_scatter: validation, dispatch and the autograd Function around the Triton launchers.

    out[b, C + n] = (mask[b, n] ? mask_token : x[b, n]) + pos[C + n - S]      n < N
    out[b, 0]     = cls_token + pos[0]                                        (C = 1 with a cls token)

S = N + C - P is the shift of a P-row position table (P = N: patch rows only, P = N + 1: row 0 is cls's).
Backward: grad_x = g * ~mask, grad_mask_token = sum of g over masked rows, grad_pos[p] = sum_b g[b, p + S],
grad_cls = sum_b g[b, 0].
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels._backend import define_op, triton_reasons
from kernels.masked._checks import FLOAT_DTYPES, check_mask, check_same_device, check_tensor, check_vector
from kernels.masked.reference import masked_token_scatter_reference

scatter_op = define_op(
    "masked_token_scatter", doc="replace masked tokens by a mask token, add cls and pos embed"
)


def _validate(x, mask, mask_token, pos_embed, cls_token):
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    B, N, D = x.shape
    check_mask(mask, (B, N))
    check_vector("mask_token", mask_token, D)
    if cls_token is not None:
        check_vector("cls_token", cls_token, D)
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=(2, 3), dtypes=FLOAT_DTYPES)
        rows = N + (1 if cls_token is not None else 0)
        ok_rows = (N, rows)
        if pos_embed.dim() == 3 and pos_embed.shape[0] != 1:
            raise ValueError(
                f"pos_embed: expected shape (P, {D}) or (1, P, {D}), got {tuple(pos_embed.shape)}"
            )
        if pos_embed.shape[-1] != D or pos_embed.shape[-2] not in ok_rows:
            want = f"({N}, {D})" + (f" or ({rows}, {D}) (row 0 for cls)" if cls_token is not None else "")
            hint = "" if cls_token is not None else "; N+1 rows need cls_token"
            raise ValueError(f"pos_embed: expected shape {want}, got {tuple(pos_embed.shape)}{hint}")
    check_same_device(x=x, mask=mask, mask_token=mask_token, pos_embed=pos_embed, cls_token=cls_token)


class MaskedTokenScatterFunction(torch.autograd.Function):
    """One Triton launch forward; one launch (+ a tiny fp32 reduction of per-tile partials) backward."""

    @staticmethod
    def forward(ctx, x, mask, mask_token, pos_embed, cls_token):
        from kernels.masked.triton_scatter import masked_token_scatter_forward

        out = masked_token_scatter_forward(x, mask, mask_token, pos_embed, cls_token)
        ctx.save_for_backward(mask)
        ctx.meta = (
            x.dtype,
            mask_token.dtype,
            None if pos_embed is None else (pos_embed.shape[0], pos_embed.dtype),
            None if cls_token is None else cls_token.dtype,
        )
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        from kernels.masked.triton_scatter import masked_token_scatter_backward

        (mask,) = ctx.saved_tensors
        x_dtype, tok_dtype, pos_meta, cls_dtype = ctx.meta
        need_x, _, need_tok, need_pos, need_cls = ctx.needs_input_grad
        gx, gtok, gpos, gcls = masked_token_scatter_backward(
            grad_out,
            mask,
            pos_rows=None if pos_meta is None else pos_meta[0],
            has_cls=cls_dtype is not None,
            need_x=need_x,
            need_tok=need_tok,
            need_pos=need_pos,
            need_cls=need_cls,
        )
        if gx is not None:
            gx = gx.to(x_dtype)
        if gtok is not None:
            gtok = gtok.to(tok_dtype)
        if gpos is not None:
            gpos = gpos.to(pos_meta[1])
        if gcls is not None:
            gcls = gcls.to(cls_dtype)
        return gx, None, gtok, gpos, gcls


def _triton_reasons(x, mask, mask_token, pos_embed=None, cls_token=None):
    return triton_reasons(x, mask, mask_token, pos_embed, cls_token)


@scatter_op.register("triton", _triton_reasons)
def _scatter_triton(x, mask, mask_token, pos_embed=None, cls_token=None):
    D = x.shape[-1]
    tok = mask_token.reshape(D)
    cls = None if cls_token is None else cls_token.reshape(D)
    pos = None if pos_embed is None else pos_embed.reshape(-1, D)
    return MaskedTokenScatterFunction.apply(x, mask, tok, pos, cls)


@scatter_op.register("reference")
def _scatter_reference(x, mask, mask_token, pos_embed=None, cls_token=None):
    D = x.shape[-1]
    return masked_token_scatter_reference(
        x, mask, mask_token.reshape(D), pos_embed, None if cls_token is None else cls_token.reshape(D)
    )


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
    _validate(x, mask, mask_token, pos_embed, cls_token)
    if torch.compiler.is_compiling():  # one opaque custom op in the graph (kernels.library)
        from kernels._library.masked import masked_token_scatter as registered

        return registered(x, mask, mask_token, pos_embed, cls_token)
    return scatter_op(x, mask, mask_token, pos_embed, cls_token)
