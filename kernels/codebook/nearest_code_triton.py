"""Triton kernels and launchers of nearest_code (imported by its triton backend only).

Forward, one launch over row tiles of z, streaming the codebook in tiles (no [M, K] scores)::

    x_m = l2n(z_m) (cosine) or z_m (L2)
    i_m = argmax_k <x_m, c_k>  or  2 <x_m, c_k> - ||c_k||^2        (lowest k on ties)
    z_q[m] = c[i_m];   sim[m] = the score of i_m recomputed in the accumulation dtype

Backward, one launch over row tiles: the straight-through gradient through ``l2n``
(``dz = g / n - z <z, g> / n^3``, ``g / eps`` for rows with ``n <= eps``).

:func:`l2n_rows` is shared with the EMA kernels (``ema_codebook_update_triton.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _buffers
from kernels._backend import interpreter_enabled, launches_on_input_device
from kernels._checks import acc_dtype
from kernels._triton_common import tl_acc_dtype
from kernels.codebook import reference as ref


@triton.jit
def l2n_rows(x, eps):
    """Row-wise ``x / max(||x||, eps)`` without overflow of ``||x||^2``: a row whose largest magnitude exceeds
    2**32 is divided by it first (the result is scale invariant and such a row's norm is far above eps);
    other rows are computed exactly as ``x / max(sqrt(sum x^2), eps)``."""
    amax = tl.max(tl.abs(x), axis=1)
    big = amax > 4294967296.0
    s = tl.where(big, 1.0 / tl.maximum(amax, 1.0), 1.0)
    xs = x * s[:, None]
    nrm = tl.sqrt(tl.sum(xs * xs, axis=1))
    return xs / tl.maximum(nrm, eps * s)[:, None]


@triton.jit
def _nearest_code_fwd_kernel(
    Z,
    CB,
    CB_DOT,
    CB_OUT,
    CB_SQ,
    IDX,
    ZQ,
    SIM,
    M,
    D,
    stride_zm,
    stride_zd,
    stride_qm,
    eps,
    K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    SEPARATE_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Nearest code for a tile of ``BLOCK_M`` rows of z, streaming the codebook in ``BLOCK_K`` tiles.

    ``CB [K, D]`` is the codebook as used (l2-normalised when NORMALIZE) in the accumulation dtype
    (fp32, or fp64); ``CB_DOT [D, K]`` the transposed codebook in the GEMM operand dtype (coalesced tile
    loads along K); ``CB_OUT [K, D]`` the rows in the output dtype (rounded once by torch, so z_q is
    bit-exact on every platform); ``CB_SQ [K] = ||c_k||^2``.

        x_m = z_m / max(||z_m||, eps)   (NORMALIZE, overflow-safe: l2n_rows)   else  x_m = z_m
        s_mk = <x_m, c_k>               (NORMALIZE)   else  s_mk = 2 <x_m, c_k> - ||c_k||^2
        i_m  = argmax_k s_mk     element-wise running max over the tiles (a later tile replaces a
                                 position only if strictly greater), then the lowest index among the
                                 maxima => lowest k on ties
        ZQ[m] = CB_OUT[i_m];  SIM[m] = s_{m i_m} recomputed in the accumulation dtype from CB
                                 (exact for the pick)

    Only a [BLOCK_M, BLOCK_K] score tile ever exists (registers); memory traffic O(M*D + (M/BLOCK_M)*K*D).
    K is a constexpr (fixed per model; also the Triton 3.6 interpreter cannot ``range`` over a runtime int
    with numpy >= 2.3).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < M
    dmask = offs_d < D
    zmask = rmask[:, None] & dmask[None, :]
    acc_ty = CB.dtype.element_ty
    z_ptrs = Z + rows[:, None].to(tl.int64) * stride_zm + offs_d[None, :] * stride_zd
    x = tl.load(z_ptrs, mask=zmask, other=0.0).to(acc_ty)
    if NORMALIZE:
        x = l2n_rows(x, eps)
    xd = x.to(CB_DOT.dtype.element_ty)
    if DOT_UPCAST:  # interpreter: its bf16 tl.dot is wrong; exact emulation (rounded operands, fp32 products)
        xd = xd.to(tl.float32)

    # element-wise running max over the codebook tiles (no cross-lane reduction inside the loop): position j
    # of the tile keeps its best score and the first tile start k0 that reached it; one reduction at the end.
    run_best = tl.full([BLOCK_M, BLOCK_K], float("-inf"), acc_ty)
    run_k0 = tl.zeros([BLOCK_M, BLOCK_K], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        c = tl.load(
            CB_DOT + offs_d[:, None].to(tl.int64) * K + cols[None, :],
            mask=dmask[:, None] & cmask[None, :],
            other=0.0,
        )  # [BLOCK_D, BLOCK_K]
        if DOT_UPCAST:
            c = c.to(tl.float32)
        s = tl.dot(xd, c, input_precision=INPUT_PRECISION, out_dtype=acc_ty)
        if not NORMALIZE:
            csq = tl.load(CB_SQ + cols, mask=cmask, other=0.0)
            s = 2.0 * s - csq[None, :]
        if K % BLOCK_K != 0:  # static: only a ragged last tile needs the -inf padding
            s = tl.where(cmask[None, :], s, float("-inf"))
        better = s > run_best  # strict: an earlier tile keeps a tie
        run_best = tl.where(better, s, run_best)
        run_k0 = tl.where(better, k0, run_k0)
    best = tl.max(run_best, axis=1)
    cand = run_k0 + tl.arange(0, BLOCK_K)[None, :]
    # every position holding the row maximum holds its first index; the smallest of them is the lowest argmax
    best_idx = tl.min(tl.where(run_best == best[:, None], cand, K), axis=1)

    best_idx = tl.minimum(best_idx, K - 1)  # only reachable for padded rows (never stored)
    cq = tl.load(CB + best_idx[:, None].to(tl.int64) * D + offs_d[None, :], mask=zmask, other=0.0)
    if NORMALIZE:
        sim = tl.sum(x * cq, axis=1)
    else:
        sim = 2.0 * tl.sum(x * cq, axis=1) - tl.sum(cq * cq, axis=1)
    tl.store(IDX + rows, best_idx.to(tl.int64), mask=rmask)
    tl.store(SIM + rows, sim.to(SIM.dtype.element_ty), mask=rmask)
    if SEPARATE_OUT:
        cq = tl.load(CB_OUT + best_idx[:, None].to(tl.int64) * D + offs_d[None, :], mask=zmask, other=0.0)
    tl.store(
        ZQ + rows[:, None].to(tl.int64) * stride_qm + offs_d[None, :], cq.to(ZQ.dtype.element_ty), mask=zmask
    )


@triton.jit
def _nearest_code_bwd_kernel(
    Z,
    G,
    GZ,
    M,
    D,
    stride_zm,
    stride_zd,
    stride_gm,
    stride_gd,
    eps,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Straight-through gradient through the l2-normalisation ``x = z / max(||z||, eps)``.

        n = ||z||;   n > eps:  dz = g / n - z <z, g> / n^3;   n <= eps:  dz = g / eps

    (computed in fp32, fp64 for fp64 inputs; stored in z's dtype). Without overflow: with ``s = 1 / max|z|``
    for rows whose largest magnitude exceeds 2**32 (else 1), ``zs = s z``, ``n_s = ||zs||``:
    ``dz = s (g / n_s - zs <zs, g> / n_s^3)`` (the same value; bit for bit the formula above when s = 1).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < M)[:, None] & (offs_d < D)[None, :]
    r64 = rows[:, None].to(tl.int64)
    acc_ty = ACC
    z = tl.load(Z + r64 * stride_zm + offs_d[None, :] * stride_zd, mask=mask, other=0.0).to(acc_ty)
    g = tl.load(G + r64 * stride_gm + offs_d[None, :] * stride_gd, mask=mask, other=0.0).to(acc_ty)
    amax = tl.max(tl.abs(z), axis=1)
    s = tl.where(amax > 4294967296.0, 1.0 / tl.maximum(amax, 1.0), 1.0)
    z = z * s[:, None]
    n = tl.sqrt(tl.sum(z * z, axis=1))
    zg = tl.sum(z * g, axis=1)
    big = n > eps * s
    n_safe = tl.where(big, n, 1.0)
    scale = tl.where(big, s / n_safe, 1.0 / eps)
    proj = tl.where(big, s * zg / (n_safe * n_safe * n_safe), 0.0)
    dz = g * scale[:, None] - z * proj[:, None]
    tl.store(GZ + r64 * D + offs_d[None, :], dz.to(GZ.dtype.element_ty), mask=mask)


def _lookup_configs():
    cfgs = []
    for bm, bk, warps, stages in [
        (64, 128, 4, 3),
        (128, 128, 8, 3),
        (128, 64, 4, 3),
        (64, 256, 8, 3),
        (128, 256, 8, 2),
        (256, 128, 8, 3),
        (64, 64, 4, 4),
        # the fp32 "ieee" path (FMA dots) spills in every tile above on sm_90 (ptxas -v); these do not
        (64, 64, 8, 3),
        (32, 64, 4, 3),
        (32, 32, 4, 3),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    return cfgs


# On CUDA the tile sizes are autotuned per (D, K, precision, dtypes) -- the first call per key compiles and times
# every config (seconds; cached on disk afterwards); the interpreter uses the plain kernel.
_nearest_code_fwd_tuned = triton.autotune(configs=_lookup_configs(), key=["D", "K", "INPUT_PRECISION"])(
    _nearest_code_fwd_kernel
)


@launches_on_input_device
def nearest_code_forward(z2d, cb, cb_dot, cb_sq, normalize, eps, input_precision, out_dtype):
    """Launch the fused lookup; returns (indices int64 [M], z_q [M, D] out_dtype, similarity [M] cb.dtype).

    L2 (``normalize=False``): ``z`` and the codebook are multiplied by one power of two ``t``
    (``reference.l2_scale``: 1 unless a magnitude exceeds 2**32) so that neither ``2 <z, c>`` nor ``||c||^2``
    overflows (2**14 for float16 operands); the argmax does not change, ``cb_sq`` is recomputed from the
    scaled codebook, ``z_q`` is read from the unscaled rows and the similarity is scaled back by ``1 / t^2``
    in float64 afterwards.
    """
    M, D = z2d.shape
    K = cb.shape[0]
    dev = z2d.device
    cb_out = cb if out_dtype == cb.dtype else cb.to(out_dtype)
    t = None
    if not normalize:
        # fp16 GEMM operands overflow at 65504: keep them below 2**14 there (4 * d * 2**28 fits fp32 sums)
        t = ref.l2_scale(z2d, cb, cb.dtype, max_exponent=14 if cb_dot.dtype == torch.float16 else 32)
        z2d = z2d * t  # a 0-d tensor: z keeps its dtype; a power of two, so exact
        scaled = cb * t
        cb_dot = scaled if cb_dot is cb else scaled.to(cb_dot.dtype)
        cb = scaled
        cb_sq = (cb * cb).sum(-1)
    idx = _buffers.empty((M,), torch.int64, dev)
    zq = _buffers.empty((M, D), out_dtype, dev)
    sim = _buffers.empty((M,), cb.dtype, dev)
    assert cb.is_contiguous()
    cb_dot_t = cb_dot.t().contiguous()  # [D, K]
    args = (
        z2d,
        cb,
        cb_dot_t,
        cb_out,
        cb_sq if cb_sq is not None else cb,
        idx,
        zq,
        sim,
        M,
        D,
        z2d.stride(0),
        z2d.stride(1),
        zq.stride(0),
        eps,
    )
    meta = {
        "K": K,
        "NORMALIZE": bool(normalize),
        "INPUT_PRECISION": input_precision,
        "DOT_UPCAST": interpreter_enabled() and cb_dot.dtype == torch.bfloat16,
        "SEPARATE_OUT": cb_out is not cb,
        "BLOCK_D": max(16, triton.next_power_of_2(D)),
    }
    if interpreter_enabled() or z2d.device.type != "cuda":
        _nearest_code_fwd_kernel[(triton.cdiv(M, 64),)](*args, BLOCK_M=64, BLOCK_K=128, **meta)
    else:
        _nearest_code_fwd_tuned[lambda m: (triton.cdiv(M, m["BLOCK_M"]),)](*args, **meta)
    if t is not None:
        sim.copy_(ref.unscale_scores(sim, t))
    return idx, zq, sim


@launches_on_input_device
def nearest_code_backward(z2d, g, eps):
    """Gradient w.r.t. z (z's dtype, contiguous) of the straight-through output, given its grad ``g``."""
    M, D = z2d.shape
    gz = _buffers.empty((M, D), z2d.dtype, z2d.device)
    block_m, block_d = row_tiles(D)
    _nearest_code_bwd_kernel[(triton.cdiv(M, block_m),)](
        z2d, g, gz, M, D, z2d.stride(0), z2d.stride(1), g.stride(0), g.stride(1), eps,
        ACC=tl_acc_dtype(acc_dtype(z2d.dtype, g.dtype)), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
    )
    return gz


def row_tiles(D: int) -> tuple[int, int]:
    """(rows per program, BLOCK_D) of the row-wise kernels (this backward, the EMA scatter and finalize):
    whole rows padded to a power of two, at most 4096 elements (and 128 rows) per tile."""
    block_d = triton.next_power_of_2(D)
    return max(1, min(128, 4096 // block_d)), block_d
