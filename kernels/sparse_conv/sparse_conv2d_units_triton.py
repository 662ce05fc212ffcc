"""Triton kernels of sparse convolution tiled over whole mask units (SparK), NHWC.

Used when both activity maps are unit-structured (:func:`kernels.sparse_conv.active.unit_tiling`): every map is
the coarse unit mask ``[B, Hc, Wc]`` upsampled, ``u_in = u_out * stride`` sites per unit. The unit lists of
:meth:`~kernels.sparse_conv.active.UnitGrid.index` (built once per mask, shared by every layer and the backward)
give each tile its units: ``order`` (active units first), ``count`` (active units, read on the device: no host
sync sizes a grid) and ``bits`` (the 7 x 7 neighbour activity of each unit as an int64).

Tiles. A program owns ``BLOCK_M`` rows = ``G`` whole units (``G = BLOCK_M // S`` for ``S <= BLOCK_M`` sites per
unit) or one ``BLOCK_M`` chunk of one unit (``T = ceil(S / BLOCK_M)`` chunks). Tap validity is arithmetic on
the row's unit bits, loaded once per tile: ``(bits >> bit(dy, dx)) & 1`` (in-bounds and active neighbour, so
inactive inputs are never read: the op's contract does not promise zeros there); no activity-map load and no
branch in the inner loop, which is one flat ``tl.range`` over taps x channel blocks with static bounds
(software-pipelined, ``num_stages``). Programs whose units are all inactive write their zeros and exit: the
kernel writes every element of its output (no memset).

Kernels:

* ``_unit_conv_kernel``: ``dst[o, n] = bias[n] + sum_k sum_c src[p(o,k), c] w[k, c, n]`` (forward, src = x) or,
  TRANSPOSED, ``dx[p, n] = sum_k sum_c g[o(p,k), c] w[k, c, n]`` for one parity class ``(RH, RW)`` of the input
  sites (``(ih + ph) % sh == RH``): only the taps ``kh = RH + j*sh`` that hit the class run (stride 2, 3x3: 4, 2,
  2 and 1 taps for the four classes = 9, not 4 x 9). One launch per class (constexpr class, exact tap loop).
* ``_unit_dwconv_kernel``: depthwise, ``dst[o, c] = bias[c] + sum_k src[p(o,k), c] w[k, c]`` (and transposed).
  Triton exposes no shared-memory staging of a gathered tile, so each tap re-loads its shifted tile; a program's
  tile + halo (8x8 unit, 7x7: 14 x 14 sites x 64 channels x 2 B = 25 KiB) stays in L1 across the 49 taps, so L2
  traffic is ~one read of the tile + halo per program (the load carries ``evict_last``).
* ``_unit_wgrad_kernel`` / ``_unit_dwwgrad_kernel``: ``dW[k, ci, co] = sum_o x[p(o,k), ci] g[o, co]``; grid
  (tap x ci-block, co-block, split), each program a pipelined ``for`` loop over the active tiles
  ``pid_s, pid_s + SPLIT, ...``; partials ``[SPLIT, K, Cin, Cout]`` fp32 are uninitialised (each written once by
  one program) and reduced once; dbias partials from the ``tap 0, ci-block 0`` programs.

Cost model (bf16; A active output sites, A_in = A s^2 active input sites, kernel k x k, Cin -> Cout, the
whole output B Ho Wo written, zeros included):

* forward: FLOPs ``2 A k^2 Cin Cout`` issued on tensor cores (+ the masked halo taps of units at an inactive
  neighbour or the image edge: loads masked, MMA issued); bytes: x tile + halo per program (L2; HBM ~``A_in Cin
  2``), the weights ``k^2 Cin Cout 2`` once per row tile (L2), ``B Ho Wo Cout 2`` written; 1 launch. Split-K
  (only when a pass has fewer programs than SMs: ResNet stages 3-4) adds ``SPLIT B Ho Wo Cout 4`` written and
  read once + 2 launches (sum, cast-copy).
* dx: FLOPs ``2 A k^2 Cin Cout`` (each parity class runs only its own taps: 9 tap-GEMMs per 4 classes of a
  stride-2 3x3, not 36); bytes as the forward with g read and ``B H W Cin 2`` written; ``s^2`` launches (1 at
  stride 1).
* dW: FLOPs ``2 A k^2 Cin Cout``; bytes: the x and g tiles once per (tap x channel-block) program column (L2),
  partials ``SPLIT k^2 Cin Cout 4`` written and read once; 1 launch + 1 reduction (+ 1 for dbias).
* per layer fwd+bwd, counted from the launcher code (not profiled): ~10 launches at stride 1 (3 kernels, the dW
  and dbias reductions and casts, 2 weight packings), 3 more at stride 2 (the dx classes), against ~25 for the
  site-list path; the unit index (argsort, unfold: ~8 small launches) once per unit mask per step.

This file imports triton; it is imported lazily by the triton backend. Output buffers come from
``kernels._buffers``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels import _buffers
from kernels._backend import launches_on_input_device
from kernels._checks import acc_dtype
from kernels._triton_common import dot_acc
from kernels.sparse_conv.active import UNIT_REACH, UNIT_WINDOW
from kernels.sparse_conv.layout import out_or_empty, weight_grads_from_partials

_CENTER = UNIT_REACH * UNIT_WINDOW + UNIT_REACH  # the unit's own bit


@triton.jit
def _tile_rows(order, bits_tab, t, N_UNITS, Hc, Wc, S: tl.constexpr, CW: tl.constexpr, G: tl.constexpr,
               T: tl.constexpr, SPAN: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of tile ``t``: first unit slot ``u0``, each row's (b, cy, cx) unit, (jy, jx) place in the unit (or its
    parity class), in-range flag and the unit's neighbour bits (0 for an inactive unit)."""
    u0 = (t // T) * G
    m = tl.arange(0, BLOCK_M)
    slot = m // SPAN
    loc = (t % T) * SPAN + m % SPAN
    oi = u0 + slot
    rows_ok = (slot < G) & (loc < S) & (oi < N_UNITS)
    oi = tl.where(rows_ok, oi, 0)
    u = tl.load(order + oi, mask=rows_ok, other=0)
    bits = tl.load(bits_tab + oi, mask=rows_ok, other=0)
    hw = Hc * Wc
    return u0, u // hw, (u % hw) // Wc, u % Wc, loc // CW, loc % CW, rows_ok, bits


@triton.jit
def _tap(bits, b, cy, cx, ly, lx, kh, kw, Hc, Wc, SUH: tl.constexpr, SUW: tl.constexpr, SH: tl.constexpr,
         SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
         KH: tl.constexpr, KW: tl.constexpr, TRANSPOSED: tl.constexpr, WIN: tl.constexpr, REACH: tl.constexpr):
    """Source row read by dst rows at (ly, lx) of their unit for tap (kh, kw), and its validity (from bits).

    forward: src offset in the unit = (ly*SH - PH + kh*DH); transposed: (ly + PH - kh*DH) / SH (exact in a
    parity class). Unit offset floor(off / SUH) in -REACH..REACH selects the bit."""
    if TRANSPOSED:
        oy_off: tl.constexpr = SH * ((KH - 1) * DH // SH + 1)
        ox_off: tl.constexpr = SW * ((KW - 1) * DW // SW + 1)
        ry = (ly + PH - kh * DH + oy_off) // SH - oy_off // SH
        rx = (lx + PW - kw * DW + ox_off) // SW - ox_off // SW
    else:
        ry = ly * SH - PH + kh * DH
        rx = lx * SW - PW + kw * DW
    by = (ry + REACH * SUH) // SUH
    bx = (rx + REACH * SUW) // SUW
    bit = tl.minimum(tl.maximum(by * WIN + bx, 0), 63)
    ok = ((bits >> bit.to(tl.int64)) & 1) != 0
    q = ((b * Hc + cy) * SUH + ry) * (Wc * SUW) + cx * SUW + rx
    return tl.where(ok, q, 0), ok


@triton.jit
def _unit_conv_kernel(
    src, order, count, bits_tab, w, bias, dst, N_UNITS, Hc, Wc, KDIM: tl.constexpr, NDIM: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr, DUH: tl.constexpr, DUW: tl.constexpr, SUH: tl.constexpr,
    SUW: tl.constexpr, TRANSPOSED: tl.constexpr, CY0: tl.constexpr, CX0: tl.constexpr, CSH: tl.constexpr,
    CSW: tl.constexpr, CW: tl.constexpr, S: tl.constexpr, TH0: tl.constexpr, TW0: tl.constexpr,
    TSH: tl.constexpr, TSW: tl.constexpr, NTH: tl.constexpr, NTW: tl.constexpr, G: tl.constexpr,
    T: tl.constexpr, SPAN: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    WIN: tl.constexpr, REACH: tl.constexpr, CENTER: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Implicit GEMM over whole units: rows = the (class) sites of the tile's units, one flat loop over
    (taps of the class) x (channel blocks of KDIM). Row (jy, jx) is dst site (CY0 + CSH*jy, CX0 + CSW*jx) of
    its unit; taps kh = TH0 + TSH*j (j < NTH), kw likewise. SPLIT_K > 1 (deep layers with few tiles): program
    ``pid_k`` takes every SPLIT_K-th step of the loop and writes fp32 partials ``dst[pid_k]`` (zeros of
    inactive units included; bias in split 0), summed by the launcher."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    u0, b, cy, cx, jy, jx, rows_ok, bits = _tile_rows(order, bits_tab, pid_m, N_UNITS, Hc, Wc, S, CW, G, T,
                                                      SPAN, BLOCK_M)
    ly = CY0 + CSH * jy
    lx = CX0 + CSW * jx
    o = ((b * Hc + cy) * DUH + ly) * (Wc * DUW) + cx * DUW + lx
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < NDIM
    out_ptr = dst + o[:, None].to(tl.int64) * NDIM + offs_n[None, :]
    if SPLIT_K > 1:
        out_ptr += pid_k.to(tl.int64) * (N_UNITS * (DUH * DUW) * NDIM)
    out_mask = rows_ok[:, None] & n_ok[None, :]
    if u0 >= tl.load(count):  # every unit of the tile is inactive: its zeros, and done
        tl.store(out_ptr, tl.zeros((BLOCK_M, BLOCK_N), dtype=dst.dtype.element_ty), mask=out_mask)
        return
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC_F64 else tl.float32)
    NKB: tl.constexpr = (KDIM + BLOCK_K - 1) // BLOCK_K
    NSTEP: tl.constexpr = NTH * NTW * NKB
    for i in tl.range(0, (NSTEP + SPLIT_K - 1) // SPLIT_K, num_stages=NUM_STAGES):
        t = i * SPLIT_K + pid_k if SPLIT_K > 1 else i
        tap = t // NKB
        kb = t % NKB
        kh = TH0 + TSH * (tap // NTW)
        kw = TW0 + TSW * (tap % NTW)
        q, ok = _tap(bits, b, cy, cx, ly, lx, kh, kw, Hc, Wc, SUH, SUW, SH, SW, PH, PW, DH, DW, KH, KW,
                     TRANSPOSED, WIN, REACH)
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = (offs_k < KDIM) & (t < NSTEP) if SPLIT_K > 1 else offs_k < KDIM
        a = tl.load(src + q[:, None].to(tl.int64) * KDIM + offs_k[None, :], mask=ok[:, None] & k_ok[None, :],
                    other=0.0)
        wt = tl.load(w + ((kh * KW + kw) * KDIM + offs_k[:, None]).to(tl.int64) * NDIM + offs_n[None, :],
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = dot_acc(acc, a, wt, DOT_F32, USE_DOT)
    if HAS_BIAS:  # active rows only (a tile straddling the last active unit holds inactive rows)
        live = (((bits >> CENTER) & 1) != 0) & (pid_k == 0)
        bv = tl.load(bias + offs_n, mask=n_ok, other=0.0).to(acc.dtype)
        acc += tl.where(live[:, None], bv[None, :], 0.0)
    tl.store(out_ptr, acc.to(dst.dtype.element_ty), mask=out_mask)


@triton.jit
def _unit_dwconv_kernel(
    src, order, count, bits_tab, w, bias, dst, N_UNITS, Hc, Wc, C: tl.constexpr, KH: tl.constexpr,
    KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr,
    DW: tl.constexpr, DUH: tl.constexpr, DUW: tl.constexpr, SUH: tl.constexpr, SUW: tl.constexpr,
    TRANSPOSED: tl.constexpr, CY0: tl.constexpr, CX0: tl.constexpr, CSH: tl.constexpr, CSW: tl.constexpr,
    CW: tl.constexpr, S: tl.constexpr, TH0: tl.constexpr, TW0: tl.constexpr, TSH: tl.constexpr,
    TSW: tl.constexpr, NTH: tl.constexpr,
    NTW: tl.constexpr, G: tl.constexpr, T: tl.constexpr, SPAN: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC_F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr,
    WIN: tl.constexpr, REACH: tl.constexpr, CENTER: tl.constexpr,
):
    """Depthwise over whole units: dst[o, c] = bias[c] + sum_k src[p(o,k), c] w[k, c] (transposed: dx)."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    u0, b, cy, cx, jy, jx, rows_ok, bits = _tile_rows(order, bits_tab, pid_m, N_UNITS, Hc, Wc, S, CW, G, T,
                                                      SPAN, BLOCK_M)
    ly = CY0 + CSH * jy
    lx = CX0 + CSW * jx
    o = ((b * Hc + cy) * DUH + ly) * (Wc * DUW) + cx * DUW + lx
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    out_ptr = dst + o[:, None].to(tl.int64) * C + offs_c[None, :]
    out_mask = rows_ok[:, None] & c_ok[None, :]
    if u0 >= tl.load(count):
        tl.store(out_ptr, tl.zeros((BLOCK_M, BLOCK_C), dtype=dst.dtype.element_ty), mask=out_mask)
        return
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float64 if ACC_F64 else tl.float32)
    for tap in tl.range(0, NTH * NTW, num_stages=NUM_STAGES):
        kh = TH0 + TSH * (tap // NTW)
        kw = TW0 + TSW * (tap % NTW)
        q, ok = _tap(bits, b, cy, cx, ly, lx, kh, kw, Hc, Wc, SUH, SUW, SH, SW, PH, PW, DH, DW, KH, KW,
                     TRANSPOSED, WIN, REACH)
        a = tl.load(src + q[:, None].to(tl.int64) * C + offs_c[None, :], mask=ok[:, None] & c_ok[None, :],
                    other=0.0, eviction_policy="evict_last")
        wk = tl.load(w + (kh * KW + kw) * C + offs_c, mask=c_ok, other=0.0)
        acc += a.to(acc.dtype) * wk.to(acc.dtype)[None, :]
    if HAS_BIAS:
        live = ((bits >> CENTER) & 1) != 0
        bv = tl.load(bias + offs_c, mask=c_ok, other=0.0).to(acc.dtype)
        acc += tl.where(live[:, None], bv[None, :], 0.0)
    tl.store(out_ptr, acc.to(dst.dtype.element_ty), mask=out_mask)


@triton.jit
def _unit_wgrad_kernel(
    x, g, order, count, bits_tab, dw_part, db_part, N_UNITS, Hc, Wc, CIN: tl.constexpr, COUT: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr, DUH: tl.constexpr, DUW: tl.constexpr, SUH: tl.constexpr,
    SUW: tl.constexpr, S: tl.constexpr, G: tl.constexpr, T: tl.constexpr, SPAN: tl.constexpr,
    SPLIT: tl.constexpr, N_ITER: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_F32: tl.constexpr, ACC_F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CI: tl.constexpr,
    BLOCK_CO: tl.constexpr, NUM_STAGES: tl.constexpr, WIN: tl.constexpr, REACH: tl.constexpr,
    CENTER: tl.constexpr,
):
    """dW[k, ci, co] = sum_o x[p(o,k), ci] g[o, co] over the active tiles pid_s, pid_s + SPLIT, ... (a
    pipelined for loop; its trip count from the device count of active units, or N_ITER > 0 under the CPU
    interpreter, which cannot range() over a runtime value: the extra trips there find no active row)."""
    pid_kc = tl.program_id(0)
    pid_co = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_ci: tl.constexpr = (CIN + BLOCK_CI - 1) // BLOCK_CI
    k = pid_kc // n_ci
    cb = pid_kc % n_ci
    kh = k // KW
    kw = k % KW
    offs_ci = cb * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = offs_ci < CIN
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = offs_co < COUT
    acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float64 if ACC_F64 else tl.float32)
    accb = tl.zeros((BLOCK_CO,), dtype=acc.dtype)
    # (no assignment: the interpreter turns every assigned value into a tensor, which range() refuses)
    for i in tl.range(0, N_ITER if N_ITER > 0 else ((tl.load(count) + G - 1) // G * T - pid_s + SPLIT - 1) // SPLIT,
                      num_stages=NUM_STAGES):
        _, b, cy, cx, ly, lx, rows_ok, bits = _tile_rows(order, bits_tab, pid_s + i * SPLIT, N_UNITS, Hc, Wc, S,
                                                         DUW, G, T, SPAN, BLOCK_M)
        live = rows_ok & (((bits >> CENTER) & 1) != 0)
        o = ((b * Hc + cy) * DUH + ly) * (Wc * DUW) + cx * DUW + lx
        q, ok = _tap(bits, b, cy, cx, ly, lx, kh, kw, Hc, Wc, SUH, SUW, SH, SW, PH, PW, DH, DW, KH, KW,
                     False, WIN, REACH)
        gb = tl.load(g + o[:, None].to(tl.int64) * COUT + offs_co[None, :], mask=live[:, None] & co_ok[None, :],
                     other=0.0)
        xa = tl.load(x + q[:, None].to(tl.int64) * CIN + offs_ci[None, :],
                     mask=(ok & rows_ok)[:, None] & ci_ok[None, :], other=0.0)
        acc = dot_acc(acc, tl.trans(xa), gb, DOT_F32, USE_DOT)
        if HAS_BIAS:
            accb += tl.sum(gb.to(accb.dtype), axis=0)
    base = ((pid_s.to(tl.int64) * (KH * KW) + k) * CIN + offs_ci[:, None]) * COUT + offs_co[None, :]
    tl.store(dw_part + base, acc, mask=ci_ok[:, None] & co_ok[None, :])
    if HAS_BIAS:  # noqa: SIM102 (constexpr guard around a runtime test)
        if pid_kc == 0:
            tl.store(db_part + pid_s * COUT + offs_co, accb, mask=co_ok)


@triton.jit
def _unit_dwwgrad_kernel(
    x, g, order, count, bits_tab, dw_part, db_part, N_UNITS, Hc, Wc, C: tl.constexpr, KH: tl.constexpr,
    KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr,
    DW: tl.constexpr, DUH: tl.constexpr, DUW: tl.constexpr, SUH: tl.constexpr, SUW: tl.constexpr,
    S: tl.constexpr, G: tl.constexpr, T: tl.constexpr, SPAN: tl.constexpr, SPLIT: tl.constexpr,
    N_ITER: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_F64: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr, WIN: tl.constexpr, REACH: tl.constexpr,
    CENTER: tl.constexpr,
):
    """Depthwise dW[k, c] = sum_o x[p(o,k), c] g[o, c] (loop as :func:`_unit_wgrad_kernel`); the k = 0
    programs also write dbias partials."""
    k = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    kh = k // KW
    kw = k % KW
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float64 if ACC_F64 else tl.float32)
    accb = tl.zeros((BLOCK_C,), dtype=acc.dtype)
    # (no assignment: the interpreter turns every assigned value into a tensor, which range() refuses)
    for i in tl.range(0, N_ITER if N_ITER > 0 else ((tl.load(count) + G - 1) // G * T - pid_s + SPLIT - 1) // SPLIT,
                      num_stages=NUM_STAGES):
        _, b, cy, cx, ly, lx, rows_ok, bits = _tile_rows(order, bits_tab, pid_s + i * SPLIT, N_UNITS, Hc, Wc, S,
                                                         DUW, G, T, SPAN, BLOCK_M)
        live = rows_ok & (((bits >> CENTER) & 1) != 0)
        o = ((b * Hc + cy) * DUH + ly) * (Wc * DUW) + cx * DUW + lx
        q, ok = _tap(bits, b, cy, cx, ly, lx, kh, kw, Hc, Wc, SUH, SUW, SH, SW, PH, PW, DH, DW, KH, KW,
                     False, WIN, REACH)
        gb = tl.load(g + o[:, None].to(tl.int64) * C + offs_c[None, :], mask=live[:, None] & c_ok[None, :],
                     other=0.0).to(acc.dtype)
        xa = tl.load(x + q[:, None].to(tl.int64) * C + offs_c[None, :],
                     mask=(ok & rows_ok)[:, None] & c_ok[None, :], other=0.0).to(acc.dtype)
        acc += tl.sum(xa * gb, axis=0)
        if HAS_BIAS:
            accb += tl.sum(gb, axis=0)
    tl.store(dw_part + (pid_s.to(tl.int64) * (KH * KW) + k) * C + offs_c, acc, mask=c_ok)
    if HAS_BIAS:  # noqa: SIM102 (constexpr guard around a runtime test)
        if k == 0:
            tl.store(db_part + pid_s * C + offs_c, accb, mask=c_ok)


# ----------------------------------------------------------------------------------------------------------
# launch plans (shared with bench/static_gpu_check.py) and launchers (signatures of sparse_conv2d_triton's, plus
# the UnitTiling of kernels.sparse_conv.active.unit_tiling)


def _p2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def rows_plan(sites_per_unit: int, block_m: int) -> dict:
    """``G`` units per tile (small units) or ``T`` tiles per unit (large ones), ``SPAN`` rows per unit slot."""
    if sites_per_unit >= block_m:
        return dict(G=1, T=triton.cdiv(sites_per_unit, block_m), SPAN=block_m)
    return dict(G=block_m // sites_per_unit, T=1, SPAN=sites_per_unit)


def n_tiles(n_units: int, rows: dict) -> int:
    return triton.cdiv(n_units, rows["G"]) * rows["T"]


def conv_blocks(kdim: int, ndim: int, dtype, on_gpu: bool) -> dict:
    """Dense tiles: on the GPU (bf16/fp16, wgmma) 64-128 sites x 128-256 output channels x 64 input channels, 8
    warps from 128 x 128 up; fp32 (IEEE dots on FMA) 64 x 64 x 32; all spill-free on sm_90
    (bench/static_gpu_check.py); small tiles under the interpreter and for fp64 (broadcast-multiply-sum)."""
    if dtype == torch.float64:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, NUM_STAGES=1)
    if not on_gpu:
        return dict(BLOCK_M=32, BLOCK_N=_p2(ndim, 16, 64), BLOCK_K=_p2(kdim, 16, 32), num_warps=4, NUM_STAGES=1)
    if dtype == torch.float32:  # IEEE fp32 dots run on FMA units: tiles that fit the registers (no spills)
        return dict(BLOCK_M=64, BLOCK_N=_p2(ndim, 16, 64), BLOCK_K=_p2(kdim, 16, 32), num_warps=4, NUM_STAGES=2)
    bn, bk = _p2(ndim, 16, 256), _p2(kdim, 16, 64)
    bm = 64 if bn >= 256 else 128
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=8 if bm * bn >= 128 * 128 else 4, NUM_STAGES=3)


def dw_blocks(c: int, dtype, on_gpu: bool) -> dict:
    if dtype == torch.float64 or not on_gpu:
        return dict(BLOCK_M=16 if dtype == torch.float64 else 32, BLOCK_C=_p2(c, 16, 64 if on_gpu else 32),
                    num_warps=4, NUM_STAGES=1)
    return dict(BLOCK_M=64, BLOCK_C=_p2(c, 16, 64), num_warps=4, NUM_STAGES=2)


def wgrad_blocks(cin: int, cout: int, dtype, on_gpu: bool, depthwise: bool) -> dict:
    if depthwise:
        return dw_blocks(cout, dtype, on_gpu)
    if dtype == torch.float64:
        return dict(BLOCK_M=16, BLOCK_CI=16, BLOCK_CO=16, num_warps=4, NUM_STAGES=1)
    if not on_gpu:
        return dict(BLOCK_M=32, BLOCK_CI=_p2(cin, 16, 32), BLOCK_CO=_p2(cout, 16, 64), num_warps=4, NUM_STAGES=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_CI=_p2(cin, 16, 32), BLOCK_CO=_p2(cout, 16, 64), num_warps=4, NUM_STAGES=2)
    return dict(BLOCK_M=64, BLOCK_CI=_p2(cin, 16, 64), BLOCK_CO=_p2(cout, 16, 128), num_warps=4, NUM_STAGES=3)


def geometry(kernel, stride, padding, dilation, unit_dst, unit_src, transposed, cls=(0, 0)) -> dict:
    """The constexpr geometry of one launch: dst/src units, the parity class ``cls`` of a transposed launch
    (first row ``CY0``, row step ``CSH``; taps ``TH0 + TSH*j``, ``j < NTH``), sites per (class of a) unit ``S``."""
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = kernel, stride, padding, dilation
    g = dict(KH=KH, KW=KW, SH=SH, SW=SW, PH=PH, PW=PW, DH=DH, DW=DW, DUH=unit_dst[0], DUW=unit_dst[1],
             SUH=unit_src[0], SUW=unit_src[1], TRANSPOSED=transposed)
    if not transposed:
        g.update(CY0=0, CX0=0, CSH=1, CSW=1, CW=unit_dst[1], S=unit_dst[0] * unit_dst[1], TH0=0, TW0=0, TSH=1,
                 TSW=1, NTH=KH, NTW=KW)
        return g
    rh, rw = cls
    g.update(CY0=(rh - PH) % SH, CX0=(rw - PW) % SW, CSH=SH, CSW=SW, CW=unit_dst[1] // SW,
             S=(unit_dst[0] // SH) * (unit_dst[1] // SW), TH0=rh, TW0=rw, TSH=SH, TSW=SW,
             NTH=max(0, triton.cdiv(KH - rh, SH)), NTW=max(0, triton.cdiv(KW - rw, SW)))
    return g


WINDOW = dict(WIN=UNIT_WINDOW, REACH=UNIT_REACH, CENTER=_CENTER)


@functools.lru_cache(maxsize=8)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_count(programs: int, tiles: int, partial_elems: int, device) -> int:
    """Weight-gradient splits: enough (tap x channel-block x split) programs for 2 waves of the GPU, no more
    splits than tiles, fp32 partials under 64 MiB. 2 under the interpreter (exercises the reduction)."""
    if device.type != "cuda":
        return 2
    want = triton.cdiv(2 * _sms(device.index or 0), max(1, programs))
    cap = max(1, (64 << 20) // (4 * max(1, partial_elems)))
    return max(1, min(want, cap, tiles))


def _flags(t):
    return dict(USE_DOT=t.dtype != torch.float64, DOT_F32=t.device.type == "cpu" and t.dtype == torch.bfloat16,
                ACC_F64=t.dtype == torch.float64)


FORWARD_SPLIT_K = None
"""Force the implicit GEMM's split-K (tests); None: :func:`split_k`."""


def split_k(programs: int, steps: int, device) -> int:
    """Split-K of the forward / dx implicit GEMM, only for deep layers with few tiles (ResNet stage 4 on 1-site
    units: ~50 programs, 20 of them on active units, for 132 SMs): enough splits for 2 waves counting every
    tile (the active share is unknown without a sync), at least 4 loop steps each, at most 8."""
    if FORWARD_SPLIT_K is not None:
        return FORWARD_SPLIT_K
    return 1 if device.type != "cuda" else split_k_rule(programs, steps, _sms(device.index or 0))


def split_k_rule(programs: int, steps: int, sms: int) -> int:
    if programs >= sms:
        return 1
    return max(1, min(8, steps // 4, triton.cdiv(2 * sms, programs)))


def _launch(src, w, bias, out, plan, kdim, ndim, depthwise, geom, splits=1):
    order, count, bits = plan.grid.index()
    B, Hc, Wc = plan.grid.shape
    N = B * Hc * Wc
    on_gpu = src.device.type == "cuda"
    flags = _flags(src)
    bias_arg = bias if bias is not None else out
    if depthwise:
        cfg = dw_blocks(ndim, src.dtype, on_gpu)
        rows = rows_plan(geom["S"], cfg["BLOCK_M"])
        flags.pop("USE_DOT"), flags.pop("DOT_F32")
        _unit_dwconv_kernel[(n_tiles(N, rows), triton.cdiv(ndim, cfg["BLOCK_C"]))](
            src, order, count, bits, w, bias_arg, out, N, Hc, Wc, ndim, **geom, **rows, **cfg, **WINDOW,
            HAS_BIAS=bias is not None, ACC_F64=flags["ACC_F64"])
        return
    cfg = conv_blocks(kdim, ndim, src.dtype, on_gpu)
    rows = rows_plan(geom["S"], cfg["BLOCK_M"])
    _unit_conv_kernel[(n_tiles(N, rows), triton.cdiv(ndim, cfg["BLOCK_N"]), splits)](
        src, order, count, bits, w, bias_arg, out, N, Hc, Wc, kdim, ndim, **geom, **rows, **cfg, **WINDOW,
        HAS_BIAS=bias is not None, **flags, SPLIT_K=splits)


def _splits(src, plan, kdim, ndim, depthwise, geoms, kernel_taps):
    """Split-K of a dense pass (1 for depthwise: no K loop to split): programs of all its launches."""
    if depthwise:
        return 1
    cfg = conv_blocks(kdim, ndim, src.dtype, src.device.type == "cuda")
    B, Hc, Wc = plan.grid.shape
    tiles = sum(n_tiles(B * Hc * Wc, rows_plan(g["S"], cfg["BLOCK_M"])) for g in geoms)
    return split_k(tiles * triton.cdiv(ndim, cfg["BLOCK_N"]), kernel_taps * triton.cdiv(kdim, cfg["BLOCK_K"]),
                   src.device)


def _run(src, w, bias, out, plan, kdim, ndim, depthwise, geoms, kernel_taps):
    """The launches of one pass (one per parity class), straight into ``out`` or, split-K, into fp32 partials
    summed once into ``out``."""
    splits = _splits(src, plan, kdim, ndim, depthwise, geoms, kernel_taps)
    dst = out if splits == 1 else _buffers.empty((splits, *out.shape), acc_dtype(src.dtype), src.device)
    for geom in geoms:
        _launch(src, w, bias, dst, plan, kdim, ndim, depthwise, geom, splits)
    if splits > 1:
        out.copy_(dst.sum(0))
    return out


def _pairs(stride, padding, dilation):
    return tuple(stride), tuple(padding), tuple(dilation)


@launches_on_input_device
def forward(x_nhwc, active_in, active_out, weight, bias, stride, padding, dilation, depthwise, plan, out=None):
    """``out[B, Ho, Wo, Cout]`` NHWC: active units computed, inactive units written as zeros, one launch."""
    B, H, W, Cin = x_nhwc.shape
    Ho, Wo = active_out.shape[1:]
    Cout, cin_g, KH, KW = weight.shape
    x_nhwc = x_nhwc.contiguous()
    if depthwise:
        wp = weight.reshape(Cout, KH * KW).t().contiguous()
    else:
        wp = weight.permute(2, 3, 1, 0).reshape(KH * KW, cin_g, Cout).contiguous()
    out = out_or_empty(out, "out", (B, Ho, Wo, Cout), x_nhwc)
    geom = geometry((KH, KW), *_pairs(stride, padding, dilation), plan.unit_out, plan.unit_in, False)
    return _run(x_nhwc, wp, None if bias is None else bias.contiguous(), out, plan, Cin, Cout, depthwise, [geom],
                KH * KW)


@launches_on_input_device
def backward_input(g_nhwc, active_in, active_out, weight, stride, padding, dilation, depthwise, plan, out=None):
    """``dx[B, H, W, Cin]`` NHWC, zero at inactive units: one launch per parity class of the stride."""
    B, Ho, Wo, Cout = g_nhwc.shape
    H, W = active_in.shape[1:]
    _, cin_g, KH, KW = weight.shape
    Cin = Cout if depthwise else cin_g
    g_nhwc = g_nhwc.contiguous()
    if depthwise:
        wp = weight.reshape(Cout, KH * KW).t().contiguous()
    else:
        wp = weight.permute(2, 3, 0, 1).reshape(KH * KW, Cout, cin_g).contiguous()
    out = out_or_empty(out, "dx", (B, H, W, Cin), g_nhwc)
    s, p, d = _pairs(stride, padding, dilation)
    geoms = [geometry((KH, KW), s, p, d, plan.unit_in, plan.unit_out, True, (rh, rw))
             for rh in range(s[0]) for rw in range(s[1])]
    taps = triton.cdiv(KH, s[0]) * triton.cdiv(KW, s[1])
    return _run(g_nhwc, wp, None, out, plan, Cout, Cin, depthwise, geoms, taps)


@launches_on_input_device
def backward_weight(x_nhwc, g_nhwc, active_in, active_out, weight_shape, stride, padding, dilation, depthwise,
                    plan, need_bias=True, out=None, out_bias=None):
    """``(dweight [Cout, Cin/groups, KH, KW], dbias [Cout] or None)``: one launch, uninitialised fp32/fp64
    partials (each written once), reduced once here."""
    _, H, W, Cin = x_nhwc.shape
    _, Ho, Wo, Cout = g_nhwc.shape
    _, _, KH, KW = weight_shape
    K = KH * KW
    x_nhwc, g_nhwc = x_nhwc.contiguous(), g_nhwc.contiguous()
    order, count, bits = plan.grid.index()
    B, Hc, Wc = plan.grid.shape
    N = B * Hc * Wc
    acc = acc_dtype(x_nhwc.dtype)
    dev = x_nhwc.device
    on_gpu = dev.type == "cuda"
    geom = geometry((KH, KW), *_pairs(stride, padding, dilation), plan.unit_out, plan.unit_in, False)
    for key in ("TRANSPOSED", "CY0", "CX0", "CSH", "CSW", "CW", "TH0", "TW0", "TSH", "TSW", "NTH", "NTW"):
        geom.pop(key)
    cfg = wgrad_blocks(Cin, Cout, x_nhwc.dtype, on_gpu, depthwise)
    rows = rows_plan(geom["S"], cfg["BLOCK_M"])
    if depthwise:
        grid01 = (K, triton.cdiv(Cout, cfg["BLOCK_C"]))
    else:
        grid01 = (K * triton.cdiv(Cin, cfg["BLOCK_CI"]), triton.cdiv(Cout, cfg["BLOCK_CO"]))
    tiles = n_tiles(N, rows)
    split = split_count(grid01[0] * grid01[1], tiles, K * (1 if depthwise else Cin) * Cout, dev)
    # the interpreter cannot range() over a device value: give it the trip count (CPU: no sync to speak of)
    n_iter = 0 if on_gpu else max(1, triton.cdiv(n_tiles(int(count.item()), rows), split))
    db_part = _buffers.empty((split, Cout), acc, dev)
    args = (x_nhwc, g_nhwc, order, count, bits)
    flags = _flags(x_nhwc)
    common = dict(**geom, **rows, **cfg, **WINDOW, SPLIT=split, N_ITER=n_iter, HAS_BIAS=need_bias,
                  ACC_F64=flags["ACC_F64"])
    if depthwise:
        dw_part = _buffers.empty((split, K, Cout), acc, dev)
        _unit_dwwgrad_kernel[(*grid01, split)](*args, dw_part, db_part, N, Hc, Wc, Cout, **common)
    else:
        dw_part = _buffers.empty((split, K, Cin, Cout), acc, dev)
        _unit_wgrad_kernel[(*grid01, split)](*args, dw_part, db_part, N, Hc, Wc, Cin, Cout, **common,
                                             USE_DOT=flags["USE_DOT"], DOT_F32=flags["DOT_F32"])
    return weight_grads_from_partials(dw_part, db_part, weight_shape, x_nhwc.dtype, depthwise, need_bias, out,
                                      out_bias)
