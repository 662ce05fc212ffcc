"""Custom ops of the masked-image-modelling kernels (``ssl_kernels::masked_token_scatter_*``,
``gather_masked_*``, ``masked_cross_entropy_fwd``).

masked_token_scatter (``C`` = 1 with a cls token, ``S = N + C - P`` the shift of a P-row position table)::

    out[b, C + n] = (mask[b, n] ? tok : x[b, n]) + pos[C + n - S],   out[b, 0] = cls + pos[0]
    gx = g[:, C:] * ~mask,  gtok = sum_{mask} g[:, C:],  gpos = sum_b g[b, S:],  gcls = sum_b g[b, 0]

gather_masked (``num_masked = k >= 0``: k rows per sample, M = B k; ``-1``: any counts, M data-dependent)::

    out[b k + j] = h[b, n_j(b)]          gh = g scattered back to the masked positions, 0 elsewhere

masked_cross_entropy_fwd on gathered rows ``h [M, D]`` (gradients computed in the forward, as the Triton
path does; the backward only scales them by ``grad_loss / max(n_valid, 1)``)::

    z = h W^T + b,  loss = sum_valid (logsumexp z_i - z_i[t_i]) / max(n_valid, 1)
    dz = (softmax z - onehot t) * valid,  gh = dz W,  gW = dz^T h,  gb = sum_i dz_i

Gradients that were not requested come back as 0-element tensors (custom-op schemas return no None).
"""

# ruff: noqa: UP045
from __future__ import annotations

from typing import Optional  # custom-op schema inference: Optional[Tensor] works on every torch >= 2.11

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._library import acc_dtype, backend_for, nothing, qualname

# ----------------------------------------------------------------------------------------------------------
# gather_masked


@torch.library.custom_op(qualname("gather_masked_fwd"), mutates_args=())
def gather_masked_fwd(h: Tensor, mask: Tensor, num_masked: int) -> Tensor:
    """h [B, N, D] -> [M, D]; ``num_masked`` = k (M = B k) or -1 (M = mask.sum(), one host sync)."""
    k = None if num_masked < 0 else num_masked
    if backend_for("gather_masked", h, mask, k) == "triton":
        from kernels.masked.gather_function import resolve_counts
        from kernels.masked.triton_gather import gather_masked_forward

        if k is None:
            k, counts, total = resolve_counts(mask)
            if k is None:
                return gather_masked_forward(h, mask, offsets=torch.cumsum(counts, 0) - counts, total=total)
        return gather_masked_forward(h, mask, k=k)
    from kernels.masked.reference import gather_masked_reference

    return gather_masked_reference(h, mask, k).contiguous()


@gather_masked_fwd.register_fake
def _(h, mask, num_masked):
    B, _, D = h.shape
    rows = B * num_masked if num_masked >= 0 else torch.library.get_ctx().new_dynamic_size()
    return h.new_empty((rows, D))


@torch.library.custom_op(qualname("gather_masked_bwd"), mutates_args=())
def gather_masked_bwd(grad_out: Tensor, mask: Tensor, num_masked: int) -> Tensor:
    """[M, D] -> [B, N, D]: rows back to their masked positions (slots a short row lacked are dropped)."""
    B, N = mask.shape
    D = grad_out.shape[-1]
    k = None if num_masked < 0 else num_masked
    if backend_for("gather_masked", grad_out, mask, k) == "triton":  # (the choice depends on devices only)
        from kernels.masked.triton_gather import gather_masked_backward

        if k is None:
            counts = mask.sum(dim=1)
            return gather_masked_backward(grad_out, mask, offsets=torch.cumsum(counts, 0) - counts)
        return gather_masked_backward(grad_out, mask, k=k)
    gh = grad_out.new_zeros((B, N, D))
    if k is None:
        gh[mask] = grad_out
        return gh
    from kernels.masked.reference import masked_positions

    idx = masked_positions(mask, k)
    valid = (torch.arange(k, device=mask.device).unsqueeze(0) < mask.sum(dim=1, keepdim=True)).unsqueeze(-1)
    g = torch.where(valid, grad_out.reshape(B, k, D), 0)
    return gh.scatter_(1, idx.unsqueeze(-1).expand(B, k, D), g)


@gather_masked_bwd.register_fake
def _(grad_out, mask, num_masked):
    return grad_out.new_empty((*mask.shape, grad_out.shape[-1]))


def _gather_setup(ctx, inputs, output):
    h, mask, num_masked = inputs
    ctx.save_for_backward(mask)
    ctx.num_masked, ctx.h_dtype = num_masked, h.dtype


