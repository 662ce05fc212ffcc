"""Triton kernels of the masked (sparse) batch norm: statistics and gradients over active sites only.

x is read as ``[B, C, S]`` (S = H*W) through its strides, so NCHW and channels_last inputs run in place; the
activity map is ``m[B, S]`` (u8). Rows ``r = (b, s)`` are tiled ``BLOCK_R`` at a time, channels ``BLOCK_C``;
every reduction writes one partial per row tile (no atomics, deterministic), summed over tiles in torch::

    forward   n = sum m                     mean = sum_r m x / n            var = sum_r m (x - mean)^2 / n
              y = m ? x * a + c : 0          a = w * rstd,  c = b - mean * a,  rstd = 1 / sqrt(var + eps)
    backward  xhat = (x - mean) * rstd       g_b = sum_r m dy               g_w = sum_r m dy xhat
              dx = m ? w rstd (dy - (g_b + xhat g_w) / n) : 0

Forward: two reading passes (sum, centred squares: the two-pass variance, as exact as the reference) and one
read + write; backward: one reading pass and one read + write. The eager formulation makes about three times
as many passes over the activation. Every output buffer comes from ``kernels._buffers``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _buffers
from kernels._backend import launches_on_input_device
from kernels._checks import acc_dtype
from kernels.sparse_conv.layout import bcs_strides, empty_as


@triton.jit
def _load_tile(X, MASK, pid_r, pid_c, R, S, C, s_xb, s_xc, s_xs, ACC_F64: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """One BLOCK_R x BLOCK_C tile of x (rows r = (b, s)), zero where inactive or out of range, in the
    accumulation dtype; with the row/channel indices and validity masks the callers need."""
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = rows < R
    c_ok = cols < C
    act = tl.load(MASK + rows, mask=r_ok, other=0) != 0
    ok = act[:, None] & c_ok[None, :]
    b = (rows // S).to(tl.int64)
    s = (rows % S).to(tl.int64)
    c64 = cols.to(tl.int64)
    x = tl.load(X + b[:, None] * s_xb + c64[None, :] * s_xc + s[:, None] * s_xs, mask=ok, other=0.0)
    if ACC_F64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
    return r_ok, cols, c_ok, ok, b, s, c64, x


@triton.jit
def _masked_bn_partial_kernel(
    X, DY, MASK, MEAN, RSTD, P1, P2,
    R, S, C,
    s_xb, s_xc, s_xs,
    s_db, s_dc, s_ds,
    MODE: tl.constexpr,
    ACC_F64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Partial sums of one row tile x channel tile into ``P1[tile, c]`` (and ``P2``):

    MODE 0: P1 = sum m x;   MODE 1: P1 = sum m (x - mean)^2;   MODE 2: P1 = sum m dy, P2 = sum m dy xhat.
    """
    pid_r = tl.program_id(0)
    _r_ok, cols, c_ok, ok, b, s, c64, x = _load_tile(
        X, MASK, pid_r, tl.program_id(1), R, S, C, s_xb, s_xc, s_xs, ACC_F64, BLOCK_R, BLOCK_C
    )
    out = P1 + pid_r.to(tl.int64) * C + cols
    if MODE == 0:
        tl.store(out, tl.sum(x, axis=0), mask=c_ok)
    else:
        mean = tl.load(MEAN + cols, mask=c_ok, other=0.0).to(x.dtype)
        centred = tl.where(ok, x - mean[None, :], 0.0)
        if MODE == 1:
            tl.store(out, tl.sum(centred * centred, axis=0), mask=c_ok)
        else:
            rstd = tl.load(RSTD + cols, mask=c_ok, other=0.0).to(x.dtype)
            dy = tl.load(DY + b[:, None] * s_db + c64[None, :] * s_dc + s[:, None] * s_ds, mask=ok, other=0.0)
            dy = dy.to(x.dtype)
            tl.store(out, tl.sum(dy, axis=0), mask=c_ok)
            tl.store(P2 + pid_r.to(tl.int64) * C + cols, tl.sum(dy * centred * rstd[None, :], axis=0), mask=c_ok)


