"""Triton kernels and launchers of masked_token_scatter (imported by its triton backend only).

Forward, one launch over (output-row tiles, D tiles):
    out[b, r, :] = v + pos[r - S]          v = cls_token          if C and r == 0
                                             mask_token         if mask[b, r - C]
                                             x[b, r - C, :]     otherwise
x is not read at masked rows. All arithmetic in fp32 (fp64 for fp64), one rounding to x.dtype.

Backward, one launch over (N_out tiles, D tiles, batch splits); each program loops over its batch slice:
    grad_x[b, n]        = mask[b, n] ? 0 : g[b, n + C]                     (written directly)
    colsum[s, r]        = sum_{b in split s} g[b, r]                       (fp32 partials [SPLIT, N_out, D])
    tokpart[s, t]       = sum_{b in split s, n in tile t, mask[b,n]} g[b, n + C]   (fp32 [SPLIT, tiles, D])
then a tiny torch reduction: grad_pos = colsum.sum(0)[S:], grad_cls = colsum.sum(0)[0],
grad_mask_token = tokpart.sum((0, 1)). The per-split batch count is a constexpr loop bound (one compile per
batch size; also keeps the loop runnable under the interpreter, whose runtime scalars are 1-element arrays).
No atomics, so the result is deterministic; the batch is split only so that enough programs are in flight
on a GPU (the partial buffers are O(SPLIT * N_out * D) fp32, ~3% of the gradient traffic at BEiT shapes).
Each backward iteration loads ``BWD_ROWS = 4`` batch rows of a (16 x 128) tile before it stores any: four
independent 16-byte loads per thread in flight (the one-row loop had one), 8 warps, 80 registers (bf16,
sm_90), so 3 programs (24 warps) resident per SM: ~49 KB in flight per SM (one-row loop: ~16 KB; Little's law
at 3.35 TB/s and ~0.7 us latency wants ~18 KB). A split is rounded up to whole 4-row iterations.

Cost model (BEiT: B 256, N 196, C 1, D 768, 75 masked per row, bf16 e = 2; H100 ~3.35 TB/s):
* forward: bytes ``(B (N - k) + B (N + C)) D e + P D e`` = 125 MB (masked rows of x are never read) -> 37 us;
  ~1 FLOP per element; one launch.
* backward: bytes ``B (N + C) D e`` (g) + ``B N D e`` (grad_x) + ``2 SPLIT (N + C + tiles_n) D 4`` (partials
  written, then reduced; SPLIT = 7 here) = 163 MB -> 49 us; ~3 FLOPs per element; one launch + 2 small torch
  reductions (colsum over SPLIT, tokpart over (SPLIT, tiles)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _buffers
from kernels._backend import launches_on_input_device
from kernels._triton_common import tl_acc_dtype


@triton.jit
def _masked_token_scatter_fwd_kernel(
    x_ptr,
    mask_ptr,
    tok_ptr,
    pos_ptr,
    cls_ptr,
    out_ptr,
    total_rows,
    N,
    D,
    N_out,
    SHIFT,
    sxb,
    sxn,
    sxd,
    smb,
    smn,
    spn,
    spd,
    stok,
    scls,
    HAS_POS: tl.constexpr,
    HAS_CLS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, r] = (r < C ? cls : mask[b, r-C] ? tok : x[b, r-C]) + (pos[r-S] if r >= S), rows flattened."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < total_rows
    cmask = cols < D
    b = rows // N_out
    r = rows % N_out
    if HAS_CLS:
        n = r - 1
    else:
        n = r
    is_patch = rmask & (n >= 0)
    m = tl.load(mask_ptr + b * smb + n * smn, mask=is_patch, other=0) != 0
    take_x = is_patch & (m == 0)
    xv = tl.load(
        x_ptr + b[:, None] * sxb + n[:, None] * sxn + cols[None, :] * sxd,
        mask=take_x[:, None] & cmask[None, :],
        other=0.0,
    ).to(ACC)
    tok = tl.load(tok_ptr + cols * stok, mask=cmask, other=0.0).to(ACC)
    val = tl.where(m[:, None], tok[None, :], xv)
    if HAS_CLS:
        cls = tl.load(cls_ptr + cols * scls, mask=cmask, other=0.0).to(ACC)
        val = tl.where((r == 0)[:, None], cls[None, :], val)
    if HAS_POS:
        p = r - SHIFT
        pv = tl.load(
            pos_ptr + p[:, None] * spn + cols[None, :] * spd,
            mask=(rmask & (p >= 0))[:, None] & cmask[None, :],
            other=0.0,
        ).to(ACC)
        val = val + pv
    tl.store(
        out_ptr + rows[:, None] * D + cols[None, :],
        val.to(out_ptr.dtype.element_ty),
        mask=rmask[:, None] & cmask[None, :],
    )


@triton.jit
def _bwd_load_row(g_ptr, mask_ptr, b, ok, r, n, cols, tile_mask, is_patch, sgb, sgn, sgd, smb, smn):
    """Batch row ``b``'s (BLOCK_N, BLOCK_D) tile of g and its mask bits (nothing loaded where ``ok`` is False)."""
    b64 = b.to(tl.int64)
    g = tl.load(g_ptr + b64 * sgb + r[:, None] * sgn + cols[None, :] * sgd, mask=tile_mask & ok, other=0.0)
    m = tl.load(mask_ptr + b64 * smb + n * smn, mask=is_patch & ok, other=0) != 0
    return g, m


