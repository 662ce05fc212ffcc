"""Launchers of the C++ (OpenMP) sparse convolution in ``kernels._C`` (CPU, float32/float64).

Tensors cross the boundary as NHWC (channels-last) buffers; weights are repacked here:
``groups=1``: forward ``W[k, ci, co]`` and input-gradient ``W[k, co, ci]``, the last dim zero-padded to
``npad``, a multiple of ``S`` = two SIMD vectors (16 floats / 8 doubles), and stored strip-major
(``[npad / S, K, rows, S]``: the GEMM streams each S-wide strip contiguously); depthwise: ``Wd[k, c]``.
``k = kh * KW + kw``.
Every launcher writes its whole output (zeros at inactive sites); ``out=`` buffers are for tests, the others
come from ``kernels._buffers``. Same signatures as :mod:`kernels.sparse_conv.sparse_conv2d_triton`.
"""

from __future__ import annotations

import torch

from kernels import _backend, _buffers
from kernels.sparse_conv.layout import as_u8, check_out_buffer

_STEP = {torch.float32: 16, torch.float64: 8}


def padded(n: int, dtype) -> int:
    """``n`` rounded up to the packing step of ``dtype`` (two SIMD vectors)."""
    step = _STEP[dtype]
    return -(-n // step) * step


def _geom(B, H, W, Cin, Ho, Wo, Cout, KH, KW, stride, padding, dilation):
    return [B, H, W, Cin, Ho, Wo, Cout, KH, KW, *stride, *padding, *dilation]


def _pack(src, shape, npad, mode, cout, cin, K):
    src = src.contiguous()
    dst = _buffers.empty(shape, src.dtype, src.device)
    _backend.native().sparse_conv2d_pack(
        src.data_ptr(), dst.data_ptr(), cout, cin, K, npad, mode, src.dtype == torch.float64,
        _backend.native_threads(),
    )
    return dst


def pack_forward_weight(weight, depthwise):
    """``[Cout, Cin, KH, KW] -> [npad / S, K, Cin, S]`` (depthwise: ``[K, C]``)."""
    Cout, cin_g, KH, KW = weight.shape
    if depthwise:
        return weight.reshape(Cout, KH * KW).t().contiguous(), Cout
    npad = padded(Cout, weight.dtype)
    return _pack(weight, (KH * KW, cin_g, npad), npad, 0, Cout, cin_g, KH * KW), npad


def pack_input_grad_weight(weight, depthwise):
    """``[Cout, Cin, KH, KW] -> [npad / S, K, Cout, S]`` (strip-major, see the module doc)."""
    Cout, cin_g, KH, KW = weight.shape
    if depthwise:
        return weight.reshape(Cout, KH * KW).t().contiguous(), cin_g
    npad = padded(cin_g, weight.dtype)
    return _pack(weight, (KH * KW, Cout, npad), npad, 1, Cout, cin_g, KH * KW), npad


def _out(out, name, shape, like):
    if out is None:
        return _buffers.empty(shape, like.dtype, like.device)
    check_out_buffer(name, out, shape, like)
    return out


def forward(x_nhwc, active_in, active_out, weight, bias, stride, padding, dilation, depthwise, out=None):
    """``out[B, Ho, Wo, Cout]`` (NHWC) of the sparse convolution; see ``csrc/sparse_conv.cpp``."""
    B, H, W, Cin = x_nhwc.shape
    Ho, Wo = active_out.shape[1:]
    Cout, _, KH, KW = weight.shape
    x_nhwc = x_nhwc.contiguous()
    wp, npad = pack_forward_weight(weight, depthwise)
    bp = None
    if bias is not None:
        if depthwise or npad == Cout:
            bp = bias.contiguous()
        else:
            bp = bias.new_zeros(npad)  # zero-padded staging copy of an input, not an output
            bp[:Cout] = bias
    out = _out(out, "out", (B, Ho, Wo, Cout), x_nhwc)
    ain, aout = as_u8(active_in), as_u8(active_out)
    _backend.native().sparse_conv2d_forward(
        x_nhwc.data_ptr(), ain.data_ptr(), aout.data_ptr(), wp.data_ptr(), 0 if bp is None else bp.data_ptr(),
        out.data_ptr(), _geom(B, H, W, Cin, Ho, Wo, Cout, KH, KW, stride, padding, dilation), depthwise, npad,
        x_nhwc.dtype == torch.float64, _backend.native_threads(),
    )
    return out


def backward_input(g_nhwc, active_in, active_out, weight, stride, padding, dilation, depthwise, out=None):
    """``dx[B, H, W, Cin]`` (NHWC), zero at inactive input sites."""
    B, Ho, Wo, Cout = g_nhwc.shape
    H, W = active_in.shape[1:]
    _, cin_g, KH, KW = weight.shape
    Cin = Cout if depthwise else cin_g
    g_nhwc = g_nhwc.contiguous()
    wp, npad = pack_input_grad_weight(weight, depthwise)
    out = _out(out, "dx", (B, H, W, Cin), g_nhwc)
    ain, aout = as_u8(active_in), as_u8(active_out)
    _backend.native().sparse_conv2d_backward_input(
        g_nhwc.data_ptr(), ain.data_ptr(), aout.data_ptr(), wp.data_ptr(), out.data_ptr(),
        _geom(B, H, W, Cin, Ho, Wo, Cout, KH, KW, stride, padding, dilation), depthwise, npad,
        g_nhwc.dtype == torch.float64, _backend.native_threads(),
    )
    return out


def backward_weight(x_nhwc, g_nhwc, active_in, active_out, weight_shape, stride, padding, dilation, depthwise,
                    need_bias=True, out=None, out_bias=None):
    """``(dweight [Cout, Cin/groups, KH, KW], dbias [Cout] or None)`` summed over active output sites.

    groups=1: the kernel writes torch's layout directly, rows ``[Cout, npad]`` (``npad`` = ``Cin * KH * KW``
    padded to the packing step; a view when no padding is needed), as a GEMM of the gradient rows with the
    im2col rows of the active output sites (see ``csrc/sparse_conv.cpp``, ``dense_wgrad``)."""
    B, H, W, Cin = x_nhwc.shape
    _, Ho, Wo, Cout = g_nhwc.shape
    _, _, KH, KW = weight_shape
    x_nhwc, g_nhwc = x_nhwc.contiguous(), g_nhwc.contiguous()
    K = KH * KW
    npad = Cout if depthwise else padded(Cin * K, x_nhwc.dtype)  # groups=1: rows of torch's layout, padded
    out = _out(out, "dweight", (K, Cout) if depthwise else (Cout, npad), x_nhwc)
    if need_bias:
        out_bias = _out(out_bias, "dbias", (Cout,), x_nhwc)
    ain, aout = as_u8(active_in), as_u8(active_out)
    _backend.native().sparse_conv2d_backward_weight(
        x_nhwc.data_ptr(), g_nhwc.data_ptr(), ain.data_ptr(), aout.data_ptr(), out.data_ptr(),
        out_bias.data_ptr() if need_bias else 0, _geom(B, H, W, Cin, Ho, Wo, Cout, KH, KW, stride, padding, dilation),
        depthwise, npad, x_nhwc.dtype == torch.float64, _backend.native_threads(),
    )
    db = out_bias if need_bias else None
    if depthwise:
        return out.t().reshape(Cout, 1, KH, KW).contiguous(), db
    dw = out if npad == Cin * K else out[:, : Cin * K].contiguous()
    return dw.view(Cout, Cin, KH, KW), db
