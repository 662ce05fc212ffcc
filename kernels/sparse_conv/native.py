"""Launchers of the C++ (OpenMP) sparse convolution in ``kernels._C`` (CPU, float32/float64).

Tensors cross the boundary as NHWC (channels-last) buffers; weights are repacked here:
``groups=1``: forward ``W[k, ci, co]`` and input-gradient ``W[k, co, ci]``, the last dim zero-padded to a
multiple of two SIMD vectors (16 floats / 8 doubles); depthwise: ``Wd[k, c]``. ``k = kh * KW + kw``.
Every launcher writes its whole output (zeros at inactive sites); ``out=`` buffers are for tests.
"""

from __future__ import annotations

import torch

from kernels import _backend

_STEP = {torch.float32: 16, torch.float64: 8}


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _padded(n: int, dtype) -> int:
    step = _STEP[dtype]
    return -(-n // step) * step


def _geom(B, H, W, Cin, Ho, Wo, Cout, KH, KW, stride, padding, dilation):
    return [
        B,
        H,
        W,
        Cin,
        Ho,
        Wo,
        Cout,
        KH,
        KW,
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        dilation[0],
        dilation[1],
    ]


def _u8(active):
    return active.contiguous().view(torch.uint8)


def _check_buffer(name, buf, shape, like):
    if buf.shape != shape or buf.dtype != like.dtype or not buf.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous {like.dtype} buffer of shape {tuple(shape)}, "
            f"got {buf.dtype} {tuple(buf.shape)}"
        )


def _pack(src, shape, npad, mode, cout, cin, K):
    src = src.contiguous()
    dst = src.new_empty(shape)
    _backend.native().sparse_conv2d_pack(
        src.data_ptr(), dst.data_ptr(), cout, cin, K, npad, mode, src.dtype == torch.float64, _threads()
    )
    return dst


def pack_forward_weight(weight, depthwise):
    """``[Cout, Cin, KH, KW] -> [K, Cin, npad]`` (depthwise: ``[K, C]``)."""
    Cout, cin_g, KH, KW = weight.shape
    if depthwise:
        return weight.reshape(Cout, KH * KW).t().contiguous(), Cout
    npad = _padded(Cout, weight.dtype)
    return _pack(weight, (KH * KW, cin_g, npad), npad, 0, Cout, cin_g, KH * KW), npad


def pack_input_grad_weight(weight, depthwise):
    """``[Cout, Cin, KH, KW] -> [K, Cout, npad]`` (free for 1x1 kernels with Cin a multiple of the step)."""
    Cout, cin_g, KH, KW = weight.shape
    if depthwise:
        return weight.reshape(Cout, KH * KW).t().contiguous(), cin_g
    npad = _padded(cin_g, weight.dtype)
    if KH * KW == 1 and npad == cin_g:
        return weight.reshape(1, Cout, cin_g).contiguous(), npad
    return _pack(weight, (KH * KW, Cout, npad), npad, 1, Cout, cin_g, KH * KW), npad


def unpack_weight_grad(packed, Cout, KH, KW):
    """``[K, Cin, npad] -> [Cout, Cin, KH, KW]``."""
    K, Cin, npad = packed.shape
    return _pack(packed, (Cout, Cin, KH, KW), npad, 2, Cout, Cin, K)


def forward(x_nhwc, active_in, active_out, weight, bias, stride, padding, dilation, depthwise, out=None):
    """``out[B, Ho, Wo, Cout]`` (NHWC) of the sparse convolution; see ``csrc/sparse_conv.cpp``."""
    B, H, W, Cin = x_nhwc.shape
    Ho, Wo = active_out.shape[1:]
    Cout, _, KH, KW = weight.shape
    x_nhwc = x_nhwc.contiguous()
    wp, npad = pack_forward_weight(weight, depthwise)
    bp = None
    if bias is not None:
        if depthwise:
            bp = bias.contiguous()
        else:
            if npad == Cout:
                bp = bias.contiguous()
            else:
                bp = bias.new_zeros(npad)
                bp[:Cout] = bias
    shape = (B, Ho, Wo, Cout)
    if out is None:
        out = x_nhwc.new_empty(shape)
    _check_buffer("out", out, shape, x_nhwc)
    ain, aout = _u8(active_in), _u8(active_out)
    _backend.native().sparse_conv2d_forward(
        x_nhwc.data_ptr(),
        ain.data_ptr(),
        aout.data_ptr(),
        wp.data_ptr(),
        0 if bp is None else bp.data_ptr(),
        out.data_ptr(),
        _geom(B, H, W, Cin, Ho, Wo, Cout, KH, KW, stride, padding, dilation),
        depthwise,
        npad,
        x_nhwc.dtype == torch.float64,
        _threads(),
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
    shape = (B, H, W, Cin)
    if out is None:
        out = g_nhwc.new_empty(shape)
    _check_buffer("dx", out, shape, g_nhwc)
    ain, aout = _u8(active_in), _u8(active_out)
    _backend.native().sparse_conv2d_backward_input(
        g_nhwc.data_ptr(),
        ain.data_ptr(),
        aout.data_ptr(),
        wp.data_ptr(),
        out.data_ptr(),
        _geom(B, H, W, Cin, Ho, Wo, Cout, KH, KW, stride, padding, dilation),
        depthwise,
        npad,
        g_nhwc.dtype == torch.float64,
        _threads(),
    )
    return out


def backward_weight(
    x_nhwc,
    g_nhwc,
    active_in,
    active_out,
    weight_shape,
    stride,
    padding,
    dilation,
    depthwise,
    need_bias=True,
    out=None,
    out_bias=None,
):
    """``(dweight [Cout, Cin/groups, KH, KW], dbias [Cout] or None)`` summed over active output sites."""
    B, H, W, Cin = x_nhwc.shape
    _, Ho, Wo, Cout = g_nhwc.shape
    _, _, KH, KW = weight_shape
    x_nhwc, g_nhwc = x_nhwc.contiguous(), g_nhwc.contiguous()
    K = KH * KW
    if depthwise:
        npad = Cout
        shape = (K, Cout)
    else:
        npad = _padded(Cout, x_nhwc.dtype)
        shape = (K, Cin, npad)
    if out is None:
        out = x_nhwc.new_empty(shape)
    _check_buffer("dweight", out, shape, x_nhwc)
    if need_bias:
        if out_bias is None:
            out_bias = x_nhwc.new_empty(Cout)
        _check_buffer("dbias", out_bias, (Cout,), x_nhwc)
    ain, aout = _u8(active_in), _u8(active_out)
    _backend.native().sparse_conv2d_backward_weight(
        x_nhwc.data_ptr(),
        g_nhwc.data_ptr(),
        ain.data_ptr(),
        aout.data_ptr(),
        out.data_ptr(),
        out_bias.data_ptr() if need_bias else 0,
        _geom(B, H, W, Cin, Ho, Wo, Cout, KH, KW, stride, padding, dilation),
        depthwise,
        npad,
        x_nhwc.dtype == torch.float64,
        _threads(),
    )
    if depthwise:
        dw = out.t().reshape(Cout, 1, KH, KW)
    else:
        return unpack_weight_grad(out, Cout, KH, KW), (out_bias if need_bias else None)
    return dw.contiguous(), (out_bias if need_bias else None)
