"""Triton kernels of window attention (Swin W-MSA / SW-MSA): one fused forward, one fused backward.

Notation for window row ``b`` of ``B*nW``, head ``h``, window index ``w = b mod nW``:
``S = scale Q K^T + bias[h] + mask[w]``, ``P = softmax_row(S)``, ``O = P V``. A Swin window holds N <= 64
tokens (36 for 6x6, 49 for 7x7), so one program keeps the whole N x N score tile of a (window, head) in
registers (padded to a power of two >= 16, padding masked): the softmax is exact in one pass, no online
rescaling and no log-sum-exp to save, and no [B*nW, H, N, N] tensor ever exists in memory.

Backward, with ``dO`` the incoming gradient (P recomputed from q, k, the bias and the mask)::

    dV = P^T dO,   dP = dO V^T,   delta_i = sum_j P_ij dP_ij,   dS = P * (dP - delta[:, None])
    dQ = scale dS K,   dK = scale dS^T Q,   dbias[h] = sum_b dS[b, h]

Both kernels give one program a head h, a window index w and a run of images (window rows
``b = img * nW + w``), so ``bias[h] + mask[w]`` is the same for all its rows and is loaded once, before
the row loop. ``_window_attention_bwd_kernel`` does the whole backward in one pass: it walks its rows in
increasing order writing dQ, dK, dV (each element written once, no atomics) and sums dS in float32
registers; the program's partial dbias is stored once into a [groups * nW, H, N, N] buffer that the host
reduces with one ``sum(0)``. The order is fixed per shape and device: dbias is bitwise reproducible. The
constant mask gets no gradient. All dots accumulate in float32; P and dS are rounded to the input dtype
before their dots (as FlashAttention does).

Cost model (BW = B*nW rows, H heads, N tokens, head dim d, e bytes per element; T = the tile, the power of
two >= max(16, N), and D >= max(16, d) likewise; G image groups from :func:`image_groups`)::

    forward   1 launch, G*nW*H programs (~8 per SM)
              HBM   4 BW H N d e (q, k, v read, O written) + the tables once (H N^2 4 + nW N^2 4)
              L2    one bias and one mask tile per program (was one per row: 2 N^2 4 B per row and head)
              FLOP  2 tile dots, 4 BW H T^2 D issued (useful 4 BW H N^2 d: x3.16 at N 36, x1.71 at N 49)
    backward  1 launch + 1 reduction of the partials (+ a cast when the bias is not float32),
              G*nW*H programs (~4 per SM)
              HBM   7 BW H N d e (q, k, v, dO read, dq, dk, dv written) + the tables once
                    + 2 G nW H N^2 4 (partials written, read by the reduction) + H N^2 4 (dbias)
              FLOP  5 tile dots (S^T, dV, dP^T, dK, dQ), 10 BW H T^2 D issued (useful 10 BW H N^2 d)

Swin-B stage 1 at batch 128, bf16 (192 px, window 6: BW 8192, H 4, N 36, d 32; H100 SXM 3.35 TB/s, 989
TFLOP/s dense bf16): forward 302 MB = 90 us of HBM, 17.2 GFLOP issued = 17 us of tensor cores; forward +
backward 831 MB = 248 us, 60 GFLOP = 61 us, partials 4 MB (G = 3): memory-bound with the padding included.
224 px, window 7 (N 49): 412 MB = 123 us forward, 1132 MB = 338 us forward + backward, the same 60 GFLOP.
Predicted, not measured: the backward holds ~250 registers x 8 warps, one program per SM, and its row loop
does not prefetch (1 stage), so it is expected latency-bound, short of its memory floor; the forward
(~120 registers x 4 warps) keeps ~4 programs per SM.

This is the only module of window attention that imports triton; it is imported lazily by the triton
backend.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import _buffers
from kernels._backend import launches_on_input_device
from kernels.attn.attention_triton import dot, dot_precision, interpreter_upcast
from kernels.attn.reference import heads_last_empty

LOG2E = 1.4426950408889634


@triton.jit
def _table_tile(Table, N, BLOCK: tl.constexpr, TRANSPOSED: tl.constexpr):
    """A contiguous [N, N] table as a zero-padded [BLOCK, BLOCK] float32 tile, transposed with TRANSPOSED."""
    if TRANSPOSED:
        blk = tl.make_block_ptr(Table, (N, N), (1, N), (0, 0), (BLOCK, BLOCK), (0, 1))
    else:
        blk = tl.make_block_ptr(Table, (N, N), (N, 1), (0, 0), (BLOCK, BLOCK), (1, 0))
    return tl.load(blk, boundary_check=(0, 1), padding_option="zero").to(tl.float32)


@triton.jit
def _bias_mask_tile(Bias, Mask, h, w, N, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
                    TRANSPOSED: tl.constexpr):
    """``(bias[h] + mask[w]) log2e`` as one [BLOCK, BLOCK] float32 tile with the padding keys at -inf (the
    columns; the rows with TRANSPOSED, which gives the tile transposed): what every row of a program adds to
    its scores."""
    keys = tl.arange(0, BLOCK) < N
    extra = tl.zeros([BLOCK, BLOCK], tl.float32)
    if HAS_BIAS:
        extra += _table_tile(Bias + h * N * N, N, BLOCK, TRANSPOSED)
    if HAS_MASK:
        extra += _table_tile(Mask + w * N * N, N, BLOCK, TRANSPOSED)
    if TRANSPOSED:
        extra = tl.where(keys[:, None], extra * 1.4426950408889634, float("-inf"))
    else:
        extra = tl.where(keys[None, :], extra * 1.4426950408889634, float("-inf"))
    return extra


@triton.jit
def _window_attention_fwd_kernel(
    Q, K, V, Bias, Mask, O,
    s_xb, s_xh, s_xm, s_xd,
    s_ob, s_oh, s_om, s_od,
    NIMG, H, NW, N, HEAD_DIM, ROWS, qk_scale2,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Forward of one head h and one window index w over the images ``g*R .. g*R + R - 1`` (R = ROWS, the
    last group shorter; window rows ``b = img * nW + w``), the whole N x N tile of a row at once.

    ``(bias[h] + mask[w]) log2e`` (padding keys -> -inf) is loaded once per program; per row
    ``s2 = (q k^T) scale log2e + that``, ``p = 2^(s2 - rowmax)``, ``O = (p v) / rowsum(p)``. A row whose
    every entry is -inf gives O = 0. q, k, v share their strides (``s_x*``); bias [H, N, N] and mask
    [nW, N, N] are contiguous.
    """
    pid = tl.program_id(0)
    h = pid % H
    t = pid // H
    w = t % NW
    g = t // NW
    extra = _bias_mask_tile(Bias, Mask, h, w, N, HAS_BIAS, HAS_MASK, BLOCK, False)

    first = g * ROWS
    count = tl.minimum(ROWS, NIMG - first)
    i = 0
    while i < count:  # a run-time trip count (see the backward)
        b = (first + i).to(tl.int64) * NW + w  # 64-bit row offsets: B*nW*H*N*d may exceed 2^31
        q_blk = tl.make_block_ptr(Q + b * s_xb + h * s_xh, (N, HEAD_DIM), (s_xm, s_xd), (0, 0), (BLOCK, BLOCK_D), (1, 0))
        k_blk = tl.make_block_ptr(K + b * s_xb + h * s_xh, (N, HEAD_DIM), (s_xm, s_xd), (0, 0), (BLOCK, BLOCK_D), (1, 0))
        v_blk = tl.make_block_ptr(V + b * s_xb + h * s_xh, (N, HEAD_DIM), (s_xm, s_xd), (0, 0), (BLOCK, BLOCK_D), (1, 0))
        q = tl.load(q_blk, boundary_check=(0, 1), padding_option="zero")
        k = tl.load(k_blk, boundary_check=(0, 1), padding_option="zero")
        v = tl.load(v_blk, boundary_check=(0, 1), padding_option="zero")
        s = dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale2 + extra
        m = tl.max(s, 1)
        m = tl.where(m == float("-inf"), 0.0, m)
        p = tl.math.exp2(s - m[:, None])
        l = tl.sum(p, 1)
        acc = dot(p.to(v.dtype), v, PRECISION, UPCAST)
        out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
        o_blk = tl.make_block_ptr(O + b * s_ob + h * s_oh, (N, HEAD_DIM), (s_om, s_od), (0, 0), (BLOCK, BLOCK_D), (1, 0))
        tl.store(o_blk, out.to(O.dtype.element_ty), boundary_check=(0, 1))
        i += 1


