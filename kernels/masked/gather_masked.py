"""gather_masked: the masked rows of [B, N, D] as a dense [M, D] matrix, row-major, without host syncs.

    out[b k + j] = h[b, n_j(b)]        n_j(b) = the j-th masked position of row b      (num_masked = k)
    grad_h       = g scattered back to the masked positions, 0 elsewhere

Fast path (``num_masked=k``): M = B*k. The Triton kernel ranks the masked positions with an in-register
prefix sum of the mask row, so no index tensor, ``nonzero`` or boolean indexing is needed; backward writes
every element of grad_h (g at masked positions, 0 elsewhere) in one launch.

Count validation: every row must hold exactly k masked positions. Checking that needs a device->host copy,
so it runs only for CPU tensors or with ``KERNELS_DEBUG=1`` (then a ValueError). Otherwise a row with
fewer than k masked positions gets NaN rows in its missing slots (so a loss computed from it is NaN, not
silently wrong) and a row with more keeps its first k.

Slow path (``num_masked=None``): the per-row counts are read on the host (one sync); if they are all equal
the fast path runs, otherwise the same kernels run with per-row output offsets (exclusive cumsum of counts)
on the Triton backend, or boolean indexing ``h[mask]`` on the reference backend. The custom op takes
``num_masked = -1`` for None (its fake gives the row count a dynamic size).

Backends: ``triton`` (CUDA tensors; CPU under ``TRITON_INTERPRET=1`` when forced) and ``reference``
(``kernels/masked/reference.py``, pure PyTorch, whose backward is autograd's).
"""

# ruff: noqa: UP045
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
from torch import Tensor

from kernels._backend import define_op, triton_reasons
from kernels._checks import FLOAT_DTYPES, check_mask, check_same_device, check_tensor, host_checks_enabled
from kernels._op import custom_op, eager_function, reference_grads
from kernels.masked.reference import gather_masked_reference

# ----------------------------------------------------------------------------------------------------------
# inputs


@dataclasses.dataclass(frozen=True)
class GatherMaskedInputs:
    """Checked arguments; ``num_masked`` is k or None (variable counts: one host sync)."""

    h: Tensor
    mask: Tensor
    num_masked: Optional[int]

    @property
    def tensors(self) -> tuple:
        return (self.h, self.mask)

    @property
    def k(self) -> int:
        """num_masked as the custom ops take it: -1 for None."""
        return -1 if self.num_masked is None else self.num_masked


def validate(h, mask, num_masked=None) -> GatherMaskedInputs:
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
    return GatherMaskedInputs(h, mask, num_masked)


def resolve_counts(mask):
    """One host sync: (k, None, B*k) when every row has the same count k, else (None, counts, total)."""
    counts = mask.sum(dim=1)
    if counts.numel() == 0:
        return 0, None, 0
    lo, hi = torch.aminmax(counts)
    lo, hi, total = torch.stack([lo, hi, counts.sum()]).tolist()
    return (lo, None, total) if lo == hi else (None, counts, total)


# ----------------------------------------------------------------------------------------------------------
# backends

OP = define_op("gather_masked", doc="masked rows of [B,N,D] -> [M,D] without host syncs")


@OP.register("triton", lambda i: triton_reasons(*i.tensors))
def _forward_triton(i: GatherMaskedInputs) -> Tensor:
    from kernels.masked.gather_masked_triton import gather_masked_forward

    k = i.num_masked
    if k is None:  # one sync; uniform counts take the fixed-count kernel
        k, counts, total = resolve_counts(i.mask)
        if k is None:
            return gather_masked_forward(i.h, i.mask, offsets=torch.cumsum(counts, 0) - counts, total=total)
    return gather_masked_forward(i.h, i.mask, k=k)


@OP.register("reference")
def _forward_reference(i: GatherMaskedInputs) -> Tensor:
    return gather_masked_reference(i.h, i.mask, i.num_masked)


# ----------------------------------------------------------------------------------------------------------
# forward, backward and the autograd formula (once)


def _forward(h: Tensor, mask: Tensor, num_masked: int) -> Tensor:
    """h [B, N, D] -> [M, D]; ``num_masked`` = k (M = B k) or -1 (M = mask.sum(), one host sync)."""
    i = GatherMaskedInputs(h, mask, None if num_masked < 0 else num_masked)
    return OP.select(i).fn(i).contiguous()


def _backward_kernels(grad_out: Tensor, mask: Tensor, num_masked: int) -> Tensor:
    """The Triton backward, [M, D] -> [B, N, D]: rows back to their masked positions, zeros elsewhere (slots
    a short row lacked are dropped); ``num_masked = -1``: per-row offsets from the mask (no host sync)."""
    from kernels.masked.gather_masked_triton import gather_masked_backward

    if num_masked < 0:
        counts = mask.sum(dim=1)
        return gather_masked_backward(grad_out, mask, offsets=torch.cumsum(counts, 0) - counts)
    return gather_masked_backward(grad_out, mask, k=num_masked)


def _setup_context(ctx, inputs, output):
    h, mask, num_masked = inputs
    ctx.backend = OP.select(GatherMaskedInputs(h, mask, None if num_masked < 0 else num_masked)).backend
    ctx.save_for_backward(*((h, mask) if ctx.backend == "reference" else (mask,)))
    ctx.num_masked, ctx.h_dtype = num_masked, h.dtype


def _grads(bwd, ctx, grad_out):
    if ctx.backend == "reference":
        h, mask = ctx.saved_tensors
        k = None if ctx.num_masked < 0 else ctx.num_masked
        return reference_grads(gather_masked_reference, (h, mask, k), ctx.needs_input_grad, (grad_out,))
    (mask,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None
    return bwd(grad_out, mask, ctx.num_masked).to(ctx.h_dtype), None, None


fwd_op = custom_op("gather_masked_fwd", _forward)
bwd_op = custom_op("gather_masked_bwd", _backward_kernels)


@fwd_op.register_fake
def _(h, mask, num_masked):
    B, _, D = h.shape
    rows = B * num_masked if num_masked >= 0 else torch.library.get_ctx().new_dynamic_size()
    return h.new_empty((rows, D))


@bwd_op.register_fake
def _(grad_out, mask, num_masked):
    return grad_out.new_empty((*mask.shape, grad_out.shape[-1]))


fwd_op.register_autograd(functools.partial(_grads, bwd_op), setup_context=_setup_context)
GatherMaskedFunction = eager_function("GatherMaskedFunction", _forward, _setup_context,
                                      functools.partial(_grads, _backward_kernels))


# ----------------------------------------------------------------------------------------------------------
# public API


def gather_masked(h, mask, num_masked=None):
    """Masked rows of ``h`` [B, N, D] as [M, D] in row-major order of the masked positions.

    Args:
        h: [B, N, D] float tensor, any strides (e.g. ``h[:, 1:]`` to skip a cls row).
        mask: [B, N] bool.
        num_masked: k, the number of masked positions in every row (fast path, no host sync, M = B*k);
            None to detect (one host sync; variable counts per row are supported, M = mask.sum()).
    """
    i = validate(h, mask, num_masked)
    if torch.compiler.is_compiling():
        return fwd_op(i.h, i.mask, i.k)
    impl = OP.select(i)
    if impl.backend == "reference":
        return impl.fn(i)
    with OP.pinned(impl):
        return GatherMaskedFunction.apply(i.h, i.mask, i.k)
