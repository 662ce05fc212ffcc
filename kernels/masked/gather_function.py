"""gather_masked: the masked rows of [B, N, D] as a dense [M, D] matrix, row-major, without host syncs.

Fast path (``num_masked=k``): M = B*k and out[b*k + j] = h[b, n_j(b)] with n_j(b) the j-th masked position
of row b. The Triton kernel ranks the masked positions with an in-register prefix sum of the mask row, so
no index tensor, ``nonzero`` or boolean indexing is needed; backward writes every element of grad_h
(g at masked positions, 0 elsewhere) in one launch.

Count validation: every row must hold exactly k masked positions. Checking that needs a device->host copy,
so it runs only for CPU tensors or with ``KERNELS_DEBUG=1`` (then a ValueError). Otherwise a row with
fewer than k masked positions gets NaN rows in its missing slots (so a loss computed from it is NaN, not
silently wrong) and a row with more keeps its first k.

Slow path (``num_masked=None``): the per-row counts are read on the host (one sync); if they are all equal
the fast path runs, otherwise the same kernels run with per-row output offsets (exclusive cumsum of counts)
on the Triton backend, or boolean indexing ``h[mask]`` on the reference backend.
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
from kernels.masked.reference import gather_masked_reference

gather_op = define_op("gather_masked", doc="masked rows of [B,N,D] -> [M,D] without host syncs")


def _validate(h, mask, num_masked):
    check_tensor("h", h, ndim=3, dtypes=FLOAT_DTYPES)
    B, N, _ = h.shape
    check_mask(mask, (B, N))
    check_same_device(h=h, mask=mask)
    if num_masked is None and mask.device.type == "meta":
        raise ValueError(
            "num_masked: None needs the mask's values (the number of output rows depends on them) and meta "
            "tensors have none; pass num_masked=k (every row masks k positions)"
        )
    if num_masked is not None:
        if isinstance(num_masked, bool) or not isinstance(num_masked, int):
            raise TypeError(f"num_masked: expected an int or None, got {type(num_masked).__name__}")
        if not 0 <= num_masked <= N:
            raise ValueError(f"num_masked: expected 0 <= num_masked <= N={N}, got {num_masked}")
        if host_checks_enabled(mask):
            counts = mask.sum(dim=1)
            bad = (counts != num_masked).nonzero().flatten()
            if bad.numel():
                r = int(bad[0])
                raise ValueError(
                    f"mask: num_masked={num_masked} but row {r} has {int(counts[r])} masked positions "
                    f"({bad.numel()} rows differ); pass num_masked=None for variable counts"
                )


def resolve_counts(mask):
    """One host sync: (k, None, B*k) when every row has the same count k, else (None, counts, total)."""
    counts = mask.sum(dim=1)
    if counts.numel() == 0:
        return 0, None, 0
    lo, hi = torch.aminmax(counts)
    lo, hi, total = torch.stack([lo, hi, counts.sum()]).tolist()
    return (lo, None, total) if lo == hi else (None, counts, total)


class GatherMaskedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, mask, k, offsets, total):
        from kernels.masked.triton_gather import gather_masked_forward

        ctx.save_for_backward(mask, offsets)
        ctx.k = k
        ctx.h_dtype = h.dtype
        return gather_masked_forward(h, mask, k=k, offsets=offsets, total=total)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        from kernels.masked.triton_gather import gather_masked_backward

        mask, offsets = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        gh = gather_masked_backward(grad_out, mask, k=ctx.k, offsets=offsets)
        return gh.to(ctx.h_dtype), None, None, None, None


def _triton_reasons(h, mask, num_masked=None):
    return triton_reasons(h, mask)


@gather_op.register("triton", _triton_reasons)
def _gather_triton(h, mask, num_masked=None):
    if num_masked is None:
        num_masked, counts, total = resolve_counts(mask)
        if num_masked is None:
            offsets = torch.cumsum(counts, 0) - counts
            return GatherMaskedFunction.apply(h, mask, None, offsets, total)
    return GatherMaskedFunction.apply(h, mask, int(num_masked), None, h.shape[0] * int(num_masked))


@gather_op.register("reference")
def _gather_reference(h, mask, num_masked=None):
    return gather_masked_reference(h, mask, num_masked)


def gather_masked(h, mask, num_masked=None):
    """Masked rows of ``h`` [B, N, D] as [M, D] in row-major order of the masked positions.

    Args:
        h: [B, N, D] float tensor, any strides (e.g. ``h[:, 1:]`` to skip a cls row).
        mask: [B, N] bool.
        num_masked: k, the number of masked positions in every row (fast path, no host sync, M = B*k);
            None to detect (one host sync; variable counts per row are supported, M = mask.sum()).
    """
    _validate(h, mask, num_masked)
    if torch.compiler.is_compiling():  # one opaque custom op in the graph (kernels.library)
        from kernels._library.masked import gather_masked as registered

        return registered(h, mask, num_masked)
    return gather_op(h, mask, num_masked)