@triton.jit
def _window_attention_bwd_kernel(
    Q, K, V, Bias, Mask, DO, DQ, DK, DV, DBias,
    s_xb, s_xh, s_xm, s_xd,
    s_gb, s_gh, s_gm, s_gd,
    s_yb, s_yh, s_ym, s_yd,
    NIMG, H, NW, N, HEAD_DIM, ROWS, scale, qk_scale2,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, NEED_DBIAS: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Fused backward of one head h and one window index w over the images ``g*R .. g*R + R - 1`` (R = ROWS,
    the last group shorter): window rows ``b = img * nW + w``, so ``bias[h] + mask[w]`` is the same for every
    row of the program and is loaded once, before the loop (no N x N table load or address tile in it).

    Per row b, in increasing order, in the transposed orientation (tile rows = keys j, columns = queries i,
    so that dV and dK need no transposed N x N operand): ``S^T = k q^T scale + (bias + mask)^T``,
    ``P^T`` by a column softmax (exact: the whole tile is here), ``dV = P^T dO``, ``dP^T = v dO^T``,
    ``delta = colsum(P^T dP^T)``, ``dS^T = P^T (dP^T - delta)``, ``dK = scale dS^T q``,
    ``dQ = scale (dS^T)^T k`` (each stored once), and ``acc += dS^T``. With NEED_DBIAS the program stores
    ``DBias[g * nW + w, h] = acc^T`` (float32, contiguous [groups * nW, H, N, N]) once at the end; the host
    sums the first axis. q, k, v share strides (``s_x*``), dq, dk, dv too (``s_y*``); bias and mask are
    contiguous. Block pointers keep the loop's addressing scalar (per-element pointer tiles spilled registers).
    """
    pid = tl.program_id(0)
    h = pid % H
    t = pid // H
    w = t % NW
    g = t // NW
    extra = _bias_mask_tile(Bias, Mask, h, w, N, HAS_BIAS, HAS_MASK, BLOCK, True)  # ^T: one tile for the program

    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    first = g * ROWS
    count = tl.minimum(ROWS, NIMG - first)
    # a while loop with a run-time trip count: ptxas unrolls a constant one (more registers: 8-324 B spills),
    # and the interpreter cannot take a run-time argument as a for loop's bound
    i = 0
    while i < count:
        b = (first + i).to(tl.int64) * NW + w  # 64-bit row offsets: B*nW*H*N*d may exceed 2^31
        q_blk = tl.make_block_ptr(Q + b * s_xb + h * s_xh, (N, HEAD_DIM), (s_xm, s_xd), (0, 0), (BLOCK, BLOCK_D), (1, 0))
        k_blk = tl.make_block_ptr(K + b * s_xb + h * s_xh, (N, HEAD_DIM), (s_xm, s_xd), (0, 0), (BLOCK, BLOCK_D), (1, 0))
        v_blk = tl.make_block_ptr(V + b * s_xb + h * s_xh, (N, HEAD_DIM), (s_xm, s_xd), (0, 0), (BLOCK, BLOCK_D), (1, 0))
        g_blk = tl.make_block_ptr(DO + b * s_gb + h * s_gh, (N, HEAD_DIM), (s_gm, s_gd), (0, 0), (BLOCK, BLOCK_D), (1, 0))
        q = tl.load(q_blk, boundary_check=(0, 1), padding_option="zero")
        k = tl.load(k_blk, boundary_check=(0, 1), padding_option="zero")
        v = tl.load(v_blk, boundary_check=(0, 1), padding_option="zero")
        do = tl.load(g_blk, boundary_check=(0, 1), padding_option="zero")
        st = dot(k, tl.trans(q), PRECISION, UPCAST) * qk_scale2 + extra
        m = tl.max(st, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        pt = tl.math.exp2(st - m[None, :])
        l = tl.sum(pt, 0)
        pt = pt / tl.where(l == 0.0, 1.0, l)[None, :]

        dv = dot(pt.to(do.dtype), do, PRECISION, UPCAST)
        dv_blk = tl.make_block_ptr(DV + b * s_yb + h * s_yh, (N, HEAD_DIM), (s_ym, s_yd), (0, 0), (BLOCK, BLOCK_D), (1, 0))
        tl.store(dv_blk, dv.to(DV.dtype.element_ty), boundary_check=(0, 1))
        dpt = dot(v, tl.trans(do), PRECISION, UPCAST)
        dst = pt * (dpt - tl.sum(pt * dpt, 0)[None, :])  # padding queries have dO = 0: dS = 0
        dk = dot(dst.to(q.dtype), q, PRECISION, UPCAST) * scale
        dk_blk = tl.make_block_ptr(DK + b * s_yb + h * s_yh, (N, HEAD_DIM), (s_ym, s_yd), (0, 0), (BLOCK, BLOCK_D), (1, 0))
        tl.store(dk_blk, dk.to(DK.dtype.element_ty), boundary_check=(0, 1))
        dq = dot(tl.trans(dst.to(k.dtype)), k, PRECISION, UPCAST) * scale
        dq_blk = tl.make_block_ptr(DQ + b * s_yb + h * s_yh, (N, HEAD_DIM), (s_ym, s_yd), (0, 0), (BLOCK, BLOCK_D), (1, 0))
        tl.store(dq_blk, dq.to(DQ.dtype.element_ty), boundary_check=(0, 1))
        if NEED_DBIAS:
            acc += dst
        i += 1
    if NEED_DBIAS:
        db_blk = tl.make_block_ptr(DBias + ((g * NW + w) * H + h) * N * N, (N, N), (1, N), (0, 0), (BLOCK, BLOCK), (0, 1))
        tl.store(db_blk, acc, boundary_check=(0, 1))


# ----------------------------------------------------------------------------------------------------------
# launchers


def _blocks(n: int, head_dim: int) -> dict:
    """One power-of-two tile >= 16 holds a whole window (N <= 64) and the head dim (<= 64)."""
    return {"BLOCK": max(16, triton.next_power_of_2(n)), "BLOCK_D": max(16, triton.next_power_of_2(head_dim))}


def _options(blocks: dict, dtype: torch.dtype, backward: bool, precision: str = "tf32") -> dict:
    """Launch options, 1 stage (pipelining the loads of one tile costs registers). Forward: 4 warps; float32
    64 x 64 tiles 8 (4 spilled 128 B on sm_90), 16 for IEEE dots at head dim 64 (8 spill 152 B). Backward:
    8 warps for 64 x 64 tiles (4 spilled 44-96 B in bf16/fp16 and over 1 KB in float32), else 4. Every
    Swin-B stage, the 16/32-wide tiles and the 8x8 x d 64 tile compile spill-free for sm_90 and sm_80 with
    the JIT's specialisation (``python -m bench.static_gpu_check --ops window_attention``,
    bench/results/static-sm90.md); not yet timed on hardware."""
    wide = blocks["BLOCK"] >= 64
    if not backward:
        warps = 4
        if wide and dtype == torch.float32:
            warps = 16 if (precision == "ieee" and blocks["BLOCK_D"] >= 64) else 8
        return {"num_warps": warps, "num_stages": 1}
    return {"num_warps": 8 if wide else 4, "num_stages": 1}


def backward_precision(dtype: torch.dtype, blocks: dict, precision: str) -> str:
    """The backward's dot precision: as the forward's (:func:`dot_precision`), except float32 64 x 64 tiles,
    which run IEEE dots even where TF32 is allowed: TF32 operands are 32-bit register fragments and the
    fused backward then spills 60-536 B on sm_90 / sm_80 (IEEE: none). More exact, never less."""
    if dtype == torch.float32 and precision == "tf32" and blocks["BLOCK"] >= 64:
        return "ieee"
    return precision


def _shared_layout(q, k, v):
    """q, k, v with one set of strides (the kernels read them with one offset tile): as given when they are
    views of one qkv projection or all contiguous, else contiguous copies (rare)."""
    if q.stride() == k.stride() == v.stride():
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


def _tables(bias, mask, q):
    """Contiguous bias [H, N, N] and mask [nW, N, N] (small; the gathered rel-pos bias is a permuted view),
    or q as a placeholder pointer when absent."""
    return (bias.contiguous() if bias is not None else q), (mask.contiguous() if mask is not None else q)


@launches_on_input_device
def window_attention_forward(q, k, v, bias, window_mask, scale: float):
    """Launch the forward kernel: ``out`` [BW, H, N, d] (in q's dtype) over a [BW, N, H, d] buffer."""
    BW, H, N, d = q.shape
    nW = window_mask.shape[0] if window_mask is not None else 1
    q, k, v = _shared_layout(q, k, v)
    out = heads_last_empty(q)
    cfg = _blocks(N, d)
    b_arg, m_arg = _tables(bias, window_mask, q)
    rows, groups = image_groups(BW // nW, nW * H, _sms(q.device), per_sm=FWD_PROGRAMS_PER_SM)
    precision = dot_precision(q.dtype)
    _window_attention_fwd_kernel[(groups * nW * H,)](
        q, k, v, b_arg, m_arg, out, *q.stride(), *out.stride(),
        BW // nW, H, nW, N, d, rows, scale * LOG2E,
        HAS_BIAS=bias is not None, HAS_MASK=window_mask is not None,
        PRECISION=precision, UPCAST=interpreter_upcast(q), **cfg, **_options(cfg, q.dtype, False, precision),
    )
    return out


FWD_PROGRAMS_PER_SM = 8  # forward: ~3 resident programs per SM (145 registers x 128 threads), 2-3 waves
BWD_PROGRAMS_PER_SM = 4  # backward: 1 resident (8 warps x ~250 registers), 4 waves


def image_groups(n_img: int, programs_per_group: int, sms: int | None,
                 per_sm: int = BWD_PROGRAMS_PER_SM) -> tuple[int, int]:
    """``(rows, groups)`` of the backward: the images split into ``groups`` runs of ``rows`` (the last shorter),
    one program per (group, window index, head), about ``per_sm`` programs per SM (``sms``; None: the interpreter, two
    groups, which exercises the reduction). ``rows`` is a run-time argument of the kernel (one compiled
    variant for every shape). Fixed per shape and device, so dbias is bitwise reproducible."""
    if sms is None:
        groups = min(n_img, 2)
    else:
        groups = max(1, min(n_img, math.ceil(per_sm * sms / max(1, programs_per_group))))
    rows = math.ceil(n_img / groups)
    return rows, math.ceil(n_img / rows)


def _sms(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


@launches_on_input_device
def window_attention_backward(grad_out, q, k, v, bias, window_mask, scale: float, need_dbias: bool):
    """Launch the fused backward. Returns ``(dq, dk, dv, dbias)``; dbias [H, N, N] in the bias's dtype, or
    None unless ``need_dbias``. dq, dk, dv are [BW, N, H, d]-contiguous buffers viewed as [BW, H, N, d]."""
    BW, H, N, d = q.shape
    nW = window_mask.shape[0] if window_mask is not None else 1
    need_dbias = bool(need_dbias and bias is not None)
    q, k, v = _shared_layout(q, k, v)
    rows, groups = image_groups(BW // nW, nW * H, _sms(q.device))
    dq, dk, dv = heads_last_empty(q), heads_last_empty(k), heads_last_empty(v)
    dbuf = _buffers.empty((groups * nW, H, N, N), torch.float32, q.device) if need_dbias else None
    cfg = _blocks(N, d)
    b_arg, m_arg = _tables(bias, window_mask, q)
    _window_attention_bwd_kernel[(groups * nW * H,)](
        q, k, v, b_arg, m_arg, grad_out, dq, dk, dv, dbuf if dbuf is not None else q,
        *q.stride(), *grad_out.stride(), *dq.stride(),
        BW // nW, H, nW, N, d, rows, scale, scale * LOG2E,
        HAS_BIAS=bias is not None, HAS_MASK=window_mask is not None,
        NEED_DBIAS=need_dbias, PRECISION=backward_precision(q.dtype, cfg, dot_precision(q.dtype)),
        UPCAST=interpreter_upcast(q), **cfg, **_options(cfg, q.dtype, backward=True),
    )
    dbias = None
    if need_dbias:
        dbias = (dbuf.sum(0) if dbuf.shape[0] > 1 else dbuf[0]).to(bias.dtype)  # one fixed-order reduction
    return dq, dk, dv, dbias
