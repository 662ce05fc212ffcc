"""masked_cross_entropy: linear head + cross-entropy over the masked rows, chunked (logits never whole).

    z_i   = h_i W^T + b                      (per chunk of rows, cuBLAS via torch.matmul)
    l_i   = logsumexp(z_i) - z_i[t_i]        (rows with t_i == ignore_index contribute 0)
    loss  = sum_i l_i / max(n_valid, 1)      (0 when no row counts, not NaN)
    dz_i  = softmax(z_i) - onehot(t_i)      (0 for ignored rows) written in place over z_i by a Triton kernel
    dh    = dz W,  dW += dz^T h,  db += sum_i dz_i            (accumulated chunk by chunk in the forward)

The masked rows are gathered first (:mod:`kernels.masked.gather_masked`), then the custom op
``masked_cross_entropy_fwd`` works on the gathered rows [M, D]. On the Triton backend it returns the
gradients with the loss and the backward only multiplies them by grad_output / max(n_valid, 1) (the factor is
kept out of dz so fp16 logits do not underflow); on the reference backend the backward is autograd over
``reference.py`` (:func:`kernels._op.reference_grads`), never a hand-written copy.
No host synchronisation anywhere (n_valid stays on the device). Targets outside [0, V) (other than
ignore_index) raise a ValueError when checkable without a sync (CPU tensors or ``KERNELS_DEBUG=1``);
otherwise the Triton kernel makes that row's loss NaN.

Dtypes: the GEMMs run in ``promote_types(h.dtype, weight.dtype)``, or in the autocast dtype when autocast
is enabled for the device (like ``nn.Linear`` under autocast); softmax/loss math is fp32 (fp64 for fp64);
grad_weight / grad_bias accumulate in fp32 and are returned in the parameters' dtypes. Under ``no_grad``
(or when nothing requires grad) only the loss is computed: one GEMM per chunk instead of three.

Compiled (and on meta tensors) with ``mask`` but no ``num_masked``, every row is kept and unmasked rows get
``ignore_index`` as target: the same loss, accuracy and gradients without a data-dependent shape, at the cost
of the GEMMs over all N rows (pass ``num_masked`` when every sample masks the same count).

Peak extra memory: two chunk buffers of logits (the chunk loop is double-buffered: chunk i+1's first GEMM runs,
on CUDA on a side stream, while chunk i's softmax does; default 2 x 2^24 elements = 64 MiB in bf16 on CUDA,
2 x 2^25 elsewhere), grad_h [M, D] and an fp32 grad_weight [V, D]; the eager reference holds [M, V] logits in
the compute dtype plus fp32 copies.

Backends: ``triton`` (CUDA tensors; CPU under ``TRITON_INTERPRET=1`` when forced) and ``reference``
(``kernels/masked/reference.py``, pure PyTorch, whose backward is autograd's).
"""

# ruff: noqa: UP045
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from kernels._backend import define_op, triton_reasons
from kernels._checks import (
    FLOAT_DTYPES,
    acc_dtype,
    check_mask,
    check_same_device,
    check_tensor,
    host_checks_enabled,
)
from kernels._op import custom_op, eager_function, nothing, reference_grads
from kernels.masked.gather_masked import GatherMaskedFunction, resolve_counts
from kernels.masked.gather_masked import fwd_op as gather_fwd_op
from kernels.masked.gather_masked import validate as validate_gather
from kernels.masked.reference import (
    compute_dtype,
    gather_targets,
    masked_cross_entropy_reference,
    masked_cross_entropy_rows_reference,
)

# ----------------------------------------------------------------------------------------------------------
# inputs


@dataclasses.dataclass(frozen=True)
class MaskedCrossEntropyInputs:
    """Checked arguments: ``h`` [B, N, D] with ``mask`` [B, N], or rows [..., D] with ``mask=None``."""

    h: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    targets: Tensor
    mask: Optional[Tensor]
    ignore_index: int
    num_masked: Optional[int]
    chunk_rows: Optional[int]

    @property
    def tensors(self) -> tuple:
        return (self.h, self.weight, self.bias, self.targets, self.mask)

    def rows(self, gather) -> tuple[Tensor, Tensor]:
        """(h rows [M, D], int64 targets [M]): the masked rows (``gather(h, mask, k or -1)``), or all rows."""
        if self.mask is None:
            h2, t2 = self.h.reshape(-1, self.h.shape[-1]), self.targets.reshape(-1)
        else:
            k = self.num_masked
            h2 = gather(self.h, self.mask, -1 if k is None else k)
            t2 = gather_targets(self.targets, self.mask, k)
        return h2, t2.long().contiguous()  # the kernel reads targets[row] with unit stride

    def all_rows(self) -> MaskedCrossEntropyInputs:
        """Every row kept, unmasked rows ignored: the same loss without a data-dependent shape."""
        targets = torch.where(self.mask, self.targets, torch.full_like(self.targets, self.ignore_index))
        return dataclasses.replace(self, h=self.h.reshape(-1, self.h.shape[-1]), targets=targets.reshape(-1),
                                   mask=None)