@triton.jit
def _masked_bn_apply_kernel(
    X, DY, MASK, K0, K1, K2, K3, OUT,
    R, S, C,
    s_xb, s_xc, s_xs,
    s_db, s_dc, s_ds,
    s_ob, s_oc, s_os,
    MODE: tl.constexpr,
    ACC_F64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Elementwise over active sites (zero elsewhere), per-channel vectors K0..K3:

    MODE 0 (y):  out = x * K0 + K1
    MODE 1 (dx): out = K0 * (dy - K2 - (x - K1) * K3)     (K0 = w rstd, K1 = mean, K2 = g_b / n,
                                                           K3 = rstd * g_w / n)
    """
    pid_r = tl.program_id(0)
    r_ok, cols, c_ok, ok, b, s, c64, x = _load_tile(
        X, MASK, pid_r, tl.program_id(1), R, S, C, s_xb, s_xc, s_xs, ACC_F64, BLOCK_R, BLOCK_C
    )
    k0 = tl.load(K0 + cols, mask=c_ok, other=0.0).to(x.dtype)
    k1 = tl.load(K1 + cols, mask=c_ok, other=0.0).to(x.dtype)
    if MODE == 0:
        y = x * k0[None, :] + k1[None, :]
    else:
        k2 = tl.load(K2 + cols, mask=c_ok, other=0.0).to(x.dtype)
        k3 = tl.load(K3 + cols, mask=c_ok, other=0.0).to(x.dtype)
        dy = tl.load(DY + b[:, None] * s_db + c64[None, :] * s_dc + s[:, None] * s_ds, mask=ok, other=0.0)
        y = k0[None, :] * (dy.to(x.dtype) - k2[None, :] - (x - k1[None, :]) * k3[None, :])
    y = tl.where(ok, y, 0.0)
    dst = OUT + b[:, None] * s_ob + c64[None, :] * s_oc + s[:, None] * s_os
    tl.store(dst, y.to(OUT.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])


def _blocks(C: int, device: torch.device, apply: bool = False) -> tuple[int, int]:
    """Row x channel tiles. On CUDA: 64 x 64 for the reductions, 32 x 64 for the elementwise passes (the dx
    pass holds x, dy and three int64 address tiles: 64 x 64 spills on sm_90 with 4 warps; ptxas -v)."""
    block_c = max(16, min(64, triton.next_power_of_2(C)))
    block_r = 64 if device.type == "cuda" and not apply else 32
    return block_r, block_c


def _partials(x, dy, mask_u8, mean, rstd, mode):
    B, C, H, W = x.shape
    R, S = B * H * W, H * W
    block_r, block_c = _blocks(C, x.device)
    acc = acc_dtype(x.dtype)
    n_tiles = triton.cdiv(R, block_r)
    p1 = _buffers.empty((n_tiles, C), acc, x.device)
    p2 = _buffers.empty((n_tiles, C), acc, x.device) if mode == 2 else p1
    dy_arg = dy if dy is not None else x
    _masked_bn_partial_kernel[(n_tiles, triton.cdiv(C, block_c))](
        x, dy_arg, mask_u8, mean if mean is not None else p1, rstd if rstd is not None else p1, p1, p2,
        R, S, C, *bcs_strides(x), *bcs_strides(dy_arg),
        MODE=mode, ACC_F64=acc == torch.float64, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return (p1.sum(0), p2.sum(0)) if mode == 2 else p1.sum(0)


def _apply(x, dy, mask_u8, k0, k1, k2, k3, mode):
    B, C, H, W = x.shape
    R, S = B * H * W, H * W
    block_r, block_c = _blocks(C, x.device, apply=True)
    out = empty_as(x)  # same memory format as x (NCHW or channels_last)
    dy_arg = dy if dy is not None else x
    _masked_bn_apply_kernel[(triton.cdiv(R, block_r), triton.cdiv(C, block_c))](
        x, dy_arg, mask_u8, k0, k1, k2 if k2 is not None else k0, k3 if k3 is not None else k0, out,
        R, S, C, *bcs_strides(x), *bcs_strides(dy_arg), *bcs_strides(out),
        MODE=mode, ACC_F64=x.dtype == torch.float64, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return out


@launches_on_input_device
def masked_batch_norm_forward(x, mask_u8, n, weight, bias, eps):
    """``(y, mean, var, rstd)``: y in x's dtype and memory format; statistics in fp32 (fp64 for fp64 x)."""
    n_safe = n.clamp_min(1.0)
    mean = _partials(x, None, mask_u8, None, None, 0) / n_safe
    var = _partials(x, None, mask_u8, mean, None, 1) / n_safe
    rstd = torch.rsqrt(var + eps)
    scale = rstd * weight.to(rstd.dtype) if weight is not None else rstd
    shift = (bias.to(rstd.dtype) if bias is not None else 0.0) - mean * scale
    return _apply(x, None, mask_u8, scale.contiguous(), shift.contiguous(), None, None, 0), mean, var, rstd


@launches_on_input_device
def masked_batch_norm_backward(dy, x, mask_u8, n, mean, rstd, weight, need_x):
    """``(dx or None, g_w, g_b)`` with g_w = sum m dy xhat, g_b = sum m dy (fp32/fp64)."""
    g_b, g_w = _partials(x, dy, mask_u8, mean, rstd, 2)
    dx = None
    if need_x:
        n_safe = n.clamp_min(1.0)
        k0 = rstd * weight.to(rstd.dtype) if weight is not None else rstd
        dx = _apply(x, dy, mask_u8, k0.contiguous(), mean.contiguous(), (g_b / n_safe).contiguous(),
                    (rstd * g_w / n_safe).contiguous(), 1)
    return dx, g_w, g_b
