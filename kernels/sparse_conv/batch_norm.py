"""masked_batch_norm: batch-norm statistics and normalisation over the active sites of a sparse map (SparK).

With ``m = active[b, h, w]`` and ``n = sum m`` (the statistics are per channel c)::

    mean_c = sum m x / n        var_c = sum m (x - mean_c)^2 / n           (biased, as BatchNorm normalises)
    y      = m * ((x - mean_c) / sqrt(var_c + eps) * w_c + b_c)             (exact zeros at inactive sites)

Gradients flow to x (active sites only), weight and bias. ``n = 0`` gives y = 0 and zero gradients. Returns
``(y, mean, var, n)``; the last three (no gradient) let :class:`SparseBatchNorm2d` update its running
estimates. Backends: C++/OpenMP on CPU (``csrc/masked_bn.cpp``, float32/float64), Triton on CUDA (fused
partial reductions, no atomics: ``triton_bn.py``), the pure-PyTorch reference otherwise (half precision on
CPU); under ``torch.compile`` the reference is traced (inductor fuses it).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels._backend import define_op, native_reasons, triton_reasons

masked_bn_op = define_op("masked_batch_norm", doc="batch-norm statistics and normalisation over active sites")

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def mergeable(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when NCHW- or channels_last-contiguous (H and W then merge into one stride, so the kernels
    read ``[B, C, H*W]`` in place), else an NCHW-contiguous copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def bcs_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of a :func:`mergeable` ``t [B, C, H, W]`` read as ``[B, C, H*W]``."""
    return t.stride(0), t.stride(1), t.stride(3) if t.shape[3] > 1 else t.stride(2)


def masked_batch_norm_reference(x, active, weight=None, bias=None, eps=1e-5):
    """Pure PyTorch (differentiable by autograd); statistics in fp32 for half inputs (fp64 for fp64)."""
    cdt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xs, ms = x.to(cdt), active.unsqueeze(1).to(cdt)
    n = ms.sum()
    n_safe = n.clamp_min(1.0)
    mean = (xs * ms).sum(dim=(0, 2, 3)) / n_safe
    centred = (xs - mean[None, :, None, None]) * ms
    var = (centred * centred).sum(dim=(0, 2, 3)) / n_safe
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(cdt)
    y = centred * scale[None, :, None, None]
    if bias is not None:
        y = y + bias.to(cdt)[None, :, None, None] * ms
    return y.to(x.dtype), mean.detach(), var.detach(), n.detach()


class MaskedBatchNormFunction(torch.autograd.Function):
    """Over the launchers of ``impl`` (:mod:`~kernels.sparse_conv.triton_bn` or
    :mod:`~kernels.sparse_conv.native_bn`, same signatures)."""

    @staticmethod
    def forward(ctx, x, active, weight, bias, eps, impl):
        x = mergeable(x)
        mask_u8 = active.contiguous().view(torch.uint8)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        n = active.sum().to(acc)
        y, mean, var, rstd = impl.masked_batch_norm_forward(x, mask_u8, n, weight, bias, eps)
        ctx.save_for_backward(x, mask_u8, n, mean, rstd, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.impl = impl
        ctx.mark_non_differentiable(mean, var, n)
        return y, mean, var, n

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar, _dn):
        x, mask_u8, n, mean, rstd, weight = ctx.saved_tensors
        need_x, _, need_w, need_b, _, _ = ctx.needs_input_grad
        dx, g_w, g_b = ctx.impl.masked_batch_norm_backward(mergeable(dy), x, mask_u8, n, mean, rstd, weight, need_x)
        dw = g_w.to(weight.dtype) if need_w else None
        db = g_b.to(ctx.bias_dtype) if need_b else None
        return dx, None, dw, db, None, None


def _native_reasons(x, active, weight, bias, eps):
    devices = {t.device.type for t in (x, active, weight, bias) if t is not None}
    if devices != {"cpu"}:
        return [f"native masked_batch_norm runs on CPU tensors only, got {sorted(devices)}"]
    if x.dtype not in (torch.float32, torch.float64):
        return [f"native masked_batch_norm supports float32/float64, got {str(x.dtype).replace('torch.', '')}"]
    return native_reasons()


def _triton_reasons(x, active, weight, bias, eps):
    return triton_reasons(x, active, weight, bias)


@masked_bn_op.register("native", _native_reasons, note="C++/OpenMP, two-pass statistics (CPU)")
def _masked_bn_native(x, active, weight, bias, eps):
    from kernels.sparse_conv import native_bn

    return MaskedBatchNormFunction.apply(x, active, weight, bias, eps, native_bn)


@masked_bn_op.register("triton", _triton_reasons, note="fused partial reductions, no atomics")
def _masked_bn_triton(x, active, weight, bias, eps):
    from kernels.sparse_conv import triton_bn

    return MaskedBatchNormFunction.apply(x, active, weight, bias, eps, triton_bn)


@masked_bn_op.register("reference", note="masked torch reductions")
def _masked_bn_reference(x, active, weight, bias, eps):
    return masked_batch_norm_reference(x, active, weight, bias, eps)


def _validate(x, active, weight, bias, eps):
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.dim() != 4:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x: expected a floating [B, C, H, W] tensor, got {got}")
    B, C, H, W = x.shape
    if not isinstance(active, torch.Tensor) or active.dtype != torch.bool or tuple(active.shape) != (B, H, W):
        got = f"{active.dtype} {tuple(active.shape)}" if isinstance(active, torch.Tensor) else type(active).__name__
        raise ValueError(f"active: expected a bool tensor of shape {(B, H, W)} (x's batch and spatial dims), "
                         f"got {got}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (C,)):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected shape ({C},) (x's channels), got {got}")
    devices = {t.device for t in (x, active, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"x, active, weight and bias must be on one device, got {sorted(map(str, devices))}")
    if not eps > 0:
        raise ValueError(f"eps: expected > 0, got {eps}")


def masked_batch_norm(x, active, weight=None, bias=None, eps=1e-5):
    """Batch norm of ``x [B, C, H, W]`` with statistics over ``active [B, H, W]`` only (module docstring).

    Returns ``(y, mean [C], var [C], n)``: y like x (zeros at inactive sites), the biased batch variance and
    the active-site count (0-dim) for running estimates.
    """
    _validate(x, active, weight, bias, eps)
    if torch.compiler.is_compiling():
        return masked_batch_norm_reference(x, active, weight, bias, eps)
    return masked_bn_op(x, active, weight, bias, eps)
