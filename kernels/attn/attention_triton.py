"""Triton kernels of attention with an additive bias: FlashAttention-2 style forward and backward.

Notation (one batch element b and head h): ``S = scale * Q K^T + bias``, ``P = softmax(S)`` row-wise,
``O = P V``, ``L = logsumexp(S)`` per row. Work is done in base 2: ``S2 = S * log2(e)``,
``L2 = L * log2(e)``, ``P = exp2(S2 - L2)``. Backward, with ``dO`` the incoming gradient:

    delta_i = sum_c dO_ic O_ic                      (= sum_j P_ij dP_ij)
    dP = dO V^T,   dS = P * (dP - delta[:, None])   (gradient w.r.t. S, hence w.r.t. bias)
    dV = P^T dO,   dQ = scale * dS K,   dK = scale * dS^T Q,   dbias = sum over broadcast dims of dS

Kernels (three launches per training step, plus one elementwise bias preparation when the bias is shared):

* ``_attention_fwd_kernel`` (O and L2), one program per (q-tile, b, h). The score of a tile is one FFMA per
  element, ``S2 = (Q K^T) * scale log2e + bias2``, with ``bias2 = bias * log2e`` prepared once per call when
  the bias is shared over the batch (:func:`prepare_bias`: in bf16 for bf16 inputs, else float32; read B times
  from L2 by the kernels); a float32 q is pre-scaled by ``scale log2e`` in registers instead (exact to one
  rounding; a 16-bit q is not, since rounding ``q * scale`` to 16 bits would add an error to every score). For
  2-byte inputs at d = 64 (:func:`peel_tiles`) the key tiles are peeled: ``N_K // BLOCK_N`` full tiles without
  column masks, then one masked tail tile (N=197 at BLOCK_N=64: three unmasked tiles and one tail); elsewhere
  every tile is masked, because the peeled kernels spill there (fp32, d = 32 and d = 128 on sm_80).
  ``forward_configs`` adds 128-row q-tiles with 8 warps as an autotune candidate (half the K/V re-reads).
* ``_attention_bwd_dq_kernel`` (dQ and delta), one program per (q-tile, b, h), runs first: it computes
  ``delta = rowsum(dO * O)`` for its rows (no pre-pass kernel), stores it for the dK/dV kernel, and
  accumulates dQ over the key tiles (peeled like the forward, under the same rule).
* ``_attention_bwd_dkdv_kernel`` (dK, dV, dbias), one program per (k-tile, h, group of ``GROUP`` batch
  elements), looping over its batch elements in increasing order and, for each, over the q-tiles. For a bias
  shared over the batch the program owns the dbias column band ``[all q rows, its k-tile]`` of its group's
  partial, so the band is summed over the group without atomics in a fixed order: in registers when the q
  rows fit one tile (N <= BLOCK_M, e.g. DINO's N=37/50), else by plain loads and stores of the program's own
  partial (the load and the store share one block pointer, hence one layout, so the thread that stores an
  element is the one that re-reads it for the next batch element: a same-thread read-after-write). The
  partials of the ``G`` groups are summed by one ``torch.sum`` over a [G, H, N, N] float32 buffer, or written
  in place when one group covers the batch. dbias is therefore deterministic by construction, in every mode.
  A per-batch bias ([B,H,N,N]) gets ``dS`` stored directly (``GROUP = 1``). With the band in memory the
  kernel's q-tile is 32 wide (:func:`dkdv_blocks`; at 64 it spills), which also pads N=197 to 224, not 256.

Cost model (per (b, h), ``Np_q``/``Np_k`` = N padded to the q/k tiles, ``e`` = bytes per element):

* forward: 2 tile GEMMs (``Q K^T``, ``P V``): ``4 Np_q Np_k d`` FLOPs issued (``4 N^2 d`` useful); HBM
  bytes ``4 N d e`` (q, k, v read, o written) + ``4 N`` (L2) + the bias once per step; K/V re-read from L2
  ``ceil(N / BLOCK_M)`` times, the bias tile once per (b, h); 1 launch (+1 bias preparation).
* backward: 7 tile GEMMs -- dQ kernel 3 (``Q K^T``, ``dO V^T``, ``dS K``), dK/dV kernel 4 (``K Q^T``,
  ``V dO^T``, ``P^T dO``, ``dS^T Q``) -- so ``14 Np_q Np_k d`` FLOPs issued, each kernel over its own padding
  (ViT-B: dQ 256 x 256, dK/dV 224 x 256 with its 32-wide q-tile) (FlashAttention-2's single kernel
  does 5 with float32 atomics on dQ; here S and dP are recomputed once more so that nothing is atomic). HBM
  bytes ``9 N d e`` (q, k, v, o, dO read; dq, dk, dv written) + ``8 N`` (L2 read, delta written and read) +
  dbias ``4 G H N^2`` float32 partials written and read once by the group sum; 2 launches (+1 bias
  preparation, +1 group sum when G > 1, +1 cast of dbias to the bias's dtype when it is not float32).
  ``bench/targets.py`` gives the floors at the ViT-B shape.

All matmuls accumulate in float32; P and dS are rounded to the input dtype before their dots (as in
FlashAttention). Rows/columns past the sequence end are masked, so any N works (197, 50, 13, 1), and
the head dim is padded to a power of two >= 16 by masked loads (``HEAD_DIM`` is a constexpr, so the mask
folds away when d is a power of two). No kernel uses atomics.

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
def _q_tile_program(N_Q, H, BLOCK_M: tl.constexpr):
    """``(q-tile, b * H + h, b as int64, h)`` of this program on the 1-D grid (no 65535 limit on B*H), q-tiles
    fastest so that the k/v of one (b, h) stay hot in L2; b is 64-bit because B*H*N*d may exceed 2^31."""
    q_tiles = tl.cdiv(N_Q, BLOCK_M)
    pid_m = tl.program_id(0) % q_tiles
    pid_bh = tl.program_id(0) // q_tiles
    return pid_m, pid_bh, (pid_bh // H).to(tl.int64), pid_bh % H


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
def _scores(qk, bias_ptrs, bias_mask, qk_scale2, HAS_BIAS: tl.constexpr, BIAS_LOG2: tl.constexpr,
            PRESCALED: tl.constexpr):
    """Base-2 scores of a tile from the raw ``q k^T`` (or ``k q^T``): ``qk * scale log2e + bias2``, one FFMA
    per element when the bias is prepared (``BIAS_LOG2``: already times log2e) or q is pre-scaled."""
    if PRESCALED:
        s = qk
    else:
        s = qk * qk_scale2
    if HAS_BIAS:
        bias = tl.load(bias_ptrs, mask=bias_mask, other=0.0).to(tl.float32)
        if BIAS_LOG2:
            s = s + bias
        else:
            s = s + bias * 1.4426950408889634
    return s


@triton.jit
def _fwd_tile(q, acc, m_i, l_i, k_base, v_base, bias_base, offs_m, m_ok, cols, offs_d, d_ok,
              s_kn, s_kd, s_vn, s_vd, s_bm, s_bn, N_K, qk_scale2,
              HAS_BIAS: tl.constexpr, BIAS_LOG2: tl.constexpr, PRESCALED: tl.constexpr, MASK_N: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step over the key tile ``cols``; column masks only when ``MASK_N`` (the tail)."""
    if MASK_N:
        n_ok = cols < N_K
        kt = tl.load(k_base + cols[None, :] * s_kn + offs_d[:, None] * s_kd, mask=n_ok[None, :] & d_ok[:, None],
                     other=0.0)
        v = tl.load(v_base + cols[:, None] * s_vn + offs_d[None, :] * s_vd, mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        bias_mask = m_ok[:, None] & n_ok[None, :]
    else:
        kt = tl.load(k_base + cols[None, :] * s_kn + offs_d[:, None] * s_kd, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * s_vn + offs_d[None, :] * s_vd, mask=d_ok[None, :], other=0.0)
        bias_mask = m_ok[:, None]
    s = _scores(dot(q, kt, PRECISION, UPCAST), bias_base + offs_m[:, None] * s_bm + cols[None, :] * s_bn,
                bias_mask, qk_scale2, HAS_BIAS, BIAS_LOG2, PRESCALED)
    if MASK_N:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row whose bias is -inf so far
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = dot_acc(p.to(v.dtype), v, acc, PRECISION, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Bias, O, L2,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_bb, s_bh, s_bm, s_bn,
    s_ob, s_oh, s_om, s_od,
    H, N_Q, N_K, qk_scale2,
    HAS_BIAS: tl.constexpr, BIAS_LOG2: tl.constexpr, PRESCALE_Q: tl.constexpr, PEEL: tl.constexpr,
    FULL_TILES: tl.constexpr, HAS_TAIL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Forward over one (q-tile, b, h): online softmax over the k-tiles.

    For each k-tile: ``s2 = (q k^T) * scale * log2e + bias * log2e`` (padding columns -> -inf, tail tile
    only), ``m_new = max(m, rowmax(s2))``, ``acc = acc * 2^(m - m_new) + 2^(s2 - m_new) v``,
    ``l = l * 2^(m - m_new) + rowsum(2^(s2 - m_new))``. Finally ``O = acc / l`` and
    ``L2 = m + log2(l)`` (float32, base 2), saved for the backward.
    """
    pid_m, pid_bh, b, h = _q_tile_program(N_Q, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_DIM

    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if PRESCALE_Q:  # float32 q: fold scale * log2e into q once (one rounding) instead of into every score
        q = q * qk_scale2
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    bias_base = Bias + b * s_bb + h * s_bh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for tile in range(FULL_TILES):  # PEEL: N_K // BLOCK_N unmasked tiles (+ the tail below); else all, masked
        acc, m_i, l_i = _fwd_tile(q, acc, m_i, l_i, k_base, v_base, bias_base, offs_m, m_ok, tile * BLOCK_N + offs_n,
                                  offs_d, d_ok, s_kn, s_kd, s_vn, s_vd, s_bm, s_bn, N_K, qk_scale2,
                                  HAS_BIAS, BIAS_LOG2, PRESCALE_Q, not PEEL, PRECISION, UPCAST)
    if PEEL and HAS_TAIL:
        acc, m_i, l_i = _fwd_tile(q, acc, m_i, l_i, k_base, v_base, bias_base, offs_m, m_ok,
                                  FULL_TILES * BLOCK_N + offs_n, offs_d, d_ok, s_kn, s_kd, s_vn, s_vd, s_bm, s_bn,
                                  N_K, qk_scale2, HAS_BIAS, BIAS_LOG2, PRESCALE_Q, True, PRECISION, UPCAST)

    empty = l_i == 0.0  # only when a whole row of the bias is -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_ptrs = O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(L2 + pid_bh * N_Q + offs_m, lse2, mask=m_ok)


@triton.jit
def _dq_tile(q, do, lse2, delta, dq, k_base, v_base, bias_base, offs_m, m_ok, cols, offs_d, d_ok,
             s_kn, s_kd, s_vn, s_vd, s_bm, s_bn, N_K, qk_scale2,
             HAS_BIAS: tl.constexpr, BIAS_LOG2: tl.constexpr, MASK_N: tl.constexpr,
             PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``dQ += dS K`` over the key tile ``cols`` (3 tile GEMMs); column masks only when ``MASK_N``."""
    if MASK_N:
        n_ok = cols < N_K
        nd_mask = n_ok[:, None] & d_ok[None, :]
        valid = m_ok[:, None] & n_ok[None, :]
    else:
        nd_mask = d_ok[None, :]
        valid = m_ok[:, None]
    k = tl.load(k_base + cols[:, None] * s_kn + offs_d[None, :] * s_kd, mask=nd_mask, other=0.0)
    v = tl.load(v_base + cols[:, None] * s_vn + offs_d[None, :] * s_vd, mask=nd_mask, other=0.0)
    s = _scores(dot(q, tl.trans(k), PRECISION, UPCAST), bias_base + offs_m[:, None] * s_bm + cols[None, :] * s_bn,
                valid, qk_scale2, HAS_BIAS, BIAS_LOG2, False)
    p = tl.math.exp2(s - lse2[:, None])
    if MASK_N:
        p = tl.where(valid, p, 0.0)
    dp = dot(do, tl.trans(v), PRECISION, UPCAST)
    ds = p * (dp - delta[:, None])
    return dot_acc(ds.to(k.dtype), k, dq, PRECISION, UPCAST)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, Bias, O, DO, L2, Delta, DQ,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_bb, s_bh, s_bm, s_bn,
    s_ob, s_oh, s_om, s_od,
    s_gb, s_gh, s_gm, s_gd,
    s_dqb, s_dqh, s_dqm, s_dqd,
    H, N_Q, N_K, scale, qk_scale2,
    HAS_BIAS: tl.constexpr, BIAS_LOG2: tl.constexpr, PEEL: tl.constexpr, FULL_TILES: tl.constexpr,
    HAS_TAIL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dQ and delta for one (q-tile, b, h), looping over the k-tiles (no atomics).

    ``delta = rowsum(dO * O)`` (float32, stored for the dK/dV kernel, which runs after this one),
    ``s2 = q k^T * scale * log2e + bias * log2e``, ``p = 2^(s2 - L2)``, ``dp = dO v^T``,
    ``ds = p * (dp - delta)``, ``dQ += ds k``; ``dQ *= scale``.
    """
    pid_m, pid_bh, b, h = _q_tile_program(N_Q, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_DIM
    md_mask = m_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=md_mask, other=0.0)
    do = tl.load(DO + b * s_gb + h * s_gh + offs_m[:, None] * s_gm + offs_d[None, :] * s_gd, mask=md_mask, other=0.0)
    o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od, mask=md_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh * N_Q + offs_m, delta, mask=m_ok)
    lse2 = tl.load(L2 + pid_bh * N_Q + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    bias_base = Bias + b * s_bb + h * s_bh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for tile in range(FULL_TILES):  # PEEL: N_K // BLOCK_N unmasked tiles (+ the tail below); else all, masked
        dq = _dq_tile(q, do, lse2, delta, dq, k_base, v_base, bias_base, offs_m, m_ok, tile * BLOCK_N + offs_n,
                      offs_d, d_ok, s_kn, s_kd, s_vn, s_vd, s_bm, s_bn, N_K, qk_scale2,
                      HAS_BIAS, BIAS_LOG2, not PEEL, PRECISION, UPCAST)
    if PEEL and HAS_TAIL:
        dq = _dq_tile(q, do, lse2, delta, dq, k_base, v_base, bias_base, offs_m, m_ok,
                      FULL_TILES * BLOCK_N + offs_n, offs_d, d_ok, s_kn, s_kd, s_vn, s_vd, s_bm, s_bn, N_K,
                      qk_scale2, HAS_BIAS, BIAS_LOG2, True, PRECISION, UPCAST)

    dq = dq * scale
    tl.store(DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqm + offs_d[None, :] * s_dqd,
             dq.to(DQ.dtype.element_ty), mask=md_mask)


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
    B, H, N_Q, N_K, scale, qk_scale2,
    HAS_BIAS: tl.constexpr, BIAS_LOG2: tl.constexpr, DBIAS_MODE: tl.constexpr, GROUP: tl.constexpr,
    Q_TILES: tl.constexpr, ONE_Q_TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dK, dV (and dbias) for one (k-tile, h, batch group g): batch elements ``g*GROUP ...`` in order, each
    looping over the q-tiles (no atomics anywhere).

    Transposed orientation: ``s2T = k q^T * scale * log2e + bias^T * log2e``, ``pT = 2^(s2T - L2)``,
    ``dV += pT dO``, ``dpT = v dO^T``, ``dsT = pT * (dpT - delta)``, ``dK += dsT q``; ``dK *= scale``.
    DBIAS_MODE 1 stores ``dsT`` into DBias[b] (a per-batch bias; GROUP = 1). DBIAS_MODE 2 sums ``dsT`` over the
    group into DBias[g] (a bias shared over the batch): in a register tile when ``ONE_Q_TILE`` (N_Q <= BLOCK_M),
    else by read-add-write of the program's own column band (the first batch element of the group writes it).
    A short last group re-reads batch element B - 1 for its missing elements and stores nothing for them.
    DBIAS_MODE 0: no bias gradient.
    """
    k_tiles = tl.cdiv(N_K, BLOCK_N)
    pid_n = tl.program_id(0) % k_tiles
    pid_hg = tl.program_id(0) // k_tiles
    h = pid_hg % H
    g = pid_hg // H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N_K
    d_ok = offs_d < HEAD_DIM
    nd_mask = n_ok[:, None] & d_ok[None, :]
    db_base = DBias + g.to(tl.int64) * s_dbb + h * s_dbh
    db_acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # DBIAS_MODE 2 with one q-tile: the band in registers

    for i in range(GROUP):
        b_ok = g * GROUP + i < B  # the last group may be short: its missing elements re-read b = B - 1, unstored
        b = tl.minimum(g * GROUP + i, B - 1).to(tl.int64)  # 64-bit batch offsets: B*H*N*d may exceed 2^31
        k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=nd_mask,
                    other=0.0)
        v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=nd_mask,
                    other=0.0)
        # block pointers for the [keys x queries] and [queries x d] tiles: scalar state, so no per-element
        # 64-bit address tiles stay live across the loops (they cost ~32 registers per tile per thread)
        q_blk = tl.make_block_ptr(Q + b * s_qb + h * s_qh, (HEAD_DIM, N_Q), (s_qd, s_qm), (0, 0),
                                  (BLOCK_D, BLOCK_M), (0, 1))
        do_blk = tl.make_block_ptr(DO + b * s_gb + h * s_gh, (N_Q, HEAD_DIM), (s_gm, s_gd), (0, 0),
                                   (BLOCK_M, BLOCK_D), (1, 0))
        bias_blk = tl.make_block_ptr(Bias + b * s_bb + h * s_bh, (N_K, N_Q), (s_bn, s_bm), (pid_n * BLOCK_N, 0),
                                     (BLOCK_N, BLOCK_M), (0, 1))
        if DBIAS_MODE == 1:
            db_blk = tl.make_block_ptr(DBias + b * s_dbb + h * s_dbh, (N_K, N_Q), (s_dbn, s_dbm),
                                       (pid_n * BLOCK_N, 0), (BLOCK_N, BLOCK_M), (0, 1))
        else:
            db_blk = tl.make_block_ptr(db_base, (N_K, N_Q), (s_dbn, s_dbm), (pid_n * BLOCK_N, 0),
                                       (BLOCK_N, BLOCK_M), (0, 1))
        row_base = (b * H + h) * N_Q
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for tile in range(Q_TILES):
            offs_m = tile * BLOCK_M + offs_m0
            m_ok = offs_m < N_Q
            valid = n_ok[:, None] & m_ok[None, :]
            qt = tl.load(q_blk, boundary_check=(0, 1), padding_option="zero")
            s = dot(k, qt, PRECISION, UPCAST) * qk_scale2
            if HAS_BIAS:
                bias = tl.load(bias_blk, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
                if BIAS_LOG2:
                    s = s + bias
                else:
                    s = s + bias * 1.4426950408889634
            lse2 = tl.load(L2 + row_base + offs_m, mask=m_ok, other=0.0)
            p = tl.where(valid, tl.math.exp2(s - lse2[None, :]), 0.0)
            do = tl.load(do_blk, boundary_check=(0, 1), padding_option="zero")
            dv = dot_acc(p.to(do.dtype), do, dv, PRECISION, UPCAST)
            dp = dot(v, tl.trans(do), PRECISION, UPCAST)
            delta = tl.load(Delta + row_base + offs_m, mask=m_ok, other=0.0)
            ds = p * (dp - delta[None, :])
            dk = dot_acc(ds.to(qt.dtype), tl.trans(qt), dk, PRECISION, UPCAST)
            if DBIAS_MODE == 1:
                tl.store(db_blk, ds, boundary_check=(0, 1))  # GROUP = 1: b_ok always holds
            if DBIAS_MODE == 2:
                if ONE_Q_TILE:
                    db_acc = tl.where(b_ok, db_acc + ds, db_acc)
                else:  # this program's own band of DBias[g]: plain read-add-write, fixed batch order
                    upd = ds
                    if i > 0:
                        upd = ds + tl.load(db_blk, boundary_check=(0, 1), padding_option="zero")
                    if b_ok:
                        tl.store(db_blk, upd, boundary_check=(0, 1))
            q_blk = tl.advance(q_blk, (0, BLOCK_M))
            do_blk = tl.advance(do_blk, (BLOCK_M, 0))
            bias_blk = tl.advance(bias_blk, (0, BLOCK_M))
            db_blk = tl.advance(db_blk, (0, BLOCK_M))
        dk = dk * scale
        tl.store(DK + b * s_dkb + h * s_dkh + offs_n[:, None] * s_dkn + offs_d[None, :] * s_dkd,
                 dk.to(DK.dtype.element_ty), mask=nd_mask & b_ok)
        tl.store(DV + b * s_dvb + h * s_dvh + offs_n[:, None] * s_dvn + offs_d[None, :] * s_dvd,
                 dv.to(DV.dtype.element_ty), mask=nd_mask & b_ok)

    if DBIAS_MODE == 2:
        if ONE_Q_TILE:
            tl.store(db_base + offs_m0[None, :] * s_dbm + offs_n[:, None] * s_dbn, db_acc,
                     mask=n_ok[:, None] & (offs_m0 < N_Q)[None, :])


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
    forward on long sequences, and an autotune candidate otherwise, :func:`forward_configs`), 64 x 32 when a
    k/v row is >= 256 bytes (bf16 d = 128, fp32 d = 64), 32 x 32 for fp32 d = 128 and for IEEE fp32 (8 warps
    backward: the batch-grouped dK/dV kernel spills 40-256 B with 4). Before sm_90 the backward uses 32 x 64
    tiles with 8 warps (the grouped dK/dV kernel spills 136 B with 4). Under the interpreter: 32 x 32, which
    keeps the numpy emulation cheap and exercises multi-tile loops at N = 50 or 64. ``capability`` overrides the device query
    (ahead-of-time compile checks without a GPU).
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":
        return _launch(32, 32, block_d, 4, 1)
    ieee = dtype == torch.float32 and dot_precision(dtype) == "ieee"
    row_bytes = block_d * (4 if dtype == torch.float32 else 2)
    if ieee or row_bytes >= 512:
        return _launch(32, 32, block_d, 4 if (ieee and not backward) else 8, 1)
    if row_bytes >= 256:
        return _launch(64, 32, block_d, 8, 2)
    if backward:
        major = (capability or torch.cuda.get_device_capability(device))[0]
        if major < 9:
            return _launch(32, 64, block_d, 8, 2)
        return _launch(64, 64, block_d, 8, 2)
    if n_q > 512:
        return _launch(128, 64, block_d, 8, 2)
    return _launch(64, 64, block_d, 4, 2)


