"""Triton kernels and launchers of nearest_code (imported by its triton backend only).

Forward, one launch over row tiles of z, streaming the codebook in tiles (no [M, K] scores)::

    x_m = l2n(z_m) (cosine) or z_m (L2)
    i_m = argmax_k <x_m, c_k>  or  2 <x_m, c_k> - ||c_k||^2        (lowest k on ties)
    z_q[m] = c[i_m];   sim[m] = the score of i_m recomputed in the accumulation dtype

Backward, one launch over row tiles: the straight-through gradient through ``l2n``
(``dz = g / n - z <z, g> / n^3``, ``g / eps`` for rows with ``n <= eps``).

Cost model (BEiT v2 tokenizer: M = 50176 rows, K = 8192 codes, d = 32; e = element size of z, e_c of the GEMM
operands):

* forward: ``2 M K d`` FLOPs of score GEMM (26.3 GFLOP; x3 MMAs for ``tf32x3``) + ``M K`` compares;
  bytes ``M d e`` (z) + ``(M / BLOCK_M) K d e_c`` (the codebook re-read per row tile, from L2) + ``M d (e_out + 4)
  + 12 M`` (z_q, the gathered rows, idx, sim) -- 6.4 MB + 8 MB of L2 reads at BLOCK_M 256 bf16. One launch;
  the codebook preparation (l2n, cast, transpose: ~6 small launches, ``~5 K d`` bytes) is cached between EMA
  steps (``PreparedCodebook``; see ``nearest_code.py``). Floor on an H100 SXM (~990 TFLOP/s dense bf16/fp16,
  ~495 TF32): 27 us bf16, 53 us tf32, 160 us tf32x3; the fp32 IEEE path runs on FMA units (67 TFLOP/s fp32:
  ~390 us + the compares).
* backward: ``2 M d (e + e_g) + M d e`` bytes, ~8 M d FLOPs, one launch (memory bound: ~3 us at BEiT shapes).

:func:`l2n_rows` is shared with the EMA kernels (``ema_codebook_update_triton.py``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

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
def _tf32(x):
    """fp32 -> the TF32 value the tensor cores use (low 13 mantissa bits dropped), kept in fp32."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


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
    EMULATE_TF32: tl.constexpr,
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
        i_m  = argmax_k s_mk     per tile: the row max and its first index (one reduction), then a
                                 running per-row (best, index) that a later tile replaces only if strictly
                                 greater => lowest k on ties
        ZQ[m] = CB_OUT[i_m];  SIM[m] = s_{m i_m} recomputed in the accumulation dtype from CB
                                 (exact for the pick)

    Only a [BLOCK_M, BLOCK_K] score tile ever exists (registers) -- no running [BLOCK_M, BLOCK_K] arrays, so
    BLOCK_M = 256 fits; memory traffic O(M*D + (M/BLOCK_M)*K*D). ``EMULATE_TF32`` (interpreter only, whose
    ``tl.dot`` ignores ``input_precision``): 1 rounds both operands to TF32 as the tensor cores read them, 3 runs
    the 3-pass split of ``tf32x3`` explicitly, so the tests see the rounding the GPU has.
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

    if EMULATE_TF32 == 1:  # interpreter only: its dot ignores input_precision; round like the tensor cores
        xd = _tf32(xd)
    if EMULATE_TF32 == 3:
        x_hi = _tf32(xd)
        x_lo = _tf32(xd - x_hi)

    # per tile: one row reduction of the [BLOCK_M, BLOCK_K] scores to (max, first argmax), then a running
    # (best, index) pair per row -- only the score tile and two [BLOCK_M] vectors live across iterations
    best = tl.full([BLOCK_M], float("-inf"), acc_ty)
    best_idx = tl.zeros([BLOCK_M], tl.int32)
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
        if EMULATE_TF32 == 3:  # the 3-pass split: hi*hi + hi*lo + lo*hi (lo*lo, ~2^-22 relative, dropped)
            c_hi = _tf32(c)
            c_lo = _tf32(c - c_hi)
            s = tl.dot(x_hi, c_lo, input_precision="ieee", out_dtype=acc_ty)
            s = tl.dot(x_lo, c_hi, s, input_precision="ieee", out_dtype=acc_ty)
            s = tl.dot(x_hi, c_hi, s, input_precision="ieee", out_dtype=acc_ty)
        else:
            if EMULATE_TF32 == 1:
                c = _tf32(c)
            s = tl.dot(xd, c, input_precision=INPUT_PRECISION, out_dtype=acc_ty)
        if not NORMALIZE:
            csq = tl.load(CB_SQ + cols, mask=cmask, other=0.0)
            s = 2.0 * s - csq[None, :]
        if K % BLOCK_K != 0:  # static: only a ragged last tile needs the -inf padding
            s = tl.where(cmask[None, :], s, float("-inf"))
        tile_best, tile_idx = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best  # strict: an earlier tile keeps a tie
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx + k0, best_idx)

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