@triton.jit
def _bwd_use_row(g, m, b, ok, acc_col, acc_tok, gx_ptr, n, cols, is_patch, cmask, N, D,
                 NEED_X: tl.constexpr, NEED_TOK: tl.constexpr, NEED_COLSUM: tl.constexpr, ACC: tl.constexpr):
    """Accumulate one loaded row into the fp32 sums and store its grad_x (g as loaded, 0 at masked rows)."""
    gf = g.to(ACC)
    if NEED_COLSUM:
        acc_col += gf
    if NEED_TOK:
        acc_tok += tl.where(m[:, None], gf, 0.0)
    if NEED_X:
        gx = tl.where(m[:, None], tl.zeros_like(g), g)
        tl.store(gx_ptr + (b.to(tl.int64) * N + n[:, None]) * D + cols[None, :], gx.to(gx_ptr.dtype.element_ty),
                 mask=(is_patch & ok)[:, None] & cmask[None, :])
    return acc_col, acc_tok


@triton.jit
def _masked_token_scatter_bwd_kernel(
    g_ptr,
    mask_ptr,
    gx_ptr,
    colsum_ptr,
    tokpart_ptr,
    B,
    N,
    D,
    N_out,
    sgb,
    sgn,
    sgd,
    smb,
    smn,
    B_PER_SPLIT: tl.constexpr,
    HAS_CLS: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_TOK: tl.constexpr,
    NEED_COLSUM: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grad_x = g*~mask; per-split fp32 partials of sum_b g (colsum) and of sum over masked rows (tokpart).

    Each iteration handles ``ROWS = 4`` batch rows: the four rows' tiles are loaded first (four independent
    loads per thread in flight; in program order before any store, so the compiler need not prove that grad_x
    does not alias g), then summed and stored one by one. Written out as four 2-D tiles rather than one
    [4, BLOCK_N, BLOCK_D] block: a 3-D [4, 8, 128] block took 213 registers on sm_90 at 4 warps, four
    (8, 128) tiles 72, four (16, 128) tiles at 8 warps 80.
    Rows past this split's slice or past B are masked.
    """
    tl.static_assert(ROWS == 4, "the batch loop is unrolled by hand for 4 rows")
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = r < N_out
    cmask = cols < D
    if HAS_CLS:
        n = r - 1
    else:
        n = r
    is_patch = rmask & (n >= 0)
    tile_mask = rmask[:, None] & cmask[None, :]
    acc_col = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    acc_tok = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    b_start = pid_s * B_PER_SPLIT
    for i in range(0, B_PER_SPLIT, ROWS):
        b0 = b_start + i
        ok0 = (b0 < B) & (i < B_PER_SPLIT)
        ok1 = (b0 + 1 < B) & (i + 1 < B_PER_SPLIT)
        ok2 = (b0 + 2 < B) & (i + 2 < B_PER_SPLIT)
        ok3 = (b0 + 3 < B) & (i + 3 < B_PER_SPLIT)
        g0, m0 = _bwd_load_row(g_ptr, mask_ptr, b0, ok0, r, n, cols, tile_mask, is_patch, sgb, sgn, sgd, smb, smn)
        g1, m1 = _bwd_load_row(g_ptr, mask_ptr, b0 + 1, ok1, r, n, cols, tile_mask, is_patch, sgb, sgn, sgd, smb,
                               smn)
        g2, m2 = _bwd_load_row(g_ptr, mask_ptr, b0 + 2, ok2, r, n, cols, tile_mask, is_patch, sgb, sgn, sgd, smb,
                               smn)
        g3, m3 = _bwd_load_row(g_ptr, mask_ptr, b0 + 3, ok3, r, n, cols, tile_mask, is_patch, sgb, sgn, sgd, smb,
                               smn)
        acc_col, acc_tok = _bwd_use_row(g0, m0, b0, ok0, acc_col, acc_tok, gx_ptr, n, cols, is_patch, cmask, N, D,
                                        NEED_X, NEED_TOK, NEED_COLSUM, ACC)
        acc_col, acc_tok = _bwd_use_row(g1, m1, b0 + 1, ok1, acc_col, acc_tok, gx_ptr, n, cols, is_patch, cmask, N,
                                        D, NEED_X, NEED_TOK, NEED_COLSUM, ACC)
        acc_col, acc_tok = _bwd_use_row(g2, m2, b0 + 2, ok2, acc_col, acc_tok, gx_ptr, n, cols, is_patch, cmask, N,
                                        D, NEED_X, NEED_TOK, NEED_COLSUM, ACC)
        acc_col, acc_tok = _bwd_use_row(g3, m3, b0 + 3, ok3, acc_col, acc_tok, gx_ptr, n, cols, is_patch, cmask, N,
                                        D, NEED_X, NEED_TOK, NEED_COLSUM, ACC)
    if NEED_COLSUM:
        tl.store(colsum_ptr + (pid_s * N_out + r[:, None]) * D + cols[None, :], acc_col, mask=tile_mask)
    if NEED_TOK:
        tok = tl.sum(acc_tok, axis=0)
        tl.store(tokpart_ptr + (pid_s * tl.num_programs(0) + pid_n) * D + cols, tok, mask=cmask)


def _fwd_blocks(D):
    return 16, min(triton.next_power_of_2(D), 256)


BWD_ROWS = 4  # batch rows per iteration of the backward (four (16, 128) tiles: 16 KiB of bf16 in flight)
BWD_WARPS = 8


def _bwd_blocks(D):
    return 16, min(triton.next_power_of_2(D), 128)


def _num_splits(B, tiles, device, split=None):
    if split is not None:
        return max(1, min(int(split), B))
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count  # ~4.5 programs per SM
    else:
        target = 2 * tiles  # interpreter: exercise the split path cheaply
    return max(1, min(B, triton.cdiv(target, tiles)))


@launches_on_input_device
def masked_token_scatter_forward(x, mask, mask_token, pos_embed=None, cls_token=None):
    """Launch the forward kernel. mask_token/cls_token [D], pos_embed [P, D] with P in (N, N + C)."""
    B, N, D = x.shape
    C = 1 if cls_token is not None else 0
    N_out = N + C
    out = _buffers.empty((B, N_out, D), x.dtype, x.device)
    if out.numel() == 0:
        return out
    m8 = mask.view(torch.uint8)
    shift = N_out - pos_embed.shape[0] if pos_embed is not None else 0
    pos = pos_embed if pos_embed is not None else mask_token
    cls = cls_token if cls_token is not None else mask_token
    BLOCK_R, BLOCK_D = _fwd_blocks(D)
    grid = (triton.cdiv(B * N_out, BLOCK_R), triton.cdiv(D, BLOCK_D))
    spn, spd = (pos_embed.stride(0), pos_embed.stride(1)) if pos_embed is not None else (0, 0)
    _masked_token_scatter_fwd_kernel[grid](
        x,
        m8,
        mask_token,
        pos,
        cls,
        out,
        B * N_out,
        N,
        D,
        N_out,
        shift,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        m8.stride(0),
        m8.stride(1),
        spn,
        spd,
        mask_token.stride(0),
        cls.stride(0),
        HAS_POS=pos_embed is not None,
        HAS_CLS=bool(C),
        ACC=tl_acc_dtype(x.dtype),
        BLOCK_R=BLOCK_R,
        BLOCK_D=BLOCK_D,
        num_warps=4,
    )
    return out


@launches_on_input_device
def masked_token_scatter_backward(
    grad_out, mask, pos_rows, has_cls, need_x=True, need_tok=True, need_pos=True, need_cls=True, split=None
):
    """Launch the backward kernel; returns (grad_x, grad_mask_token, grad_pos, grad_cls).

    grad_x is in grad_out's dtype; the parameter grads are fp32 (fp64 for fp64; the caller casts).
    Entries not needed are None.
    """
    B, N_out, D = grad_out.shape
    C = 1 if has_cls else 0
    N = N_out - C
    need_pos = need_pos and pos_rows is not None
    need_cls = need_cls and has_cls
    need_col = need_pos or need_cls
    dev = grad_out.device
    gx = _buffers.empty((B, N, D), grad_out.dtype, dev) if need_x else None
    if not (need_x or need_tok or need_col):
        return None, None, None, None
    if B == 0 or D == 0 or N_out == 0:
        z = torch.zeros(D, dtype=torch.float32, device=dev)
        return (
            gx,
            z if need_tok else None,
            torch.zeros(pos_rows or 0, D, dtype=torch.float32, device=dev) if need_pos else None,
            z if need_cls else None,
        )
    BLOCK_N, BLOCK_D = _bwd_blocks(D)
    tiles_n, tiles_d = triton.cdiv(N_out, BLOCK_N), triton.cdiv(D, BLOCK_D)
    splits = _num_splits(B, tiles_n * tiles_d, dev, split)
    per = triton.cdiv(B, splits)
    if split is None:  # whole 4-row iterations (an explicit split keeps its ragged slices: the tests' case)
        per = triton.cdiv(per, BWD_ROWS) * BWD_ROWS
    splits = triton.cdiv(B, per)
    part = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    colsum = _buffers.empty((splits, N_out, D), part, dev) if need_col else None
    tokpart = _buffers.empty((splits, tiles_n, D), part, dev) if need_tok else None
    m8 = mask.view(torch.uint8)
    dummy = grad_out if gx is None else gx
    _masked_token_scatter_bwd_kernel[(tiles_n, tiles_d, splits)](
        grad_out,
        m8,
        dummy,
        colsum if colsum is not None else torch.empty(1, device=dev),
        tokpart if tokpart is not None else torch.empty(1, device=dev),
        B,
        N,
        D,
        N_out,
        grad_out.stride(0),
        grad_out.stride(1),
        grad_out.stride(2),
        m8.stride(0),
        m8.stride(1),
        B_PER_SPLIT=per,
        HAS_CLS=bool(C),
        NEED_X=need_x,
        NEED_TOK=need_tok,
        NEED_COLSUM=need_col,
        ACC=tl_acc_dtype(grad_out.dtype),
        ROWS=BWD_ROWS,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        num_warps=BWD_WARPS,
    )
    gtok = tokpart.sum(dim=(0, 1)) if need_tok else None
    gpos = gcls = None
    if need_col:
        col = colsum.sum(dim=0) if splits > 1 else colsum[0]
        if need_pos:
            gpos = col[N_out - pos_rows :]
        if need_cls:
            gcls = col[0]
    return gx, gtok, gpos, gcls