def _gather_backward(ctx, grad_out):
    (mask,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None
    return gather_masked_bwd(grad_out, mask, ctx.num_masked).to(ctx.h_dtype), None, None


gather_masked_fwd.register_autograd(_gather_backward, setup_context=_gather_setup)


def gather_masked(h, mask, num_masked=None):
    """Same contract and checks as :func:`kernels.gather_masked`, through the registered ops."""
    from kernels.masked.gather_function import _validate

    _validate(h, mask, num_masked)
    return gather_masked_fwd(h, mask, -1 if num_masked is None else int(num_masked))


# ----------------------------------------------------------------------------------------------------------
# masked_cross_entropy


@torch.library.custom_op(qualname("masked_cross_entropy_fwd"), mutates_args=())
def masked_cross_entropy_fwd(h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, ignore_index: int,
                             dtype: torch.dtype, chunk_rows: int, need_h: bool, need_w: bool,
                             need_b: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, accuracy, gh, gW, gb, 1 / max(n_valid, 1)) for h [M, D], targets [M] int64; GEMMs in ``dtype``,
    softmax and gW/gb accumulation in float32 (float64); grads unscaled, 0-element when not requested."""
    acc = acc_dtype(dtype)
    need_b = need_b and bias is not None
    args = (h, weight, bias, targets, None, ignore_index, False, None, chunk_rows or None)
    if backend_for("masked_cross_entropy", *args) == "triton":
        from kernels.masked.triton_ce import linear_cross_entropy_forward

        with torch.autocast(h.device.type, enabled=False):
            loss, accuracy, gh, gw, gb, inv_n = linear_cross_entropy_forward(
                h, weight, bias, targets, ignore_index=ignore_index, dtype=dtype, chunk_rows=chunk_rows or None,
                need_h=need_h, need_w=need_w, need_b=need_b,
            )
    else:
        w = weight.to(dtype)
        z = F.linear(h.to(dtype), w, None if bias is None else bias.to(dtype)).to(acc)
        valid = targets != ignore_index
        n_valid = valid.sum().to(acc).clamp_min(1.0)
        safe = torch.where(valid, targets, 0)
        lse = torch.logsumexp(z, dim=-1)
        loss = torch.where(valid, lse - z.gather(1, safe.unsqueeze(1)).squeeze(1), 0).sum() / n_valid
        accuracy = ((z.argmax(dim=-1) == targets) & valid).sum().to(acc) / n_valid
        inv_n = 1.0 / n_valid
        dz = (torch.softmax(z, dim=-1) - F.one_hot(safe, z.shape[-1]).to(acc)) * valid.unsqueeze(1).to(acc)
        gh = torch.mm(dz.to(dtype), w).to(h.dtype) if need_h else None
        gw = torch.mm(dz.to(dtype).t(), h.to(dtype)).to(acc) if need_w else None
        gb = dz.sum(dim=0) if need_b else None
    return (loss, accuracy, gh if gh is not None else nothing(h), gw if gw is not None else nothing(h, acc),
            gb if gb is not None else nothing(h, acc), inv_n)


@masked_cross_entropy_fwd.register_fake
def _(h, weight, bias, targets, ignore_index, dtype, chunk_rows, need_h, need_w, need_b):
    acc = acc_dtype(dtype)
    scalar = h.new_empty((), dtype=acc)
    return (scalar, h.new_empty((), dtype=acc), h.new_empty(h.shape) if need_h else nothing(h),
            h.new_empty(weight.shape, dtype=acc) if need_w else nothing(h, acc),
            h.new_empty((weight.shape[0],), dtype=acc) if (need_b and bias is not None) else nothing(h, acc),
            h.new_empty((), dtype=acc))


def _ce_setup(ctx, inputs, output):
    h, weight, bias, _targets, _ii, _dtype, _chunk, need_h, need_w, need_b = inputs
    _loss, accuracy, gh, gw, gb, inv_n = output
    ctx.save_for_backward(gh, gw, gb, inv_n)
    ctx.need = (need_h, need_w, need_b and bias is not None)
    ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.mark_non_differentiable(accuracy, gh, gw, gb, inv_n)


def _ce_backward(ctx, grad_loss, *_unused):
    gh, gw, gb, inv_n = ctx.saved_tensors
    scale = grad_loss.to(inv_n.dtype) * inv_n
    grads = [(g * scale).to(dt) if (need and ok) else None
             for g, dt, need, ok in zip((gh, gw, gb), ctx.dtypes, ctx.need, ctx.needs_input_grad[:3])]
    return (*grads, None, None, None, None, None, None, None)


masked_cross_entropy_fwd.register_autograd(_ce_backward, setup_context=_ce_setup)


def masked_cross_entropy(h, weight, bias, targets, mask=None, ignore_index=-100, return_accuracy=False,
                         num_masked=None, chunk_rows=None):
    """Same contract and checks as :func:`kernels.masked_cross_entropy`, through the registered ops.

    With ``mask`` and ``num_masked=k`` the masked rows are gathered (no host sync, static shapes). With
    ``mask`` and ``num_masked=None`` every row is kept and unmasked rows get ``ignore_index`` as target:
    the same loss, accuracy and gradients without a data-dependent shape, at the cost of the GEMMs over
    all N rows (pass ``num_masked`` when every sample masks the same count).
    """
    from kernels.masked.ce_function import _validate, compute_dtype
    from kernels.masked.reference import gather_targets

    _validate(h, weight, bias, targets, mask, ignore_index, num_masked)
    D = h.shape[-1]
    if mask is not None and num_masked is not None:
        h2 = gather_masked(h, mask, int(num_masked))
        t2 = gather_targets(targets, mask, int(num_masked))
    elif mask is not None:
        h2 = h.reshape(-1, D)
        t2 = torch.where(mask, targets, ignore_index).reshape(-1)
    else:
        h2, t2 = h.reshape(-1, D), targets.reshape(-1)
    grad = torch.is_grad_enabled()
    loss, accuracy, *_ = masked_cross_entropy_fwd(
        h2, weight, bias, t2.long().contiguous(), int(ignore_index), compute_dtype(h, weight), int(chunk_rows or 0),
        grad and h2.requires_grad, grad and weight.requires_grad, grad and bias is not None and bias.requires_grad,
    )
    return (loss, accuracy) if return_accuracy else loss
