"""Triton kernels and launchers of ema_codebook_update (imported by its triton backends only).

Scatter, one launch over row tiles of z (atomics; the caller zeroes SUMS and COUNTS)::

    COUNTS[i_m] += 1,   SUMS[i_m, :] += x_m      x_m = l2n(z_m) if NORMALIZE else z_m
    (rows that are finite and have 0 <= i_m < K only)

Finalize, one launch over code tiles, in place::

    CLUSTER <- decay * CLUSTER + (1 - decay) * n;   used codes: CODEBOOK[k] <- (l2n of) the EMA of the mean

``l2n`` is the lookup's overflow-safe row normalisation (:func:`kernels.codebook.nearest_code_triton.l2n_rows`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels._backend import launches_on_input_device
from kernels.codebook.nearest_code_triton import l2n_rows, row_tiles


@triton.jit
def _ema_scatter_kernel(
    Z,
    IDX,
    SUMS,
    COUNTS,
    M,
    D,
    K,
    stride_zm,
    stride_zd,
    eps,
    NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Scatter-add of assigned rows (no one-hot):  COUNTS[i_m] += 1,  SUMS[i_m, :] += x_m,
    with ``x_m = z_m / max(||z_m||, eps)`` (overflow-safe) when NORMALIZE else ``z_m``; rows holding a NaN
    or inf, and rows whose index is outside [0, K), are skipped (neither counted nor added, never written
    out of bounds).
    Atomic adds: the fp32 rounding of the sums depends on the order of arrival.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < M
    mask = rmask[:, None] & (offs_d < D)[None, :]
    acc_ty = SUMS.dtype.element_ty
    x = tl.load(
        Z + rows[:, None].to(tl.int64) * stride_zm + offs_d[None, :] * stride_zd, mask=mask, other=0.0
    ).to(acc_ty)
    finite = (x == x) & (tl.abs(x) != float("inf"))
    k = tl.load(IDX + rows, mask=rmask, other=0)
    ok = rmask & (tl.sum(tl.where(finite, 0, 1), axis=1) == 0) & (k >= 0) & (k < K)
    x = tl.where(ok[:, None], x, 0.0)
    if NORMALIZE:
        x = l2n_rows(x, eps)
    tl.atomic_add(SUMS + k[:, None] * D + offs_d[None, :], x, mask=mask & ok[:, None], sem="relaxed")
    ones = tl.full([BLOCK_M], 1.0, acc_ty)
    tl.atomic_add(COUNTS + k, ones, mask=ok, sem="relaxed")


@triton.jit
def _ema_finalize_kernel(
    CODEBOOK,
    CLUSTER,
    COUNTS,
    SUMS,
    STEPS,
    K,
    D,
    decay: tl.float64,
    one_minus_decay: tl.float64,
    eps: tl.float64,
    NORMALIZE: tl.constexpr,
    HAS_STEPS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per code k (n = COUNTS[k], S = SUMS[k]):

        CLUSTER[k] <- decay * CLUSTER[k] + (1 - decay) * n
        n > 0:  mu = S / n;  CODEBOOK[k] <- l2n(decay * c + (1 - decay) * l2n(mu))   (NORMALIZE)
                             CODEBOOK[k] <- decay * c + (1 - decay) * mu             (otherwise)
        n = 0:  CODEBOOK[k] untouched;   STEPS[k] <- 0 if n > 0 else STEPS[k] + 1
    with l2n(v) = v / max(||v||, eps), computed in fp32 (fp64 for fp64 state). The scalars arrive as fp64
    (Triton would round a Python float argument to fp32) and are rounded to the state's precision here, as
    torch does with a Python scalar; ``1 - decay`` is computed on the host in double precision.
    """
    pid = tl.program_id(0)
    codes = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    kmask = codes < K
    mask = kmask[:, None] & (offs_d < D)[None, :]
    acc_ty = SUMS.dtype.element_ty
    dec = tl.full([], decay, tl.float64).to(acc_ty)
    omd = tl.full([], one_minus_decay, tl.float64).to(acc_ty)
    eps_acc = tl.full([], eps, tl.float64).to(acc_ty)
    n = tl.load(COUNTS + codes, mask=kmask, other=0.0).to(acc_ty)
    cl = tl.load(CLUSTER + codes, mask=kmask, other=0.0)
    tl.store(CLUSTER + codes, (dec * cl.to(acc_ty) + omd * n).to(cl.dtype), mask=kmask)
    used = n > 0
    ptrs = codes[:, None].to(tl.int64) * D + offs_d[None, :]
    s = tl.load(SUMS + ptrs, mask=mask, other=0.0).to(acc_ty)
    c_raw = tl.load(CODEBOOK + ptrs, mask=mask, other=0.0)
    c = c_raw.to(acc_ty)
    mu = s / tl.maximum(n, 1.0)[:, None]
    if NORMALIZE:
        mu = l2n_rows(mu, eps_acc)
        new = dec * c + omd * mu
        new = l2n_rows(new, eps_acc)
    else:
        new = dec * c + omd * mu
    tl.store(CODEBOOK + ptrs, new.to(c_raw.dtype), mask=mask & used[:, None])
    if HAS_STEPS:
        st = tl.load(STEPS + codes, mask=kmask, other=0)
        tl.store(STEPS + codes, tl.where(used, 0, st + 1), mask=kmask)


@launches_on_input_device
def ema_scatter(z2d, indices, sums, counts, normalize, eps):
    """SUMS/COUNTS must be zeroed by the caller; accumulates in their dtype (fp32/fp64)."""
    M, D = z2d.shape
    if M == 0:
        return
    block_m, block_d = row_tiles(D)
    _ema_scatter_kernel[(triton.cdiv(M, block_m),)](
        z2d, indices, sums, counts, M, D, sums.shape[0], z2d.stride(0), z2d.stride(1), eps,
        NORMALIZE=bool(normalize), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
    )


@launches_on_input_device
def ema_finalize(codebook, cluster_size, counts, sums, decay, eps, normalize, steps):
    """In place: CLUSTER, the used CODEBOOK rows and STEPS (when given)."""
    K, D = codebook.shape
    block_k, block_d = row_tiles(D)
    _ema_finalize_kernel[(triton.cdiv(K, block_k),)](
        codebook, cluster_size, counts, sums, steps if steps is not None else counts, K, D,
        float(decay), 1.0 - float(decay), float(eps),
        NORMALIZE=bool(normalize), HAS_STEPS=steps is not None, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4,
    )