def forward_configs(n_q: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                    capability: tuple[int, int] | None = None) -> list[dict]:
    """The forward's launch candidates: :func:`_blocks`'s choice first, plus 128-row q-tiles with 8 warps
    (half the K/V re-reads) for 2-byte inputs with d <= 64 on a GPU. With more than one candidate the CUDA
    launcher autotunes between them (keyed on the shape); all share BLOCK_N, so the peeled tile counts hold."""
    first = _blocks(n_q, head_dim, dtype, device, backward=False, capability=capability)
    out = [first]
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and first["BLOCK_N"] == 64:
        wide = _launch(128, 64, first["BLOCK_D"], 8, 2)
        if wide != first and first["BLOCK_D"] <= 64:
            out.append(wide)
    return out


def peel_tiles(dtype: torch.dtype, block_d: int) -> bool:
    """Peel the key loop (unmasked full tiles + one masked tail) in the forward and dQ kernels? For 2-byte inputs
    at d = 64 (BLOCK_D = 64: ViT-B/S, DINO): there it compiles spill-free for sm_90 and sm_80. Elsewhere every
    tile stays masked: peeled, the sm_80 d = 128 and float32 (IEEE, TF32) kernels and d = 32 spill 4-1900 B
    (``python -m bench.static_gpu_check --ops attention``)."""
    return dtype in (torch.float16, torch.bfloat16) and block_d == 64


