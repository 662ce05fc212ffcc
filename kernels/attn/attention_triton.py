"""Triton kernels of attention with an additive bias: FlashAttention-2 style forward and backward.

Notation (one batch element b and head h): ``S = scale * Q K^T + bias``, ``P = softmax(S)`` row-wise,
``O = P V``, ``L = logsumexp(S)`` per row. Work is done in base 2: ``S2 = S * log2(e)``,
``L2 = L * log2(e)``, ``P = exp2(S2 - L2)``. Backward, with ``dO`` the incoming gradient:

    delta_i = sum_c dO_ic O_ic                      (= sum_j P_ij dP_ij)
    dP = dO V^T,   dS = P * (dP - delta[:, None])   (gradient w.r.t. S, hence w.r.t. bias)
    dV = P^T dO,   dQ = scale * dS K,   dK = scale * dS^T Q,   dbias = sum over broadcast dims of dS

Kernels: ``_attention_fwd_kernel`` (O and L2), ``_attention_bwd_preprocess_kernel`` (delta),
``_attention_bwd_dkdv_kernel`` (dK, dV; dbias stored per batch or added with atomics),
``_attention_bwd_dq_kernel`` (dQ) and ``_attention_bwd_dbias_kernel`` (deterministic dbias for a bias
shared over the batch: each program owns a (head, q-tile, k-tile) block and loops over the batch).
All matmuls accumulate in float32; P and dS are rounded to the input dtype before their dots (as in
FlashAttention). Rows/columns past the sequence end are masked, so any N works (197, 50, 13, 1), and
the head dim is padded to a power of two >= 16 by masked loads.

This module and window_attention_triton.py (which reuses its ``dot`` helpers) are the only ones of the family
that import triton; the triton backends import them lazily.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import _buffers
from kernels._backend import launches_on_input_device
from kernels.attn.reference import heads_last_empty

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in float32. UPCAST (interpreter + bfloat16 only) converts the operands to
    float32 first (exact) because the numpy interpreter cannot multiply bfloat16 (stored as uint16)."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def dot_acc(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` (float32 accumulator); see :func:`dot` for UPCAST."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Bias, O, L2,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_bb, s_bh, s_bm, s_bn,
    s_ob, s_oh, s_om, s_od,
    H, N_Q, N_K, HEAD_DIM, qk_scale2,
    HAS_BIAS: tl.constexpr, K_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Forward over one (q-tile, b, h): online softmax over the k-tiles.

    For each k-tile: ``s2 = (q k^T) * scale * log2e + bias * log2e`` (padding columns -> -inf),
    ``m_new = max(m, rowmax(s2))``, ``acc = acc * 2^(m - m_new) + 2^(s2 - m_new) v``,
    ``l = l * 2^(m - m_new) + rowsum(2^(s2 - m_new))``. Finally ``O = acc / l`` and
    ``L2 = m + log2(l)`` (float32, base 2), saved for the backward.
    """
    # 1-D grid (no 65535 limit on B*H): q-tiles fastest, so the k/v of one (b, h) stay hot in L2
    q_tiles = tl.cdiv(N_Q, BLOCK_M)
    pid_m = tl.program_id(0) % q_tiles
    pid_bh = tl.program_id(0) // q_tiles
    b = (pid_bh // H).to(tl.int64)  # 64-bit batch offsets: B*H*N*d may exceed 2^31
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    bias_base = Bias + b * s_bb + h * s_bh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for tile in range(K_TILES):
        cols = tile * BLOCK_N + offs_n
        n_ok = cols < N_K
        kt = tl.load(k_base + cols[None, :] * s_kn + offs_d[:, None] * s_kd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = dot(q, kt, PRECISION, UPCAST) * qk_scale2
        if HAS_BIAS:
            bias = tl.load(bias_base + offs_m[:, None] * s_bm + cols[None, :] * s_bn,
                           mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * s_vn + offs_d[None, :] * s_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = dot_acc(p.to(v.dtype), v, acc, PRECISION, UPCAST)
        m_i = m_new

    empty = l_i == 0.0  # only when a whole row of the bias is -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_ptrs = O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(L2 + pid_bh * N_Q + offs_m, lse2, mask=m_ok)


@triton.jit
def _attention_bwd_preprocess_kernel(
    O, DO, Delta,
    s_ob, s_oh, s_om, s_od,
    s_gb, s_gh, s_gm, s_gd,
    H, N_Q, HEAD_DIM,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``delta[b, h, i] = sum_c dO[b, h, i, c] * O[b, h, i, c]`` in float32."""
    # 1-D grid (no 65535 limit on B*H): q-tiles fastest, so the k/v of one (b, h) stay hot in L2
    q_tiles = tl.cdiv(N_Q, BLOCK_M)
    pid_m = tl.program_id(0) % q_tiles
    pid_bh = tl.program_id(0) // q_tiles
    b = (pid_bh // H).to(tl.int64)  # 64-bit batch offsets: B*H*N*d may exceed 2^31
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od, mask=mask, other=0.0)
    do = tl.load(DO + b * s_gb + h * s_gh + offs_m[:, None] * s_gm + offs_d[None, :] * s_gd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, Bias, DO, L2, Delta, DK, DV, DBias,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_bb, s_bh, s_bm, s_bn,
    s_gb, s_gh, s_gm, s_gd,
    s_dkb, s_dkh, s_dkn, s_dkd,
    s_dvb, s_dvh, s_dvn, s_dvd,
    s_dbb, s_dbh, s_dbm, s_dbn,
    H, N_Q, N_K, HEAD_DIM, scale, qk_scale2,
    HAS_BIAS: tl.constexpr, DBIAS_MODE: tl.constexpr, Q_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dK, dV for one (k-tile, b, h), looping over the q-tiles (no atomics for dK, dV).

    Transposed orientation: ``s2T = k q^T * scale * log2e + bias^T * log2e``, ``pT = 2^(s2T - L2)``,
    ``dV += pT dO``, ``dpT = v dO^T``, ``dsT = pT * (dpT - delta)``, ``dK += dsT q``; ``dK *= scale``.
    DBIAS_MODE 1 stores ``dsT`` into DBias[b] (a per-batch bias: every element written once);
    DBIAS_MODE 2 adds it atomically into DBias[0] (a bias shared over the batch; float32, unordered);
    DBIAS_MODE 0 skips it (no bias gradient, or the deterministic dbias kernel does it).
    """
    k_tiles = tl.cdiv(N_K, BLOCK_N)
    pid_n = tl.program_id(0) % k_tiles
    pid_bh = tl.program_id(0) // k_tiles
    b = (pid_bh // H).to(tl.int64)  # 64-bit batch offsets: B*H*N*d may exceed 2^31
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N_K
    d_ok = offs_d < HEAD_DIM
    nd_mask = n_ok[:, None] & d_ok[None, :]

    k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=nd_mask, other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=nd_mask, other=0.0)
    q_base = Q + b * s_qb + h * s_qh
    do_base = DO + b * s_gb + h * s_gh
    bias_base = Bias + b * s_bb + h * s_bh
    if DBIAS_MODE == 1:
        db_base = DBias + b * s_dbb + h * s_dbh
    else:
        db_base = DBias + h * s_dbh
    row_base = pid_bh * N_Q

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for tile in range(Q_TILES):
        offs_m = tile * BLOCK_M + offs_m0
        m_ok = offs_m < N_Q
        md_mask = m_ok[:, None] & d_ok[None, :]
        valid = n_ok[:, None] & m_ok[None, :]
        qt = tl.load(q_base + offs_m[None, :] * s_qm + offs_d[:, None] * s_qd,
                     mask=m_ok[None, :] & d_ok[:, None], other=0.0)
        s = dot(k, qt, PRECISION, UPCAST) * qk_scale2
        if HAS_BIAS:
            bias = tl.load(bias_base + offs_m[None, :] * s_bm + offs_n[:, None] * s_bn, mask=valid, other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        lse2 = tl.load(L2 + row_base + offs_m, mask=m_ok, other=0.0)
        p = tl.where(valid, tl.math.exp2(s - lse2[None, :]), 0.0)
        do = tl.load(do_base + offs_m[:, None] * s_gm + offs_d[None, :] * s_gd, mask=md_mask, other=0.0)
        dv = dot_acc(p.to(do.dtype), do, dv, PRECISION, UPCAST)
        dp = dot(v, tl.trans(do), PRECISION, UPCAST)
        delta = tl.load(Delta + row_base + offs_m, mask=m_ok, other=0.0)
        ds = p * (dp - delta[None, :])
        dk = dot_acc(ds.to(qt.dtype), tl.trans(qt), dk, PRECISION, UPCAST)
        if DBIAS_MODE == 1:
            tl.store(db_base + offs_m[None, :] * s_dbm + offs_n[:, None] * s_dbn, ds, mask=valid)
        if DBIAS_MODE == 2:
            tl.atomic_add(db_base + offs_m[None, :] * s_dbm + offs_n[:, None] * s_dbn, ds, mask=valid)

    dk = dk * scale
    tl.store(DK + b * s_dkb + h * s_dkh + offs_n[:, None] * s_dkn + offs_d[None, :] * s_dkd,
             dk.to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + b * s_dvb + h * s_dvh + offs_n[:, None] * s_dvn + offs_d[None, :] * s_dvd,
             dv.to(DV.dtype.element_ty), mask=nd_mask)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, Bias, DO, L2, Delta, DQ,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_bb, s_bh, s_bm, s_bn,
    s_gb, s_gh, s_gm, s_gd,
    s_dqb, s_dqh, s_dqm, s_dqd,
    H, N_Q, N_K, HEAD_DIM, scale, qk_scale2,
    HAS_BIAS: tl.constexpr, K_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dQ for one (q-tile, b, h), looping over the k-tiles (no atomics).

    ``s2 = q k^T * scale * log2e + bias * log2e``, ``p = 2^(s2 - L2)``, ``dp = dO v^T``,
    ``ds = p * (dp - delta)``, ``dQ += ds k``; ``dQ *= scale``.
    """
    # 1-D grid (no 65535 limit on B*H): q-tiles fastest, so the k/v of one (b, h) stay hot in L2
    q_tiles = tl.cdiv(N_Q, BLOCK_M)
    pid_m = tl.program_id(0) % q_tiles
    pid_bh = tl.program_id(0) // q_tiles
    b = (pid_bh // H).to(tl.int64)  # 64-bit batch offsets: B*H*N*d may exceed 2^31
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_DIM
    md_mask = m_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=md_mask, other=0.0)
    do = tl.load(DO + b * s_gb + h * s_gh + offs_m[:, None] * s_gm + offs_d[None, :] * s_gd, mask=md_mask, other=0.0)
    lse2 = tl.load(L2 + pid_bh * N_Q + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(Delta + pid_bh * N_Q + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    bias_base = Bias + b * s_bb + h * s_bh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for tile in range(K_TILES):
        offs_n = tile * BLOCK_N + offs_n0
        n_ok = offs_n < N_K
        valid = m_ok[:, None] & n_ok[None, :]
        nd_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=nd_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=nd_mask, other=0.0)
        s = dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale2
        if HAS_BIAS:
            bias = tl.load(bias_base + offs_m[:, None] * s_bm + offs_n[None, :] * s_bn, mask=valid, other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        p = tl.where(valid, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = dot_acc(ds.to(k.dtype), k, dq, PRECISION, UPCAST)

    dq = dq * scale
    tl.store(DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqm + offs_d[None, :] * s_dqd,
             dq.to(DQ.dtype.element_ty), mask=md_mask)


@triton.jit
def _attention_bwd_dbias_kernel(
    Q, K, V, Bias, DO, L2, Delta, DBias,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_bh, s_bm, s_bn,
    s_gb, s_gh, s_gm, s_gd,
    s_dbg, s_dbh, s_dbm, s_dbn,
    B, H, N_Q, N_K, HEAD_DIM, qk_scale2, BATCH_PER_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Deterministic dbias of a bias shared over the batch, for one (q-tile, k-tile, h, group g).

    ``DBias[g, h, tile] = sum_{b in group g, in increasing order} dS[b, h, tile]`` accumulated in
    float32 registers (dS recomputed as in the dQ kernel) and stored once: no atomics, fixed order.
    The host sums the groups in a fixed order (one group unless the grid would be too small).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_hg = tl.program_id(2)
    h = pid_hg % H
    g = pid_hg // H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    n_ok = offs_n < N_K
    d_ok = offs_d < HEAD_DIM
    md_mask = m_ok[:, None] & d_ok[None, :]
    nd_mask = n_ok[:, None] & d_ok[None, :]
    valid = m_ok[:, None] & n_ok[None, :]

    bias = tl.load(Bias + h * s_bh + offs_m[:, None] * s_bm + offs_n[None, :] * s_bn, mask=valid, other=0.0)
    bias2 = bias.to(tl.float32) * 1.4426950408889634
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for i in range(BATCH_PER_GROUP):
        b = (g * BATCH_PER_GROUP + i).to(tl.int64)
        b_ok = b < B  # the last group may be short
        q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                    mask=md_mask & b_ok, other=0.0)
        do = tl.load(DO + b * s_gb + h * s_gh + offs_m[:, None] * s_gm + offs_d[None, :] * s_gd,
                     mask=md_mask & b_ok, other=0.0)
        k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
                    mask=nd_mask & b_ok, other=0.0)
        v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
                    mask=nd_mask & b_ok, other=0.0)
        row = (b * H + h) * N_Q + offs_m
        lse2 = tl.load(L2 + row, mask=m_ok & b_ok, other=0.0)
        delta = tl.load(Delta + row, mask=m_ok & b_ok, other=0.0)
        s = dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale2 + bias2
        p = tl.where(valid & b_ok, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = dot(do, tl.trans(v), PRECISION, UPCAST)
        acc += p * (dp - delta[:, None])
    tl.store(DBias + g * s_dbg + h * s_dbh + offs_m[:, None] * s_dbm + offs_n[None, :] * s_dbn, acc, mask=valid)


# ----------------------------------------------------------------------------------------------------------
# launchers


def dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def interpreter_upcast(q: torch.Tensor) -> bool:
    """bfloat16 dots on the numpy interpreter (CPU tensors) need float32 operands."""
    return q.device.type != "cuda" and q.dtype == torch.bfloat16


def _launch(block_m: int, block_n: int, block_d: int, num_warps: int, num_stages: int) -> dict:
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": num_warps,
            "num_stages": num_stages}


def _blocks(n_q: int, head_dim: int, dtype: torch.dtype, device: torch.device, backward: bool,
            capability: tuple[int, int] | None = None) -> dict:
    """Tile sizes and launch options.

    Chosen so that every kernel compiles for sm_90 without register spills (checked ahead of time
    with ``triton.compile`` for bf16/fp16/fp32 at d = 32, 64, 128; not yet timed on hardware):
    64 x 64 tiles for 2-byte inputs with d <= 64 (4 warps forward, 8 backward; 128-row q-tiles
    forward on long sequences), 64 x 32 when a k/v row is >= 256 bytes (bf16 d = 128, fp32 d = 64),
    32 x 32 for fp32 d = 128 and for IEEE fp32. Before sm_90 the backward uses 32 x 64 tiles with
    4 warps (8 warps spill there). Under the interpreter: 32 x 32, which keeps the numpy emulation
    cheap and exercises multi-tile loops at N = 50 or 64. ``capability`` overrides the device query
    (ahead-of-time compile checks without a GPU).
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":
        return _launch(32, 32, block_d, 4, 1)
    ieee = dtype == torch.float32 and dot_precision(dtype) == "ieee"
    row_bytes = block_d * (4 if dtype == torch.float32 else 2)
    if ieee or row_bytes >= 512:
        return _launch(32, 32, block_d, 4 if ieee else 8, 1)
    if row_bytes >= 256:
        return _launch(64, 32, block_d, 8, 2)
    if backward:
        major = (capability or torch.cuda.get_device_capability(device))[0]
        if major < 9:
            return _launch(32, 64, block_d, 4, 2)
        return _launch(64, 64, block_d, 8, 2)
    if n_q > 512:
        return _launch(128, 64, block_d, 8, 2)
    return _launch(64, 64, block_d, 4, 2)


def _bias_view(bias: torch.Tensor | None, B: int, H: int):
    """4-D view [Bb, Hb, Nq, Nk] of the bias and its strides expanded to [B, H, ...] (0 on broadcast)."""
    if bias is None:
        return None, (0, 0, 0, 0)
    b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    sb = b4.stride(0) if b4.shape[0] == B and B > 1 else 0
    sh = b4.stride(1) if b4.shape[1] == H and H > 1 else 0
    return b4, (sb, sh, b4.stride(2), b4.stride(3))


@launches_on_input_device
def attention_forward(q, k, v, bias, scale: float):
    """Launch the forward kernel. Returns ``(out, lse2)``: out [B, H, Nq, d] viewed over a
    [B, Nq, H, d]-contiguous buffer; lse2 [B, H, Nq] float32, base-2 log-sum-exp of the scaled scores."""
    B, H, n_q, d = q.shape
    n_k = k.shape[2]
    out = heads_last_empty(q)
    lse2 = _buffers.empty((B, H, n_q), torch.float32, q.device)
    b4, sbias = _bias_view(bias, B, H)
    cfg = _blocks(n_q, d, q.dtype, q.device, backward=False)
    grid = (triton.cdiv(n_q, cfg["BLOCK_M"]) * B * H,)
    _attention_fwd_kernel[grid](
        q, k, v, b4 if b4 is not None else q, out, lse2,
        *q.stride(), *k.stride(), *v.stride(), *sbias, *out.stride(),
        H, n_q, n_k, d, scale * LOG2E,
        HAS_BIAS=bias is not None, K_TILES=triton.cdiv(n_k, cfg["BLOCK_N"]),
        PRECISION=dot_precision(q.dtype), UPCAST=interpreter_upcast(q), **cfg,
    )
    return out, lse2


def _dbias_groups(n_tiles: int, B: int, device: torch.device) -> int:
    """Batch groups of the deterministic dbias kernel: enough programs to fill the GPU (fixed per shape
    and device, so results stay bitwise reproducible)."""
    if device.type != "cuda":
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(B, math.ceil(target / max(1, n_tiles))))


@launches_on_input_device
def attention_backward(grad_out, q, k, v, bias, out, lse2, scale: float, need_dbias: bool, deterministic: bool):
    """Launch the backward kernels. Returns ``(dq, dk, dv, dbias)`` (dbias None unless ``need_dbias``),
    dbias in the bias's shape and dtype."""
    B, H, n_q, d = q.shape
    n_k = k.shape[2]
    cfg = _blocks(n_q, d, q.dtype, q.device, backward=True)
    prec = dot_precision(q.dtype)
    upcast = interpreter_upcast(q)
    b4, sbias = _bias_view(bias, B, H)
    bias_arg = b4 if b4 is not None else q
    has_bias = bias is not None

    delta = _buffers.empty((B, H, n_q), torch.float32, q.device)
    _attention_bwd_preprocess_kernel[(triton.cdiv(n_q, cfg["BLOCK_M"]) * B * H,)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, n_q, d,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"],
    )

    dq = _buffers.empty_like(q)
    dk = _buffers.empty_like(k)
    dv = _buffers.empty_like(v)

    # dbias buffer (float32) per mode
    dbias_mode = 0
    per_batch = need_dbias and b4.shape[0] == B
    dbuf = None
    if need_dbias and per_batch:
        dbias_mode = 1
        dbuf = _buffers.empty((B, H, n_q, n_k), torch.float32, q.device)
    elif need_dbias and not deterministic:
        dbias_mode = 2
        dbuf = _buffers.zeros((1, H, n_q, n_k), torch.float32, q.device)  # float32 atomics add into it
    db_arg = dbuf if dbuf is not None else delta
    db_strides = dbuf.stride() if dbuf is not None else (0, 0, 0, 0)

    _attention_bwd_dkdv_kernel[(triton.cdiv(n_k, cfg["BLOCK_N"]) * B * H,)](
        q, k, v, bias_arg, grad_out, lse2, delta, dk, dv, db_arg,
        *q.stride(), *k.stride(), *v.stride(), *sbias, *grad_out.stride(),
        *dk.stride(), *dv.stride(), *db_strides,
        H, n_q, n_k, d, scale, scale * LOG2E,
        HAS_BIAS=has_bias, DBIAS_MODE=dbias_mode, Q_TILES=triton.cdiv(n_q, cfg["BLOCK_M"]),
        PRECISION=prec, UPCAST=upcast, **cfg,
    )
    _attention_bwd_dq_kernel[(triton.cdiv(n_q, cfg["BLOCK_M"]) * B * H,)](
        q, k, v, bias_arg, grad_out, lse2, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *sbias, *grad_out.stride(), *dq.stride(),
        H, n_q, n_k, d, scale, scale * LOG2E,
        HAS_BIAS=has_bias, K_TILES=triton.cdiv(n_k, cfg["BLOCK_N"]), PRECISION=prec, UPCAST=upcast, **cfg,
    )

    if need_dbias and dbias_mode == 0:
        tiles = triton.cdiv(n_q, cfg["BLOCK_M"]) * triton.cdiv(n_k, cfg["BLOCK_N"]) * H
        groups = _dbias_groups(tiles, B, q.device)
        per_group = math.ceil(B / groups)
        groups = math.ceil(B / per_group)
        dbuf = _buffers.empty((groups, H, n_q, n_k), torch.float32, q.device)
        _attention_bwd_dbias_kernel[(triton.cdiv(n_q, cfg["BLOCK_M"]), triton.cdiv(n_k, cfg["BLOCK_N"]), H * groups)](
            q, k, v, bias_arg, grad_out, lse2, delta, dbuf,
            *q.stride(), *k.stride(), *v.stride(), *sbias[1:], *grad_out.stride(), *dbuf.stride(),
            B, H, n_q, n_k, d, scale * LOG2E,
            BATCH_PER_GROUP=per_group, PRECISION=prec, UPCAST=upcast, **cfg,
        )
        if groups > 1:
            dbuf = dbuf.sum(0, keepdim=True)  # fixed-order reduction over a handful of groups

    dbias = None
    if need_dbias:
        if b4.shape[1] == 1 and H > 1:
            dbuf = dbuf.sum(1, keepdim=True)
        if b4.shape[0] == 1 and dbuf.shape[0] > 1:
            dbuf = dbuf.sum(0, keepdim=True)
        dbias = dbuf.reshape(bias.shape).to(bias.dtype)
    return dq, dk, dv, dbias
