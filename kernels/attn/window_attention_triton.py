"""Triton kernels of window attention (Swin W-MSA / SW-MSA): one fused forward, one fused backward.

Notation for window row ``b`` of ``B*nW``, head ``h``, window index ``w = b mod nW``:
``S = scale Q K^T + bias[h] + mask[w]``, ``P = softmax_row(S)``, ``O = P V``. A Swin window holds N <= 64
tokens (36 for 6x6, 49 for 7x7), so one program keeps the whole N x N score tile of a (window, head) in
registers (padded to a power of two >= 16, padding masked): the softmax is exact in one pass, no online
rescaling and no log-sum-exp to save, and no [B*nW, H, N, N] tensor ever exists in memory.

Backward, with ``dO`` the incoming gradient (P recomputed from q, k, the bias and the mask)::

    dV = P^T dO,   dP = dO V^T,   delta_i = sum_j P_ij dP_ij,   dS = P * (dP - delta[:, None])
    dQ = scale dS K,   dK = scale dS^T Q,   dbias[h] = sum_b dS[b, h]

``_window_attention_bwd_kernel`` does all of it in one pass: each program owns one head and a contiguous
group of window rows, walks them in increasing order writing dQ, dK, dV (each element written once, no
atomics) and sums dS in float32 registers; the group's partial dbias is stored once into a
[groups, H, N, N] buffer that the host reduces with one ``sum(0)``. The order is fixed per shape and device:
dbias is bitwise reproducible. The constant mask gets no gradient. All dots accumulate in float32; P and
dS are rounded to the input dtype before their dots (as FlashAttention does).

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
def _window_attention_fwd_kernel(
    Q, K, V, Bias, Mask, O,
    s_xb, s_xh, s_xm, s_xd,
    s_ob, s_oh, s_om, s_od,
    H, NW, N, HEAD_DIM, qk_scale2,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Forward of one (window row b, head h): the whole N x N tile at once.

    ``s2 = (q k^T) scale log2e + (bias[h] + mask[b mod nW]) log2e`` (padding columns -> -inf),
    ``p = 2^(s2 - rowmax)``, ``O = (p v) / rowsum(p)``. A row whose every entry is -inf gives O = 0.
    q, k, v share their strides (``s_x*``); bias [H, N, N] and mask [nW, N, N] are contiguous.
    """
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)  # 64-bit row offsets: B*nW*H*N*d may exceed 2^31
    h = pid % H
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    ok = offs < N
    nd = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    valid = ok[:, None] & ok[None, :]
    x_off = b * s_xb + h * s_xh + offs[:, None] * s_xm + offs_d[None, :] * s_xd
    nn_off = offs[:, None] * N + offs[None, :]

    q = tl.load(Q + x_off, mask=nd, other=0.0)
    k = tl.load(K + x_off, mask=nd, other=0.0)
    v = tl.load(V + x_off, mask=nd, other=0.0)
    s = dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale2
    if HAS_BIAS:
        bias = tl.load(Bias + h * N * N + nn_off, mask=valid, other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    if HAS_MASK:
        wm = tl.load(Mask + (b % NW) * N * N + nn_off, mask=valid, other=0.0)
        s += wm.to(tl.float32) * 1.4426950408889634
    s = tl.where(ok[None, :], s, float("-inf"))
    m = tl.max(s, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    p = tl.math.exp2(s - m[:, None])
    l = tl.sum(p, 1)
    acc = dot(p.to(v.dtype), v, PRECISION, UPCAST)
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    tl.store(O + b * s_ob + h * s_oh + offs[:, None] * s_om + offs_d[None, :] * s_od,
             out.to(O.dtype.element_ty), mask=nd)


@triton.jit
def _window_attention_bwd_kernel(
    Q, K, V, Bias, Mask, DO, DQ, DK, DV, DBias,
    s_xb, s_xh, s_xm, s_xd,
    s_gb, s_gh, s_gm, s_gd,
    s_yb, s_yh, s_ym, s_yd,
    BW, H, NW, N, HEAD_DIM, scale, qk_scale2,
    ROWS_PER_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, NEED_DBIAS: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Fused backward of one head h over the window rows ``g*R .. g*R + R - 1`` (R = ROWS_PER_GROUP).

    Per row b, in increasing order, in the transposed orientation (tile rows = keys j, columns = queries i,
    so that dV and dK need no transposed N x N operand): ``S^T = k q^T scale + (bias + mask)^T``,
    ``P^T`` by a column softmax (exact: the whole tile is here), ``dV = P^T dO``, ``dP^T = v dO^T``,
    ``delta = colsum(P^T dP^T)``, ``dS^T = P^T (dP^T - delta)``, ``dK = scale dS^T q``,
    ``dQ = scale (dS^T)^T k`` (each stored once), and ``acc += dS^T``. With NEED_DBIAS the program stores
    ``DBias[g, h] = acc^T`` (float32, contiguous [groups, H, N, N]) once at the end; the host sums the
    groups. q, k, v share strides (``s_x*``), dq, dk, dv too (``s_y*``); bias and mask are contiguous.
    Block pointers keep the loop's addressing scalar (per-element pointer tiles spilled registers).
    """
    pid = tl.program_id(0)
    h = pid % H
    g = pid // H
    offs = tl.arange(0, BLOCK)
    ok = offs < N

    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    first = g.to(tl.int64) * ROWS_PER_GROUP
    for i in range(ROWS_PER_GROUP):
        b = first + i
        # block pointers: scalar state only, so no per-element address tiles stay live across the row loop
        rows = tl.minimum(BW - b, 1) * N  # 0 rows for the short last group: the loads give zeros
        q_blk = tl.make_block_ptr(Q + b * s_xb + h * s_xh, (rows, HEAD_DIM), (s_xm, s_xd), (0, 0), (BLOCK, BLOCK_D), (1, 0))
        k_blk = tl.make_block_ptr(K + b * s_xb + h * s_xh, (rows, HEAD_DIM), (s_xm, s_xd), (0, 0), (BLOCK, BLOCK_D), (1, 0))
        v_blk = tl.make_block_ptr(V + b * s_xb + h * s_xh, (rows, HEAD_DIM), (s_xm, s_xd), (0, 0), (BLOCK, BLOCK_D), (1, 0))
        g_blk = tl.make_block_ptr(DO + b * s_gb + h * s_gh, (rows, HEAD_DIM), (s_gm, s_gd), (0, 0), (BLOCK, BLOCK_D), (1, 0))
        q = tl.load(q_blk, boundary_check=(0, 1), padding_option="zero")
        k = tl.load(k_blk, boundary_check=(0, 1), padding_option="zero")
        v = tl.load(v_blk, boundary_check=(0, 1), padding_option="zero")
        do = tl.load(g_blk, boundary_check=(0, 1), padding_option="zero")
        # transposed orientation (rows = keys j, columns = queries i): dV and dK need no transposed tile
        st = dot(k, tl.trans(q), PRECISION, UPCAST) * qk_scale2
        if HAS_BIAS or HAS_MASK:  # re-read per row from L1/L2: cheaper than keeping N x N tiles live
            extra = tl.zeros([BLOCK, BLOCK], tl.float32)
            if HAS_BIAS:
                bias_blk = tl.make_block_ptr(Bias + h * N * N, (N, N), (1, N), (0, 0), (BLOCK, BLOCK), (0, 1))
                extra += tl.load(bias_blk, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
            if HAS_MASK:
                mask_blk = tl.make_block_ptr(Mask + (b % NW) * N * N, (N, N), (1, N), (0, 0), (BLOCK, BLOCK), (0, 1))
                extra += tl.load(mask_blk, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
            st += extra * 1.4426950408889634
        st = tl.where(ok[:, None], st, float("-inf"))
        m = tl.max(st, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        pt = tl.math.exp2(st - m[None, :])
        l = tl.sum(pt, 0)
        pt = pt / tl.where(l == 0.0, 1.0, l)[None, :]

        dv = dot(pt.to(do.dtype), do, PRECISION, UPCAST)
        dv_blk = tl.make_block_ptr(DV + b * s_yb + h * s_yh, (rows, HEAD_DIM), (s_ym, s_yd), (0, 0), (BLOCK, BLOCK_D), (1, 0))
        tl.store(dv_blk, dv.to(DV.dtype.element_ty), boundary_check=(0, 1))
        dpt = dot(v, tl.trans(do), PRECISION, UPCAST)
        dst = pt * (dpt - tl.sum(pt * dpt, 0)[None, :])  # padding queries (and short rows) have dO = 0: dS = 0
        dk = dot(dst.to(q.dtype), q, PRECISION, UPCAST) * scale
        dk_blk = tl.make_block_ptr(DK + b * s_yb + h * s_yh, (rows, HEAD_DIM), (s_ym, s_yd), (0, 0), (BLOCK, BLOCK_D), (1, 0))
        tl.store(dk_blk, dk.to(DK.dtype.element_ty), boundary_check=(0, 1))
        dq = dot(tl.trans(dst.to(k.dtype)), k, PRECISION, UPCAST) * scale
        dq_blk = tl.make_block_ptr(DQ + b * s_yb + h * s_yh, (rows, HEAD_DIM), (s_ym, s_yd), (0, 0), (BLOCK, BLOCK_D), (1, 0))
        tl.store(dq_blk, dq.to(DQ.dtype.element_ty), boundary_check=(0, 1))
        if NEED_DBIAS:
            acc += dst
    if NEED_DBIAS:
        db_blk = tl.make_block_ptr(DBias + (g * H + h) * N * N, (N, N), (1, N), (0, 0), (BLOCK, BLOCK), (0, 1))
        tl.store(db_blk, acc, boundary_check=(0, 1))


# ----------------------------------------------------------------------------------------------------------
# launchers


def _blocks(n: int, head_dim: int) -> dict:
    """One power-of-two tile >= 16 holds a whole window (N <= 64) and the head dim (<= 64)."""
    return {"BLOCK": max(16, triton.next_power_of_2(n)), "BLOCK_D": max(16, triton.next_power_of_2(head_dim))}


def _options(blocks: dict, dtype: torch.dtype, backward: bool) -> dict:
    """Launch options. Forward: 4 warps, 1 stage. Backward: 1 stage (pipelining the row loop's loads costs
    registers); 4 warps, 8 for 64 x 64 tiles with float32 inputs or head dim 64. Compiled ahead of time for
    sm_90 for bf16/fp16/fp32 at N = 16, 36, 49, 64 and d = 32, 64 (tests/test_window_attention.py, which
    also bounds the register spills reported by ptxas -v: none in the forward and for N <= 32; the backward's
    64 x 64 tiles spill 36-256 bytes, Swin's N = 36/49 at d = 32 in bf16 256); not yet timed on hardware."""
    if not backward:
        return {"num_warps": 4, "num_stages": 1}
    wide = blocks["BLOCK"] >= 64 and (dtype == torch.float32 or blocks["BLOCK_D"] >= 64)
    return {"num_warps": 8 if wide else 4, "num_stages": 1}


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
    _window_attention_fwd_kernel[(BW * H,)](
        q, k, v, b_arg, m_arg, out, *q.stride(), *out.stride(),
        H, nW, N, d, scale * LOG2E,
        HAS_BIAS=bias is not None, HAS_MASK=window_mask is not None,
        PRECISION=dot_precision(q.dtype), UPCAST=interpreter_upcast(q), **cfg, **_options(cfg, q.dtype, backward=False),
    )
    return out


def _dbias_groups(BW: int, H: int, device: torch.device) -> int:
    """Row groups of the backward: enough programs (H per group) to fill the GPU, fixed per shape and device
    so that dbias stays bitwise reproducible. Two on CPU (the interpreter), which exercises the reduction."""
    if device.type != "cuda":
        return min(BW, 2)
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(BW, math.ceil(target / H)))


def _rows_per_group(BW: int, groups: int) -> int:
    """Rows per program, rounded up to a power of two: it is a compile-time constant of the backward kernel
    (the loop bound), so this keeps the compiled variants to a handful (one per power of two)."""
    return triton.next_power_of_2(math.ceil(BW / max(1, groups)))


@launches_on_input_device
def window_attention_backward(grad_out, q, k, v, bias, window_mask, scale: float, need_dbias: bool):
    """Launch the fused backward. Returns ``(dq, dk, dv, dbias)``; dbias [H, N, N] in the bias's dtype, or
    None unless ``need_dbias``. dq, dk, dv are [BW, N, H, d]-contiguous buffers viewed as [BW, H, N, d]."""
    BW, H, N, d = q.shape
    nW = window_mask.shape[0] if window_mask is not None else 1
    need_dbias = bool(need_dbias and bias is not None)
    q, k, v = _shared_layout(q, k, v)
    per_group = _rows_per_group(BW, _dbias_groups(BW, H, q.device))
    groups = math.ceil(BW / per_group)
    dq, dk, dv = heads_last_empty(q), heads_last_empty(k), heads_last_empty(v)
    dbuf = _buffers.empty((groups, H, N, N), torch.float32, q.device) if need_dbias else None
    cfg = _blocks(N, d)
    b_arg, m_arg = _tables(bias, window_mask, q)
    _window_attention_bwd_kernel[(groups * H,)](
        q, k, v, b_arg, m_arg, grad_out, dq, dk, dv, dbuf if dbuf is not None else q,
        *q.stride(), *grad_out.stride(), *dq.stride(),
        BW, H, nW, N, d, scale, scale * LOG2E,
        ROWS_PER_GROUP=per_group, HAS_BIAS=bias is not None, HAS_MASK=window_mask is not None,
        NEED_DBIAS=need_dbias, PRECISION=dot_precision(q.dtype), UPCAST=interpreter_upcast(q), **cfg,
        **_options(cfg, q.dtype, backward=True),
    )
    dbias = None
    if need_dbias:
        dbias = (dbuf.sum(0) if groups > 1 else dbuf[0]).to(bias.dtype)  # one fixed-order reduction
    return dq, dk, dv, dbias