def full_tiles(n_k: int, block_n: int, peel: bool) -> int:
    """The key-tile loop's trip count: the full tiles when peeled (the tail follows), else every tile."""
    return n_k // block_n if peel else triton.cdiv(n_k, block_n)


def dkdv_blocks(cfg: dict, n_q: int, shared_dbias: bool, device: torch.device,
                capability: tuple[int, int] | None = None) -> dict:
    """The dK/dV kernel's tiles: the backward's, except that with a dbias summed over batch groups across
    several q-tiles (the read-add-write band) the q-tile is 32 wide (and on sm_80 the key tile too): 64-wide,
    that kernel spills 12-576 B with a float32 bias (fp16/fp32 inputs) on sm_90 and 136-208 B on sm_80."""
    if device.type != "cuda" or not shared_dbias or n_q <= cfg["BLOCK_M"]:
        return cfg
    major = (capability or torch.cuda.get_device_capability(device))[0]
    return dict(cfg, BLOCK_M=32, BLOCK_N=32 if major < 9 else cfg["BLOCK_N"])


def _batch_groups(programs_per_group: int, B: int, device: torch.device, sms: int | None = None) -> int:
    """Batch groups of the dK/dV kernel for a bias shared over the batch: enough programs to fill the GPU
    (about 4 per SM), each summing dbias over ``ceil(B / groups)`` batch elements. Fixed per shape and device,
    so results stay bitwise reproducible. ``sms`` overrides the device query (ahead-of-time checks)."""
    if device.type != "cuda" and sms is None:
        return 1
    sms = sms or torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(B, math.ceil(4 * sms / max(1, programs_per_group))))