def validate(h, weight, bias, targets, mask=None, ignore_index=-100, num_masked=None,
             chunk_rows=None) -> MaskedCrossEntropyInputs:
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
    if mask is not None and not (num_masked is None and mask.device.type == "meta"):  # meta: all rows, below
        validate_gather(h, mask, num_masked)
    if host_checks_enabled(targets) and targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
        if mask is not None:
            bad &= mask
        if bad.any():
            v = int(targets[bad][0])
            raise ValueError(f"targets: expected values in [0, {V}) or ignore_index={ignore_index}, got {v}")
    return MaskedCrossEntropyInputs(h, weight, bias, targets, mask, ignore_index, num_masked, chunk_rows)


# ----------------------------------------------------------------------------------------------------------
# backends: the loss over gathered rows (``i.mask`` is None); the GEMMs run in ``dtype``


OP = define_op("masked_cross_entropy", doc="chunked linear head + cross-entropy over masked rows")


@OP.register("triton", lambda i: triton_reasons(*i.tensors))
def _rows_triton(i: MaskedCrossEntropyInputs, dtype: torch.dtype, need: tuple[bool, bool, bool]) -> tuple:
    """(loss, accuracy, gh, gW, gb, 1 / n_valid), the grads in ``need`` = (h, W, b) unscaled, else None."""
    from kernels.masked.masked_cross_entropy_triton import masked_cross_entropy_forward

    need_h, need_w, need_b = need
    with torch.autocast(i.h.device.type, enabled=False):  # dtypes are chosen explicitly (``dtype``)
        return masked_cross_entropy_forward(i.h, i.weight, i.bias, i.targets, i.ignore_index, dtype,
                                            i.chunk_rows, need_h=need_h, need_w=need_w, need_b=need_b)


@OP.register("reference")
def _rows_reference(i: MaskedCrossEntropyInputs, dtype: torch.dtype, need: tuple[bool, bool, bool]) -> tuple:
    """The reference's loss and accuracy; no stored grads (the backward is autograd over the reference)."""
    with torch.autocast(i.h.device.type, enabled=False):
        loss, accuracy = masked_cross_entropy_rows_reference(i.h, i.weight, i.bias, i.targets, i.ignore_index,
                                                             True, dtype)
    n_valid = (i.targets != i.ignore_index).sum().to(loss.dtype).clamp_min(1.0)
    return loss, accuracy, None, None, None, 1.0 / n_valid


# ----------------------------------------------------------------------------------------------------------
# forward and the autograd formula (once; no backward op: the kernel path makes its gradients in the forward)


def _rows_inputs(h, weight, bias, targets, ignore_index, chunk_rows) -> MaskedCrossEntropyInputs:
    return MaskedCrossEntropyInputs(h, weight, bias, targets, None, ignore_index, None, chunk_rows or None)


def _stored(backend: str, bias, need_h: bool, need_w: bool, need_b: bool) -> tuple[bool, bool, bool]:
    """The gradients the forward makes: those asked for on a kernel backend, none on the reference."""
    kernel = backend != "reference"
    return kernel and need_h, kernel and need_w, kernel and need_b and bias is not None


