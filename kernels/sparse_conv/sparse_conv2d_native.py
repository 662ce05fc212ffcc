"""Launchers of the native (CPU, float32/float64) sparse convolution: ``kernels._C`` C++/OpenMP kernels and
torch GEMMs on gathered rows.

Tensors cross the boundary as NHWC (channels-last) buffers; weights are repacked here:
``groups=1``: forward ``W[k, ci, co]`` and input-gradient ``W[k, co, ci]``, the last dim zero-padded to
``npad``, a multiple of ``S`` = two SIMD vectors (16 floats / 8 doubles), and stored strip-major
(``[npad / S, K, rows, S]``: the GEMM streams each S-wide strip contiguously); depthwise: ``Wd[k, c]``.
``k = kh * KW + kw``.
Routes (chosen per layer shape; the maths is the same): 1x1 kernels without padding are plain GEMMs on the
gathered active rows (:func:`linear`: oneDNN's GEMM for float32, torch's for float64: fwd ``2 n Cin Cout``
FLOPs, reads the n gathered rows and the weight once, scatters n output rows into a zeroed buffer; dx the same
with the transposed weight; dW ``g_rows^T x_rows``); groups=1 kernels with im2col rows of at least
:data:`IM2COL_MIN_ROW` values run as GEMMs on gathered im2col rows (``n x Cin*K`` built with one
``index_select``; dx as a GEMM then an ``index_add`` onto the input sites), no weight repacking; the rest
(the stem, few-channel layers with many sites, depthwise) run in the C++ kernels.
Every launcher writes its whole output (zeros at inactive sites); ``out=`` buffers are for tests, the others
come from ``kernels._buffers``. Same signatures as :mod:`kernels.sparse_conv.sparse_conv2d_triton`.
"""

from __future__ import annotations

import torch

from kernels import _backend, _buffers
from kernels.sparse_conv.layout import as_u8, out_or_empty

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


def _pointwise(weight_shape, padding, depthwise) -> bool:
    """1x1 kernels without padding (any stride) run as plain GEMMs on gathered rows (see :func:`_rows`)."""
    return POINTWISE_GEMM and not depthwise and tuple(weight_shape[2:]) == (1, 1) and tuple(padding) == (0, 0)


_INDEX_CACHE: dict = {}
_INDEX_CACHE_SIZE = 64


def _cached(fn):
    """Memoise an index builder on (its activity maps by identity and version, the geometry): the forward
    builds a layer's site lists once, its dx and dW reuse them. Entries hold the maps (so an id is never
    reused while cached); the oldest entries go first."""

    def wrapper(active_in, active_out, *geom):
        key = (fn.__name__, id(active_in), active_in._version, id(active_out), active_out._version, *geom)
        hit = _INDEX_CACHE.get(key)
        if hit is not None and hit[0] is active_in and hit[1] is active_out:
            return hit[2]
        value = fn(active_in, active_out, *geom)
        if len(_INDEX_CACHE) >= _INDEX_CACHE_SIZE:
            del _INDEX_CACHE[next(iter(_INDEX_CACHE))]
        _INDEX_CACHE[key] = (active_in, active_out, value)
        return value

    return wrapper