def prepare_bias(bias: torch.Tensor | None, q: torch.Tensor):
    """``(bias4, strides, log2_scaled)``: the bias as a 4-D view [Bb, Hb, Nq, Nk] with strides expanded to
    [B, H, ...] (0 on a broadcast dim). A bias shared over a batch of B > 1 is prepared once per call as
    ``bias * log2(e)`` (bf16 for bf16 inputs, else float32; contiguous), so the kernels add it with no multiply;
    ``log2_scaled`` says which form the kernels get."""
    if bias is None:
        return None, (0, 0, 0, 0), False
    B, H = q.shape[:2]
    b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    scaled = b4.shape[0] == 1 and B > 1
    if scaled:
        wide = torch.float64 if b4.dtype == torch.float64 else torch.float32
        b4 = (b4.to(wide) * LOG2E).to(torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32)
        b4 = b4.contiguous()
    sb = b4.stride(0) if b4.shape[0] == B and B > 1 else 0
    sh = b4.stride(1) if b4.shape[1] == H and H > 1 else 0
    return b4, (sb, sh, b4.stride(2), b4.stride(3)), scaled


_FWD_TUNED: dict = {}
AUTOTUNE_BENCH = None  # triton.autotune's ``do_bench`` (None: Triton's GPU timer); the tests time the interpreter