def _forward(h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, ignore_index: int,
             dtype: torch.dtype, chunk_rows: int, need_h: bool, need_w: bool,
             need_b: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, accuracy, gh, gW, gb, 1 / max(n_valid, 1)) for h [M, D], targets [M] int64; GEMMs in ``dtype``,
    softmax and gW/gb accumulation in float32 (float64); grads unscaled, 0-element when not requested or
    when the reference ran (then the backward is autograd's); ``chunk_rows = 0``: the default chunking."""
    i = _rows_inputs(h, weight, bias, targets, ignore_index, chunk_rows)
    impl = OP.select(i)
    loss, accuracy, gh, gw, gb, inv_n = impl.fn(i, dtype, _stored(impl.backend, bias, need_h, need_w, need_b))
    acc = acc_dtype(dtype)
    return (loss, accuracy, gh if gh is not None else nothing(h), gw if gw is not None else nothing(h, acc),
            gb if gb is not None else nothing(h, acc), inv_n)


def _setup_context(ctx, inputs, output):
    h, weight, bias, targets, ignore_index, dtype, chunk_rows, need_h, need_w, need_b = inputs
    _loss, accuracy, gh, gw, gb, inv_n = output
    ctx.backend = OP.select(_rows_inputs(h, weight, bias, targets, ignore_index, chunk_rows)).backend
    ctx.mark_non_differentiable(accuracy, gh, gw, gb, inv_n)
    if ctx.backend == "reference":
        ctx.save_for_backward(h, weight, bias, targets)
        ctx.reference_kwargs = {"ignore_index": ignore_index, "dtype": dtype}
        return
    ctx.save_for_backward(gh, gw, gb, inv_n)
    ctx.need = (need_h, need_w, need_b and bias is not None)
    ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)


def _grads(ctx, grad_loss, *_unused):
    if ctx.backend == "reference":
        h = ctx.saved_tensors[0]
        with torch.autocast(h.device.type, enabled=False):
            grads = reference_grads(masked_cross_entropy_rows_reference, ctx.saved_tensors,
                                    ctx.needs_input_grad[:4], (grad_loss,), **ctx.reference_kwargs)[:3]
    else:
        gh, gw, gb, inv_n = ctx.saved_tensors
        scale = grad_loss.to(inv_n.dtype) * inv_n
        grads = [(g * scale).to(dt) if (need and wanted) else None
                 for g, dt, need, wanted in zip((gh, gw, gb), ctx.dtypes, ctx.need, ctx.needs_input_grad[:3])]
    return (*grads, None, None, None, None, None, None, None)


fwd_op = custom_op("masked_cross_entropy_fwd", _forward)


@fwd_op.register_fake
def _(h, weight, bias, targets, ignore_index, dtype, chunk_rows, need_h, need_w, need_b):
    acc = acc_dtype(dtype)
    backend = OP.select(_rows_inputs(h, weight, bias, targets, ignore_index, chunk_rows)).backend
    need_h, need_w, need_b = _stored(backend, bias, need_h, need_w, need_b)
    scalar = h.new_empty((), dtype=acc)
    return (scalar, scalar.clone(), h.new_empty(h.shape) if need_h else nothing(h),
            h.new_empty(weight.shape, dtype=acc) if need_w else nothing(h, acc),
            h.new_empty((weight.shape[0],), dtype=acc) if need_b else nothing(h, acc), scalar.clone())


fwd_op.register_autograd(_grads, setup_context=_setup_context)
MaskedCrossEntropyFunction = eager_function("MaskedCrossEntropyFunction", _forward, _setup_context, _grads)


# ----------------------------------------------------------------------------------------------------------
# public API


def masked_cross_entropy(h, weight, bias, targets, mask=None, ignore_index=-100, return_accuracy=False,
                         num_masked=None, chunk_rows=None):
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
    i = validate(h, weight, bias, targets, mask, ignore_index, num_masked, chunk_rows)
    compiling = torch.compiler.is_compiling()
    if i.mask is not None and i.num_masked is None and (compiling or i.mask.device.type == "meta"):
        i = i.all_rows()  # no mask values to gather by (a graph, or meta tensors)
    if compiling:
        fn, gather = fwd_op, gather_fwd_op
    elif OP.select(i).backend == "reference":
        return masked_cross_entropy_reference(i.h, i.weight, i.bias, i.targets.long(), i.mask, i.ignore_index,
                                              return_accuracy, i.num_masked)
    else:
        fn, gather = MaskedCrossEntropyFunction.apply, GatherMaskedFunction.apply
        if i.mask is not None and i.num_masked is None:  # one sync; uniform counts take the sync-free gathers
            i = dataclasses.replace(i, num_masked=resolve_counts(i.mask)[0])
    h2, t2 = i.rows(gather)
    grad = torch.is_grad_enabled()
    need = (grad and h2.requires_grad, grad and weight.requires_grad,
            grad and bias is not None and bias.requires_grad)
    dtype = compute_dtype(h, weight)
    loss, accuracy, *_ = fn(h2, weight, bias, t2, i.ignore_index, dtype, i.chunk_rows or 0, *need)
    return (loss, accuracy) if return_accuracy else loss
