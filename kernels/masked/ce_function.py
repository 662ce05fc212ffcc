"""masked_cross_entropy: linear head + cross-entropy over the masked rows, chunked (logits never whole).

    z_i   = h_i W^T + b                      (per chunk of rows, cuBLAS via torch.matmul)
    l_i   = logsumexp(z_i) - z_i[t_i]        (rows with t_i == ignore_index contribute 0)
    loss  = sum_i l_i / max(n_valid, 1)      (0 when no row counts, not NaN)
    dz_i  = softmax(z_i) - onehot(t_i)      (0 for ignored rows) written in place over z_i by a Triton kernel
    dh    = dz W,  dW += dz^T h,  db += sum_i dz_i            (accumulated chunk by chunk in the forward)

Backward only multiplies the stored grads by grad_output / max(n_valid, 1) (the factor is kept out of dz so
fp16 logits do not underflow). No host synchronisation anywhere (n_valid stays on the device). Targets outside [0, V) (other than ignore_index)
raise a ValueError when checkable without a sync (CPU tensors or ``KERNELS_DEBUG=1``); otherwise the
Triton kernel makes that row's loss NaN.

Dtypes: the GEMMs run in ``promote_types(h.dtype, weight.dtype)``, or in the autocast dtype when autocast
is enabled for the device (like ``nn.Linear`` under autocast); softmax/loss math is fp32 (fp64 for fp64);
grad_weight / grad_bias accumulate in fp32 and are returned in the parameters' dtypes. Under ``no_grad``
(or when nothing requires grad) only the loss is computed: one GEMM per chunk instead of three.

Peak extra memory: one chunk of logits (default ~2^25 elements = 64 MiB in bf16), grad_h [M, D] and an fp32
grad_weight [V, D]; the eager reference holds [M, V] logits in the compute dtype plus fp32 copies.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels._backend import define_op, triton_reasons
from kernels.masked._checks import (
    FLOAT_DTYPES,
    check_mask,
    check_same_device,
    check_tensor,
    host_checks_enabled,
)
from kernels.masked.gather_function import _gather_triton, resolve_counts
from kernels.masked.gather_function import _validate as _validate_gather
from kernels.masked.reference import gather_targets, masked_cross_entropy_reference

ce_op = define_op("masked_cross_entropy", doc="chunked linear head + cross-entropy over masked rows")


def _validate(h, weight, bias, targets, mask, ignore_index, num_masked, chunk_rows=None):
    check_tensor("h", h, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, optional=True)
    check_tensor("targets", targets, dtypes=(torch.int64, torch.int32))
    D = h.shape[-1]
    V = weight.shape[0]
    if V == 0:
        raise ValueError("weight: expected at least one row (vocabulary size V >= 1), got shape (0, D)")
    if weight.shape[1] != D:
        raise ValueError(f"weight: expected shape (V, {D}) (D of h), got {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != V:
        raise ValueError(f"bias: expected shape ({V},) (V of weight), got {tuple(bias.shape)}")
    if tuple(targets.shape) != tuple(h.shape[:-1]):
        raise ValueError(
            f"targets: expected shape {tuple(h.shape[:-1])} (the leading dims of h), "
            f"got {tuple(targets.shape)}"
        )
    if mask is not None:
        if h.dim() != 3:
            raise ValueError(f"mask: given, so h must be [B, N, D], got h of shape {tuple(h.shape)}")
        check_mask(mask, h.shape[:2])
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    bad_chunk = isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1
    if chunk_rows is not None and bad_chunk:
        raise ValueError(f"chunk_rows: expected None or a positive int, got {chunk_rows!r}")
    check_same_device(h=h, weight=weight, bias=bias, targets=targets, mask=mask)
    if mask is not None and not (num_masked is None and mask.device.type == "meta"):  # meta: see below
        _validate_gather(h, mask, num_masked)
    if host_checks_enabled(targets) and targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
        if mask is not None:
            bad &= mask
        if bad.any():
            v = int(targets[bad][0])
            raise ValueError(f"targets: expected values in [0, {V}) or ignore_index={ignore_index}, got {v}")


def compute_dtype(h, weight):
    dev = h.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, weight.dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Grads are computed in the forward, chunk by chunk; backward scales them by grad_output / n_valid."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, ignore_index, dtype, chunk_rows):
        from kernels.masked.triton_ce import linear_cross_entropy_forward

        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        with torch.autocast(h.device.type, enabled=False):  # dtypes are chosen explicitly (``dtype``)
            loss, acc, gh, gw, gb, inv_n = linear_cross_entropy_forward(
                h,
                weight,
                bias,
                targets,
                ignore_index=ignore_index,
                dtype=dtype,
                chunk_rows=chunk_rows,
                need_h=need_h,
                need_w=need_w,
                need_b=need_b,
            )
        ctx.save_for_backward(gh, gw, gb, inv_n)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(acc)
        return loss, acc

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_acc):
        gh, gw, gb, inv_n = ctx.saved_tensors
        scale = grad_loss.to(inv_n.dtype) * inv_n
        gh, gw, gb = (None if g is None else (g * scale).to(dt) for g, dt in zip((gh, gw, gb), ctx.dtypes))
        return gh, gw, gb, None, None, None, None


def _triton_reasons(
    h,
    weight,
    bias,
    targets,
    mask=None,
    ignore_index=-100,
    return_accuracy=False,
    num_masked=None,
    chunk_rows=None,
):
    return triton_reasons(h, weight, bias, targets, mask)


@ce_op.register("triton", _triton_reasons)
def _ce_triton(
    h,
    weight,
    bias,
    targets,
    mask=None,
    ignore_index=-100,
    return_accuracy=False,
    num_masked=None,
    chunk_rows=None,
):
    dtype = compute_dtype(h, weight)
    if mask is not None:
        if num_masked is None:  # one sync; uniform counts then take the sync-free gathers below
            num_masked = resolve_counts(mask)[0]
        h2 = _gather_triton(h, mask, num_masked)
        t2 = gather_targets(targets, mask, num_masked)
    else:
        h2 = h.reshape(-1, h.shape[-1])
        t2 = targets.reshape(-1)
    t2 = t2.long().contiguous()  # the kernel reads targets[row] with unit stride
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (h2, weight, bias)
    )
    if wants_grad:
        loss, acc = LinearCrossEntropyFunction.apply(h2, weight, bias, t2, ignore_index, dtype, chunk_rows)
    else:  # evaluation: loss (and accuracy) only, no gradient GEMMs
        from kernels.masked.triton_ce import linear_cross_entropy_forward

        with torch.autocast(h.device.type, enabled=False):
            loss, acc, *_ = linear_cross_entropy_forward(
                h2,
                weight,
                bias,
                t2,
                ignore_index=ignore_index,
                dtype=dtype,
                chunk_rows=chunk_rows,
                need_h=False,
                need_w=False,
                need_b=False,
            )
    return (loss, acc) if return_accuracy else loss


@ce_op.register("reference")
def _ce_reference(
    h,
    weight,
    bias,
    targets,
    mask=None,
    ignore_index=-100,
    return_accuracy=False,
    num_masked=None,
    chunk_rows=None,
):
    return masked_cross_entropy_reference(
        h, weight, bias, targets.long(), mask, ignore_index, return_accuracy, num_masked
    )


def masked_cross_entropy(
    h,
    weight,
    bias,
    targets,
    mask=None,
    ignore_index=-100,
    return_accuracy=False,
    num_masked=None,
    chunk_rows=None,
):
    """Mean cross-entropy of the linear head ``h W^T + b`` over the masked (non-ignored) rows.

    Args:
        h: [B, N, D] with ``mask`` [B, N] bool, or already-gathered [M, D] (or [B, N, D] = all rows) with
            ``mask=None``.
        weight: [V, D]; bias: [V] or None.
        targets: int64 (or int32) with h's leading shape ([B, N] or [M]).
        ignore_index: rows whose target equals it do not count.
        return_accuracy: also return the top-1 accuracy over the counted rows (no grad).
        num_masked: k masked positions per row: gathers without a host sync (see :func:`gather_masked`).
        chunk_rows: rows per chunk on the Triton path (default: about 64 MiB of logits per chunk).

    Returns:
        scalar fp32 loss, or ``(loss, accuracy)``.
    """
    _validate(h, weight, bias, targets, mask, ignore_index, num_masked, chunk_rows)
    if torch.compiler.is_compiling():  # one opaque custom op in the graph (kernels.library)
        from kernels._library.masked import masked_cross_entropy as registered

        return registered(h, weight, bias, targets, mask, ignore_index, return_accuracy, num_masked, chunk_rows)
    if mask is not None and num_masked is None and mask.device.type == "meta":
        # meta tensors have no mask values to gather by: keep every row and ignore the unmasked ones (the
        # torch.compile strategy: same loss, no data-dependent shape)
        targets = torch.where(mask, targets, torch.full_like(targets, ignore_index))
        h, mask = h.reshape(-1, h.shape[-1]), None
        targets = targets.reshape(-1)
    return ce_op(h, weight, bias, targets, mask, ignore_index, return_accuracy, num_masked, chunk_rows)