def _forward_kernel(configs: list[dict]):
    """The forward kernel to launch: plain with one candidate, else a ``triton.autotune`` over the candidates
    (one wrapper per candidate list, cached)."""
    if len(configs) == 1:
        return _attention_fwd_kernel, configs[0]
    key = tuple(tuple(sorted(c.items())) for c in configs)
    if key not in _FWD_TUNED:
        tune = [triton.Config({n: c[n] for n in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}, num_warps=c["num_warps"],
                              num_stages=c["num_stages"]) for c in configs]
        _FWD_TUNED[key] = triton.autotune(tune, key=["H", "N_Q", "N_K"], do_bench=AUTOTUNE_BENCH)(_attention_fwd_kernel)
    return _FWD_TUNED[key], {}


@launches_on_input_device
def attention_forward(q, k, v, bias, scale: float):
    """Launch the forward kernel. Returns ``(out, lse2)``: out [B, H, Nq, d] viewed over a
    [B, Nq, H, d]-contiguous buffer; lse2 [B, H, Nq] float32, base-2 log-sum-exp of the scaled scores."""
    B, H, n_q, d = q.shape
    n_k = k.shape[2]
    out = heads_last_empty(q)
    lse2 = _buffers.empty((B, H, n_q), torch.float32, q.device)
    b4, sbias, bias_log2 = prepare_bias(bias, q)
    configs = forward_configs(n_q, d, q.dtype, q.device)
    kernel, launch = _forward_kernel(configs)
    block_n = configs[0]["BLOCK_N"]
    peel = peel_tiles(q.dtype, configs[0]["BLOCK_D"])
    kernel[lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]) * B * H,)](
        q, k, v, b4 if b4 is not None else q, out, lse2,
        *q.stride(), *k.stride(), *v.stride(), *sbias, *out.stride(),
        H, n_q, n_k, scale * LOG2E,
        HAS_BIAS=bias is not None, BIAS_LOG2=bias_log2, PRESCALE_Q=q.dtype == torch.float32, PEEL=peel,
        FULL_TILES=full_tiles(n_k, block_n, peel),
        HAS_TAIL=n_k % block_n != 0, HEAD_DIM=d,
        PRECISION=dot_precision(q.dtype), UPCAST=interpreter_upcast(q), **launch,
    )
    return out, lse2