# (BLOCK_M, BLOCK_K, num_warps, num_stages) at the BEiT v2 tokenizer shape with the JIT's specialisation
# (``python -m bench.static_gpu_check --ops codebook``, ptxas -v): every config the launcher can pick for an
# architecture compiles spill-free there (sm_90 and sm_80); configs that spilled everywhere were dropped, the
# ones that spill only for one precision on one architecture are pruned by ``_spills`` below.
# Tensor-core dots (bf16 / fp16 / tf32 / tf32x3 operands):
TC_CONFIGS = [
    (64, 128, 4, 3),
    (128, 128, 8, 3),
    (128, 64, 4, 3),
    (64, 256, 8, 3),
    (256, 64, 8, 3),
    (256, 128, 8, 3),
    (64, 64, 4, 4),
]
# fp32 IEEE dots (FMA units): the product tile lives in registers as plain fp32 FMAs
FMA_CONFIGS = [
    (64, 64, 4, 4),
    (64, 64, 8, 3),
    (128, 64, 8, 3),
    (32, 64, 4, 3),
    (32, 32, 4, 3),
]


def _spills(block_m, num_warps, input_precision, capability) -> bool:
    """Does this tile spill registers on this architecture? A tf32x3 dot on sm_8x (mma.sync) with 32 rows per
    warp: each warp holds its rows of x and of their hi/lo TF32 split as A fragments through the K loop, beside
    the three MMAs' accumulators -- ptxas -v at the BEiT v2 shape: 16-852 B of spills for M128 w4 and M256 w8
    (both 32 rows per warp), none at 16 rows per warp or fewer (253-255 registers). On sm_90 (wgmma) every
    config is spill-free, so nothing is pruned there (nor for an unknown architecture)."""
    return (capability is not None and capability[0] < 9 and input_precision == "tf32x3"
            and block_m // num_warps > 16)


def _lookup_configs(tensor_cores: Optional[bool] = None, input_precision: Optional[str] = None,
                    capability: Optional[tuple] = None):
    """The autotune configs of the lookup: those of tensor-core dots, of FMA (IEEE fp32) dots, or both (None);
    with an ``input_precision`` and a device ``capability``, without the configs that spill there."""
    table = {True: TC_CONFIGS, False: FMA_CONFIGS, None: TC_CONFIGS + [c for c in FMA_CONFIGS if c not in TC_CONFIGS]}
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bm, bk, w, st in table[tensor_cores] if not _spills(bm, w, input_precision, capability)]


def uses_tensor_cores(dot_dtype: torch.dtype, input_precision: str) -> bool:
    return dot_dtype in (torch.bfloat16, torch.float16) or (
        dot_dtype == torch.float32 and input_precision in ("tf32", "tf32x3"))


# On CUDA the tile sizes are autotuned per (D, K, precision, dtypes) -- the first call per key compiles and times
# every config (seconds; cached on disk afterwards); the interpreter uses the plain kernel. One autotuner per
# candidate list (keyed by its (BLOCK_M, BLOCK_K, num_warps, num_stages) tuples), built on first use.
_KEY = ["D", "K", "INPUT_PRECISION"]
_nearest_code_fwd_tuned: dict = {}


def lookup_autotuner(tensor_cores: bool, input_precision: str, capability: Optional[tuple]):
    """The autotuned lookup kernel over the configs ``_lookup_configs`` gives for this dot and architecture."""
    configs = _lookup_configs(tensor_cores, input_precision, capability)
    key = tuple((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) for c in configs)
    tuned = _nearest_code_fwd_tuned.get(key)
    if tuned is None:
        tuned = _nearest_code_fwd_tuned[key] = triton.autotune(configs=configs, key=_KEY)(_nearest_code_fwd_kernel)
    return tuned


