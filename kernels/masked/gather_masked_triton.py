"""Triton kernels and launchers of gather_masked (imported by its triton backend only).

One program per (batch row b, D tile) walks the mask row in BLOCK_N chunks and ranks the masked positions
with an in-register prefix sum, so no index tensor is built:

    rank(b, n)   = #{n' <= n : mask[b, n']} - 1                       (for mask[b, n])
    forward      out[start_b + rank(b, n)]  = h[b, n]     for masked n with rank < cap
    backward     grad_h[b, n] = g[start_b + rank(b, n)] if masked n with rank < cap else 0

start_b = b*k and cap = k on the fixed-count path (missing slots j in [count_b, k) are filled with NaN so a
row with too few masked positions poisons the loss instead of reading garbage); on the variable-count
path start_b is the exclusive cumsum of the counts and cap = N. Every output element is written by
exactly one program (backward writes the zeros too), so neither output needs a prior fill.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _buffers
from kernels._backend import launches_on_input_device


@triton.jit
def _slots(offsets_ptr, b, N: tl.constexpr, K: tl.constexpr, FIXED: tl.constexpr):
    """Image b's first output row and how many of its masked tokens have a row: ``b * K`` and K on the fixed
    path (K slots per image), else its offset in the packed rows and all N."""
    if FIXED:
        start = b * K
        cap = K
    else:
        start = tl.load(offsets_ptr + b)
        cap = N
    return start, cap


@triton.jit
def _gather_masked_fwd_kernel(
    h_ptr,
    mask_ptr,
    offsets_ptr,
    out_ptr,
    D,
    shb,
    shn,
    shd,
    smb,
    smn,
    N: tl.constexpr,
    K: tl.constexpr,
    FIXED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[start_b + rank(b, n)] = h[b, n] for masked n; NaN in the slots [count_b, K) (fixed path)."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    start, cap = _slots(offsets_ptr, b, N, K, FIXED)
    carry = tl.program_id(0) * 0
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        m = (tl.load(mask_ptr + b * smb + n * smn, mask=n < N, other=0) != 0).to(tl.int32)
        rank = tl.cumsum(m, axis=0) + carry - 1
        sel = (m != 0) & (rank < cap)
        tile = sel[:, None] & cmask[None, :]
        v = tl.load(h_ptr + b * shb + n[:, None] * shn + cols[None, :] * shd, mask=tile, other=0.0)
        tl.store(out_ptr + (start + rank)[:, None] * D + cols[None, :], v, mask=tile)
        carry += tl.sum(m, axis=0)
    if FIXED:
        for j0 in range(0, K, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            fill = (j >= carry) & (j < K)
            nan = tl.full((BLOCK_K, BLOCK_D), float("nan"), tl.float32).to(out_ptr.dtype.element_ty)
            tl.store(
                out_ptr + (start + j)[:, None] * D + cols[None, :], nan, mask=fill[:, None] & cmask[None, :]
            )


@triton.jit
def _gather_masked_bwd_kernel(
    g_ptr,
    mask_ptr,
    offsets_ptr,
    gh_ptr,
    D,
    sgm,
    sgd,
    smb,
    smn,
    N: tl.constexpr,
    K: tl.constexpr,
    FIXED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grad_h[b, n] = g[start_b + rank(b, n)] at masked n with rank < cap, else 0 (every element written)."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    start, cap = _slots(offsets_ptr, b, N, K, FIXED)
    carry = tl.program_id(0) * 0
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nm = n < N
        m = (tl.load(mask_ptr + b * smb + n * smn, mask=nm, other=0) != 0).to(tl.int32)
        rank = tl.cumsum(m, axis=0) + carry - 1
        sel = (m != 0) & (rank < cap)
        g = tl.load(
            g_ptr + (start + rank)[:, None] * sgm + cols[None, :] * sgd,
            mask=sel[:, None] & cmask[None, :],
            other=0.0,
        )
        tl.store(gh_ptr + (b * N + n[:, None]) * D + cols[None, :], g, mask=nm[:, None] & cmask[None, :])
        carry += tl.sum(m, axis=0)


def _blocks(N, D):
    return min(triton.next_power_of_2(max(N, 1)), 64), min(triton.next_power_of_2(max(D, 1)), 128)


@launches_on_input_device
def gather_masked_forward(h, mask, k=None, offsets=None, total=None):
    """[B, N, D] -> [total, D]. Fixed path: k given (total = B*k). Variable path: offsets [B] int64, total."""
    B, N, D = h.shape
    fixed = k is not None
    total = B * k if fixed else int(total)
    out = _buffers.empty((total, D), h.dtype, h.device)
    if out.numel() == 0:
        return out
    m8 = mask.view(torch.uint8)
    BLOCK_N, BLOCK_D = _blocks(N, D)
    _gather_masked_fwd_kernel[(B, triton.cdiv(D, BLOCK_D))](
        h,
        m8,
        offsets if offsets is not None else m8,
        out,
        D,
        h.stride(0),
        h.stride(1),
        h.stride(2),
        m8.stride(0),
        m8.stride(1),
        N=N,
        K=k if fixed else 0,
        FIXED=fixed,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        BLOCK_K=16,
        num_warps=4,
    )
    return out


@launches_on_input_device
def gather_masked_backward(grad_out, mask, k=None, offsets=None):
    """[M, D] -> [B, N, D]: the rows scattered back to their masked positions, zeros elsewhere."""
    B, N = mask.shape
    D = grad_out.shape[1]
    gh = _buffers.empty((B, N, D), grad_out.dtype, grad_out.device)
    if gh.numel() == 0:
        return gh
    fixed = k is not None
    m8 = mask.view(torch.uint8)
    BLOCK_N, BLOCK_D = _blocks(N, D)
    _gather_masked_bwd_kernel[(B, triton.cdiv(D, BLOCK_D))](
        grad_out,
        m8,
        offsets if offsets is not None else m8,
        gh,
        D,
        grad_out.stride(0),
        grad_out.stride(1),
        m8.stride(0),
        m8.stride(1),
        N=N,
        K=k if fixed else 0,
        FIXED=fixed,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        num_warps=4,
    )
    return gh