@_cached
def _rows(active_in, active_out, stride):
    """``(o, i, valid)`` for a 1x1 kernel: flat active output sites ``o``, the input site ``i`` each reads
    (``(b, oh*sh, ow*sw)``) and whether that input is active (None when all are)."""
    B, H, W = active_in.shape
    Ho, Wo = active_out.shape[1:]
    o = active_out.reshape(-1).nonzero().reshape(-1)
    if tuple(stride) == (1, 1) and (Ho, Wo) == (H, W):
        i = o
    else:
        b, r = o // (Ho * Wo), o % (Ho * Wo)
        i = (b * H + (r // Wo) * stride[0]) * W + (r % Wo) * stride[1]
    valid = active_in.reshape(-1)[i]
    return o, i, (None if bool(valid.all()) else valid)


@_cached
def _im2col_index(active_in, active_out, KH, KW, stride, padding, dilation):
    """``(o, idx, valid)``: flat active output sites ``o`` [n], the flat input site of each tap ``idx``
    [n, K] (``k = kh * KW + kw``; 0 where missing) and ``valid`` [n, K] (inside and active)."""
    B, H, W = active_in.shape
    Ho, Wo = active_out.shape[1:]
    o = active_out.reshape(-1).nonzero().reshape(-1)
    b, r = o // (Ho * Wo), o % (Ho * Wo)
    dev = o.device
    kh = torch.arange(KH, device=dev).repeat_interleave(KW)
    kw = torch.arange(KW, device=dev).repeat(KH)
    ih = (r // Wo * stride[0] - padding[0]).unsqueeze(1) + kh * dilation[0]
    iw = (r % Wo * stride[1] - padding[1]).unsqueeze(1) + kw * dilation[1]
    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    idx = torch.where(inside, (b.unsqueeze(1) * H + ih) * W + iw, torch.zeros((), dtype=o.dtype, device=dev))
    valid = inside & active_in.reshape(-1)[idx]
    return o, idx, valid


def _patches(x2d, idx, valid):
    """im2col rows ``[n, Cin * K]`` in torch's weight order ``(ci, k)``; zeros for missing taps."""
    n, K = idx.shape
    rows = x2d.index_select(0, idx.reshape(-1)).view(n, K, x2d.shape[1])
    rows.mul_(valid.unsqueeze(2).to(rows.dtype))
    return rows.transpose(1, 2).reshape(n, K * x2d.shape[1])


IM2COL_MIN_ROW = 2048
"""groups=1 kernels larger than 1x1 whose im2col row ``Cin * KH * KW`` is at least this long run as torch
GEMMs (MKL/oneDNN) on gathered im2col rows; shorter ones (many sites, few channels: the gather costs as much as
the GEMM there) run in the C++ kernels. Measured on the SparK ResNet-50 layers (1 thread): im2col wins from
256-channel 3x3 layers on (deep stages: few sites, the C++ path repacks big weights every call)."""
POINTWISE_GEMM = True
"""1x1 kernels without padding run as torch GEMMs on gathered rows (False: the C++ kernels; for tests)."""


ONEDNN_GEMM = True
"""float32 GEMMs of the GEMM routes run in oneDNN (``torch.ops.mkldnn._linear_pointwise``, the inner-product
primitive: AVX-512 where the CPU has it) instead of ``torch.mm`` (MKL's sgemm, which runs its AVX2 kernels
on AMD CPUs). Measured on the SparK ResNet-50 GEMM shapes (AMD EPYC, 1 thread): 150-200 vs 50-90 GFLOP/s, the
same library and rate as the dense reference's oneDNN convolutions; deterministic (no reductions across
threads). float64, empty operands and builds without the op use torch's GEMM (False: always torch's; for
tests)."""
_LINEAR = None  # the oneDNN op once probed; False when unusable


def _onednn_linear():
    global _LINEAR
    if _LINEAR is None:
        _LINEAR = False
        op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
        if op is not None and torch.backends.mkldnn.is_available():
            try:
                a = torch.arange(35.0).view(5, 7) / 7.0  # fixed values: the probe leaves the RNG alone
                w = torch.arange(21.0).view(3, 7).flip(1) / 5.0
                if torch.allclose(op(a, w, None, "none", [], ""), a @ w.t(), rtol=1e-4, atol=1e-5):
                    _LINEAR = op
            except (RuntimeError, NotImplementedError):  # pragma: no cover - builds without oneDNN's op
                pass
    return _LINEAR


def linear(a, w, bias=None):
    """``a @ w.T (+ bias)`` for 2-D ``a [n, k]`` and ``w [m, k]`` (any strides): oneDNN's GEMM for float32 CPU
    operands (see :data:`ONEDNN_GEMM`), else ``torch.addmm`` / ``torch.mm``. A fresh, fully written tensor."""
    usable = a.dtype == torch.float32 and a.device.type == "cpu" and min(a.shape) > 0 and w.shape[0] > 0
    if ONEDNN_GEMM and usable:
        op = _onednn_linear()
        if op:
            return op(a, w, bias, "none", [], "")
    return torch.addmm(bias, a, w.t()) if bias is not None else a @ w.t()


def _use_im2col(weight_shape, depthwise) -> bool:
    Cout, Cin, KH, KW = weight_shape
    return not depthwise and KH * KW > 1 and Cin * KH * KW >= IM2COL_MIN_ROW


def _gather(t2d, idx, valid):
    rows = t2d.index_select(0, idx)
    return rows if valid is None else rows * valid.unsqueeze(1).to(rows.dtype)


def _scatter(shape, idx, rows, like, active=None):
    """A ``shape`` buffer from ``kernels._buffers`` with ``rows`` at the flat sites ``idx``, zeros elsewhere.
    ``active``: the map whose active sites are exactly ``idx`` (ascending): one pass in C++, each element
    written once; otherwise a zero fill and an index copy."""
    out = _buffers.empty(shape, like.dtype, like.device)
    flat = out.view(-1, shape[-1])
    if active is not None and flat.shape[0] == active.numel():
        rows, act = rows.contiguous(), as_u8(active)  # held: as_u8 may copy
        _backend.native().sparse_conv2d_scatter_rows(
            rows.data_ptr(), act.data_ptr(), flat.shape[0], flat.shape[1], flat.data_ptr(),
            flat.dtype == torch.float64, _backend.native_threads())
        return out
    flat.zero_()
    flat.index_copy_(0, idx, rows)
    return out


def forward(x_nhwc, active_in, active_out, weight, bias, stride, padding, dilation, depthwise, out=None):
    """``out[B, Ho, Wo, Cout]`` (NHWC) of the sparse convolution; see ``csrc/sparse_conv.cpp``."""
    B, H, W, Cin = x_nhwc.shape
    Ho, Wo = active_out.shape[1:]
    Cout, _, KH, KW = weight.shape
    x_nhwc = x_nhwc.contiguous()
    if out is None and _pointwise(weight.shape, padding, depthwise):
        o, i, valid = _rows(active_in, active_out, tuple(stride))
        rows = _gather(x_nhwc.view(-1, Cin), i, valid)
        rows = linear(rows, weight.reshape(Cout, Cin), bias)
        return _scatter((B, Ho, Wo, Cout), o, rows, x_nhwc, active_out)
    if out is None and _use_im2col(weight.shape, depthwise):
        geom = (KH, KW, tuple(stride), tuple(padding), tuple(dilation))
        o, idx, valid = _im2col_index(active_in, active_out, *geom)
        p = _patches(x_nhwc.view(-1, Cin), idx, valid)
        rows = linear(p, weight.reshape(Cout, Cin * KH * KW), bias)
        return _scatter((B, Ho, Wo, Cout), o, rows, x_nhwc, active_out)
    wp, npad = pack_forward_weight(weight, depthwise)
    bp = None
    if bias is not None:
        if depthwise or npad == Cout:
            bp = bias.contiguous()
        else:
            bp = bias.new_zeros(npad)  # zero-padded staging copy of an input, not an output
            bp[:Cout] = bias
    out = out_or_empty(out, "out", (B, Ho, Wo, Cout), x_nhwc)
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
    if out is None and _pointwise(weight.shape, padding, depthwise):
        o, i, valid = _rows(active_in, active_out, tuple(stride))
        rows = linear(g_nhwc.view(-1, Cout).index_select(0, o), weight.reshape(Cout, Cin).t())
        if valid is not None:  # outputs whose input is inactive send no gradient
            i, rows = i[valid], rows[valid]
        same = valid is None and i is o  # stride 1, same size: the input sites are active_out's sites
        return _scatter((B, H, W, Cin), i, rows, g_nhwc, active_out if same else None)
    if out is None and _use_im2col(weight.shape, depthwise):
        geom = (KH, KW, tuple(stride), tuple(padding), tuple(dilation))
        o, idx, valid = _im2col_index(active_in, active_out, *geom)
        n, K = idx.shape
        g_rows = g_nhwc.view(-1, Cout).index_select(0, o)
        cols = linear(g_rows, weight.reshape(Cout, Cin * K).t())  # [n, (ci, k)]
        cols = cols.view(n, Cin, K).transpose(1, 2).reshape(n * K, Cin)
        keep = valid.reshape(-1)
        dx = _buffers.empty((B, H, W, Cin), g_nhwc.dtype, g_nhwc.device)
        flat = dx.view(-1, Cin)
        flat.zero_()
        flat.index_add_(0, idx.reshape(-1)[keep], cols[keep])
        return dx
    wp, npad = pack_input_grad_weight(weight, depthwise)
    out = out_or_empty(out, "dx", (B, H, W, Cin), g_nhwc)
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
    if out is None and out_bias is None and _pointwise(weight_shape, padding, depthwise):
        o, i, valid = _rows(active_in, active_out, tuple(stride))
        g_rows = g_nhwc.view(-1, Cout).index_select(0, o)
        dw = linear(g_rows.t(), _gather(x_nhwc.view(-1, Cin), i, valid).t())  # [Cout, Cin], written whole
        db = None
        if need_bias:
            db = _buffers.empty((Cout,), x_nhwc.dtype, x_nhwc.device)
            torch.sum(g_rows, 0, out=db)
        return dw.view(Cout, Cin, 1, 1), db
    if out is None and out_bias is None and _use_im2col(weight_shape, depthwise):
        geom = (KH, KW, tuple(stride), tuple(padding), tuple(dilation))
        o, idx, valid = _im2col_index(active_in, active_out, *geom)
        g_rows = g_nhwc.view(-1, Cout).index_select(0, o)
        dw = linear(g_rows.t(), _patches(x_nhwc.view(-1, Cin), idx, valid).t())  # [Cout, Cin * K]
        db = None
        if need_bias:
            db = _buffers.empty((Cout,), x_nhwc.dtype, x_nhwc.device)
            torch.sum(g_rows, 0, out=db)
        return dw.view(Cout, Cin, KH, KW), db
    K = KH * KW
    npad = Cout if depthwise else padded(Cin * K, x_nhwc.dtype)  # groups=1: rows of torch's layout, padded
    out = out_or_empty(out, "dweight", (K, Cout) if depthwise else (Cout, npad), x_nhwc)
    if need_bias:
        out_bias = out_or_empty(out_bias, "dbias", (Cout,), x_nhwc)
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