class PreparedCodebook(NamedTuple):
    """The codebook as the lookup kernel reads it (built once per codebook version; ``nearest_code.py`` caches
    it between EMA steps): ``cb [K, D]`` as used (l2-normalised when ``normalize``) in the accumulation dtype,
    ``cb_dot_t [D, K]`` transposed in the GEMM operand dtype, ``cb_out [K, D]`` in the output dtype (``cb``
    itself when equal), ``cb_sq [K]`` = ``||c_k||^2`` (L2 only, else None)."""

    cb: torch.Tensor
    cb_dot_t: torch.Tensor
    cb_out: torch.Tensor
    cb_sq: Optional[torch.Tensor]


def prepare_codebook(codebook, normalize, eps, dot_dtype, out_dtype) -> PreparedCodebook:
    """Normalise / cast / transpose the codebook once (``~5 K D`` bytes, a handful of small launches)."""
    cdt = acc_dtype(out_dtype)
    cb = ref.prepare_codebook(codebook, normalize, eps, cdt).contiguous()
    return _derive(cb, normalize, dot_dtype, out_dtype, cb)


def _derive(cb, normalize, dot_dtype, out_dtype, cb_for_out) -> PreparedCodebook:
    cb_dot_t = (cb if dot_dtype == cb.dtype else cb.to(dot_dtype)).t().contiguous()
    cb_out = cb_for_out if out_dtype == cb_for_out.dtype else cb_for_out.to(out_dtype)
    return PreparedCodebook(cb, cb_dot_t, cb_out, None if normalize else (cb * cb).sum(-1))


@launches_on_input_device
def nearest_code_forward(z2d, prep: PreparedCodebook, normalize, eps, input_precision, out_dtype):
    """Launch the fused lookup; returns (indices int64 [M], z_q [M, D] out_dtype, similarity [M] cb.dtype).

    L2 (``normalize=False``): ``z`` and the codebook are multiplied by one power of two ``t``
    (``reference.l2_scale``: 1 unless a magnitude exceeds 2**32) so that neither ``2 <z, c>`` nor ``||c||^2``
    overflows (2**14 for float16 operands); the argmax does not change, ``cb_sq`` is recomputed from the
    scaled codebook, ``z_q`` is read from the unscaled rows and the similarity is scaled back by ``1 / t^2``
    in float64 afterwards.
    """
    M, D = z2d.shape
    cb, cb_out = prep.cb, prep.cb_out
    dot_dtype = prep.cb_dot_t.dtype
    K = cb.shape[0]
    dev = z2d.device
    t = None
    if not normalize:
        # fp16 GEMM operands overflow at 65504: keep them below 2**14 there (4 * d * 2**28 fits fp32 sums)
        t = ref.l2_scale(z2d, cb, cb.dtype, max_exponent=14 if dot_dtype == torch.float16 else 32)
        z2d = z2d * t  # a 0-d tensor: z keeps its dtype; a power of two, so exact
        prep = _derive(cb * t, False, dot_dtype, out_dtype, cb_out)
    idx = _buffers.empty((M,), torch.int64, dev)
    zq = _buffers.empty((M, D), out_dtype, dev)
    sim = _buffers.empty((M,), cb.dtype, dev)
    assert prep.cb.is_contiguous() and prep.cb_dot_t.is_contiguous() and tuple(prep.cb_dot_t.shape) == (D, K)
    args = (
        z2d,
        prep.cb,
        prep.cb_dot_t,
        prep.cb_out,
        prep.cb_sq if prep.cb_sq is not None else prep.cb,
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
    interp = interpreter_enabled() or z2d.device.type != "cuda"
    emulate = 0
    if interp and dot_dtype == torch.float32:
        emulate = {"tf32": 1, "tf32x3": 3}.get(input_precision, 0)
    meta = {
        "K": K,
        "NORMALIZE": bool(normalize),
        "INPUT_PRECISION": input_precision,
        "DOT_UPCAST": interp and dot_dtype == torch.bfloat16,
        "EMULATE_TF32": emulate,
        "SEPARATE_OUT": prep.cb_out.data_ptr() != prep.cb.data_ptr(),
        "BLOCK_D": max(16, triton.next_power_of_2(D)),
    }
    if interp:  # one of the tensor-core configs (128 x 128: half the interpreter's per-program work of 64 x 128)
        _nearest_code_fwd_kernel[(triton.cdiv(M, 128),)](*args, BLOCK_M=128, BLOCK_K=128, **meta)
    else:
        tuned = lookup_autotuner(uses_tensor_cores(dot_dtype, input_precision), input_precision,
                                 torch.cuda.get_device_capability(dev))
        tuned[lambda m: (triton.cdiv(M, m["BLOCK_M"]),)](*args, **meta)
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
