"""Launchers of the C++ (OpenMP) masked batch norm in ``kernels._C`` (CPU, float32/float64).

Same signatures as :mod:`kernels.sparse_conv.masked_batch_norm_triton`; the maths is in ``csrc/masked_bn.cpp``.
x and dy are read in place (NCHW or channels_last), outputs keep x's memory format; every output buffer
comes from ``kernels._buffers``.
"""

from __future__ import annotations

import torch

from kernels import _backend, _buffers
from kernels.sparse_conv.layout import bcs_strides, empty_as


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` in x's memory format (one torch copy when they differ: a gradient arriving NCHW for a
    channels_last x, e.g. from a loss on the features or a max-pool backward, would send the kernels down
    their strided mixed-layout loops, 10-50x slower than the copy)."""
    x_cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    t_cl = not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    if x_cl and not t_cl:
        return t.contiguous(memory_format=torch.channels_last)
    if not x_cl and x.is_contiguous() and not t.is_contiguous():
        return t.contiguous()
    return t


def _layout(t: torch.Tensor) -> list[int]:
    B, C, H, W = t.shape
    return [B, C, H * W, *bcs_strides(t)]


def masked_batch_norm_forward(x, mask_u8, n, weight, bias, eps):
    """``(y, mean, var, rstd)`` with statistics in x's dtype (fp32 or fp64)."""
    C = x.shape[1]
    lib, threads = _backend.native(), _backend.native_threads()
    mean, var = _buffers.empty((C,), x.dtype, x.device), _buffers.empty((C,), x.dtype, x.device)
    is64 = x.dtype == torch.float64
    lib.masked_bn_stats(x.data_ptr(), mask_u8.data_ptr(), _layout(x), float(n), mean.data_ptr(), var.data_ptr(),
                        is64, threads)
    rstd = torch.rsqrt(var + eps)
    scale = (rstd * weight.to(rstd.dtype) if weight is not None else rstd).contiguous()
    shift = ((bias.to(rstd.dtype) if bias is not None else 0.0) - mean * scale).contiguous()
    y = empty_as(x)
    lib.masked_bn_apply(x.data_ptr(), mask_u8.data_ptr(), _layout(x), _layout(y), scale.data_ptr(),
                        shift.data_ptr(), y.data_ptr(), is64, threads)
    return y, mean, var, rstd


def masked_batch_norm_backward(dy, x, mask_u8, n, mean, rstd, weight, need_x):
    """``(dx or None, g_w, g_b)``."""
    C = x.shape[1]
    lib, threads = _backend.native(), _backend.native_threads()
    is64 = x.dtype == torch.float64
    dy = _like(dy.to(x.dtype), x)
    g_b, g_w = _buffers.empty((C,), x.dtype, x.device), _buffers.empty((C,), x.dtype, x.device)
    lib.masked_bn_backward_reduce(dy.data_ptr(), x.data_ptr(), mask_u8.data_ptr(), _layout(dy), _layout(x),
                                  mean.data_ptr(), rstd.data_ptr(), g_b.data_ptr(), g_w.data_ptr(), is64, threads)
    dx = None
    if need_x:
        n_safe = max(float(n), 1.0)
        k0 = (rstd * weight.to(rstd.dtype) if weight is not None else rstd).contiguous()
        k2 = (g_b / n_safe).contiguous()
        k3 = (rstd * g_w / n_safe).contiguous()
        dx = empty_as(x)
        lib.masked_bn_backward_dx(dy.data_ptr(), x.data_ptr(), mask_u8.data_ptr(), _layout(dy), _layout(x),
                                  _layout(dx), k0.data_ptr(), mean.contiguous().data_ptr(), k2.data_ptr(),
                                  k3.data_ptr(), dx.data_ptr(), is64, threads)
    return dx, g_w, g_b


def _coefficients(weight, bias, mean, rstd):
    scale = (rstd * weight.to(rstd.dtype) if weight is not None else rstd).contiguous()
    shift = ((bias.to(rstd.dtype) if bias is not None else 0.0) - mean * scale).contiguous()
    return scale, shift


def masked_batch_norm_act_forward(x, mask_u8, n, weight, bias, eps, residual, relu):
    """``(y, mean, var, rstd)`` with ``y = act(BN(x) + residual)`` in one pass (``act`` = ReLU if ``relu``;
    ``residual`` a mergeable tensor like x, or None); statistics as :func:`masked_batch_norm_forward`."""
    C = x.shape[1]
    lib, threads = _backend.native(), _backend.native_threads()
    mean, var = _buffers.empty((C,), x.dtype, x.device), _buffers.empty((C,), x.dtype, x.device)
    is64 = x.dtype == torch.float64
    lib.masked_bn_stats(x.data_ptr(), mask_u8.data_ptr(), _layout(x), float(n), mean.data_ptr(),
                        var.data_ptr(), is64, threads)
    rstd = torch.rsqrt(var + eps)
    scale, shift = _coefficients(weight, bias, mean, rstd)
    y = empty_as(x)
    residual = None if residual is None else _like(residual, x)
    lib.masked_bn_apply_act(x.data_ptr(), mask_u8.data_ptr(), _layout(x), _layout(y), scale.data_ptr(),
                            shift.data_ptr(), 0 if residual is None else residual.data_ptr(),
                            _layout(x if residual is None else residual), bool(relu), y.data_ptr(), is64,
                            threads)
    return y, mean, var, rstd


def masked_batch_norm_act_backward(dy, x, y, mask_u8, n, mean, rstd, weight, need_x, need_residual):
    """``(dx or None, g_w, g_b, d_residual or None)`` of :func:`masked_batch_norm_act_forward`; ``y`` is its
    output when the ReLU was fused (the gate ``y > 0``), else None."""
    C = x.shape[1]
    lib, threads = _backend.native(), _backend.native_threads()
    is64 = x.dtype == torch.float64
    dy = _like(dy.to(x.dtype), x)
    g_b, g_w = _buffers.empty((C,), x.dtype, x.device), _buffers.empty((C,), x.dtype, x.device)
    if y is None:
        lib.masked_bn_backward_reduce(dy.data_ptr(), x.data_ptr(), mask_u8.data_ptr(), _layout(dy),
                                      _layout(x), mean.data_ptr(), rstd.data_ptr(), g_b.data_ptr(),
                                      g_w.data_ptr(), is64, threads)
    else:
        lib.masked_bn_backward_reduce_gated(dy.data_ptr(), x.data_ptr(), y.data_ptr(), mask_u8.data_ptr(),
                                            _layout(dy), _layout(x), _layout(y), mean.data_ptr(),
                                            rstd.data_ptr(), g_b.data_ptr(), g_w.data_ptr(), is64, threads)
    dx = empty_as(x) if need_x else None
    dr = empty_as(x) if need_residual else None
    if need_x or need_residual:
        n_safe = max(float(n), 1.0)
        k0 = (rstd * weight.to(rstd.dtype) if weight is not None else rstd).contiguous()
        k2 = (g_b / n_safe).contiguous()
        k3 = (rstd * g_w / n_safe).contiguous()
        lib.masked_bn_backward_act(
            dy.data_ptr(), x.data_ptr(), 0 if y is None else y.data_ptr(), mask_u8.data_ptr(), _layout(dy),
            _layout(x), _layout(x if y is None else y), _layout(x if dx is None else dx),
            _layout(x if dr is None else dr), k0.data_ptr(), mean.contiguous().data_ptr(), k2.data_ptr(),
            k3.data_ptr(), 0 if dx is None else dx.data_ptr(), 0 if dr is None else dr.data_ptr(), is64,
            threads)
    return dx, g_w, g_b, dr