@launches_on_input_device
def attention_backward(grad_out, q, k, v, bias, out, lse2, scale: float, need_dbias: bool,
                       deterministic: bool = True):
    """Launch the backward kernels. Returns ``(dq, dk, dv, dbias)`` (dbias None unless ``need_dbias``),
    dbias in the bias's shape and dtype. Every output is deterministic; ``deterministic`` is accepted for
    API compatibility and changes nothing (there is no atomic mode any more)."""
    B, H, n_q, d = q.shape
    n_k = k.shape[2]
    cfg = _blocks(n_q, d, q.dtype, q.device, backward=True)
    prec, upcast = dot_precision(q.dtype), interpreter_upcast(q)
    b4, sbias, bias_log2 = prepare_bias(bias, q)
    bias_arg = b4 if b4 is not None else q
    has_bias = bias is not None

    delta = _buffers.empty((B, H, n_q), torch.float32, q.device)
    dq = _buffers.empty_like(q)
    dk = _buffers.empty_like(k)
    dv = _buffers.empty_like(v)
    peel = peel_tiles(q.dtype, cfg["BLOCK_D"])
    _attention_bwd_dq_kernel[(triton.cdiv(n_q, cfg["BLOCK_M"]) * B * H,)](
        q, k, v, bias_arg, out, grad_out, lse2, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *sbias, *out.stride(), *grad_out.stride(), *dq.stride(),
        H, n_q, n_k, scale, scale * LOG2E,
        HAS_BIAS=has_bias, BIAS_LOG2=bias_log2, PEEL=peel, FULL_TILES=full_tiles(n_k, cfg["BLOCK_N"], peel),
        HAS_TAIL=n_k % cfg["BLOCK_N"] != 0, HEAD_DIM=d, PRECISION=prec, UPCAST=upcast, **cfg,
    )

    per_batch = need_dbias and b4.shape[0] == B  # B == 1: any bias is per-batch (dS stored directly)
    mode = 0 if not need_dbias else (1 if per_batch else 2)
    kcfg = dkdv_blocks(cfg, n_q, mode == 2, q.device)
    k_tiles = triton.cdiv(n_k, kcfg["BLOCK_N"])
    per_group, groups, dbuf = 1, B, None
    if mode == 2:
        groups = _batch_groups(k_tiles * H, B, q.device)
        per_group = math.ceil(B / groups)
        groups = math.ceil(B / per_group)
        dbuf = _buffers.empty((groups, H, n_q, n_k), torch.float32, q.device)
    elif mode == 1:
        dbuf = _buffers.empty((B, H, n_q, n_k), torch.float32, q.device)
    _attention_bwd_dkdv_kernel[(k_tiles * H * groups,)](
        q, k, v, bias_arg, grad_out, lse2, delta, dk, dv, dbuf if dbuf is not None else delta,
        *q.stride(), *k.stride(), *v.stride(), *sbias, *grad_out.stride(), *dk.stride(), *dv.stride(),
        *(dbuf.stride() if dbuf is not None else (0, 0, 0, 0)),
        B, H, n_q, n_k, scale, scale * LOG2E,
        HAS_BIAS=has_bias, BIAS_LOG2=bias_log2, DBIAS_MODE=mode, GROUP=per_group,
        Q_TILES=triton.cdiv(n_q, kcfg["BLOCK_M"]), ONE_Q_TILE=n_q <= kcfg["BLOCK_M"], HEAD_DIM=d, PRECISION=prec,
        UPCAST=upcast, **kcfg,
    )

    if not need_dbias:
        return dq, dk, dv, None
    if b4.shape[0] == 1 and dbuf.shape[0] > 1:
        dbuf = dbuf.sum(0, keepdim=True)  # fixed-order sum over the batch groups
    if b4.shape[1] == 1 and H > 1:
        dbuf = dbuf.sum(1, keepdim=True)  # a bias broadcast over the heads
    return dq, dk, dv, dbuf.reshape(bias.shape).to(bias.dtype)
