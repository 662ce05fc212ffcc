"""Pure-PyTorch oracle for the VQ-KD codebook ops (BEiT v2 tokenizer). No triton import.

Nearest code (``normalize=True``, cosine; the BEiT v2 setting)::

    z_n  = z / max(||z||, eps)            c_n = c / max(||c||, eps)      (rows, l2)
    s_mk = <z_n[m], c_n[k]>               i_m = argmax_k s_mk            (lowest k on ties)
    z_q  = c_n[i]                         z_q_st = z_n + (z_q - z_n).detach()

With ``normalize=False`` the score is ``2 <z, c> - ||c||^2 = ||z||^2 - ||z - c||^2``: the constant
``||z||^2`` is dropped, so the argmax is the Euclidean nearest code and ``best_similarity`` is
``-||z - c||^2 + ||z||^2`` (not a distance).

EMA update (BEiT v2 norm-EMA), for one batch of assigned vectors ``z`` with indices ``i``::

    n_k  = #{m : i_m = k}                 S_k = sum_{m : i_m = k} z_n[m]        (scatter-add)
    cluster_size = decay * cluster_size + (1 - decay) * n           (every code)
    mean_k = l2n(S_k / n_k);  c_k <- l2n(decay * c_k + (1 - decay) * mean_k)   (only codes with n_k > 0)

The similarity is computed in float32 (float64 when an input is float64), chunked over rows so that
at most ``chunk_elems`` scores exist at once; this path is the oracle in the tests and the CPU default.

Huge values: ``||x||^2`` overflows float32 once ``|x|`` reaches ~1e19, which used to turn every normalised
row into zeros (cosine: index 0 everywhere) and every L2 score into ``-inf``/NaN. ``l2n`` therefore divides
a row by its largest magnitude first when that exceeds ``SAFE_MAX`` (2**32; rows below it are computed
exactly as before, bit for bit), and the L2 lookup scales ``z`` and the codebook by one common power of two
(the argmax is invariant to it) and scales the similarity back in float64 (it is ``inf`` when the true
value is beyond the output dtype's range).

Non-finite rows (NaN or inf in a row of ``z``) are left out of the EMA statistics: they count for no code
and add nothing to the sums (``ema_scatter_reference``), so one bad batch cannot poison a codebook row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._checks import acc_dtype

DEFAULT_CHUNK_ELEMS = 1 << 24

SAFE_MAX = 2.0**32
"""Rows (l2n) or inputs (L2 lookup) whose largest magnitude exceeds this are rescaled before squaring."""


def row_scale(x: torch.Tensor) -> torch.Tensor:
    """``1 / max|x_row|`` for rows whose largest magnitude exceeds ``SAFE_MAX``, else 1 (``[..., 1]``)."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True)
    return torch.where(amax > SAFE_MAX, amax.reciprocal(), torch.ones_like(amax))


def l2n(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-wise ``x / max(||x||_2, eps)`` (same rule as ``F.normalize``), without overflow of ``||x||^2``.

    A row whose largest magnitude exceeds ``SAFE_MAX`` is divided by it first (``x / ||x||`` is scale
    invariant; such a row's norm is far above any eps); other rows are computed as ``F.normalize`` does.
    Differentiable (the scale is treated as a constant, which is exact for the scale-invariant result).
    """
    s = row_scale(x)
    xs = x * s
    return xs / xs.norm(dim=-1, keepdim=True).clamp_min(eps * s)


def l2_scale(z2d: torch.Tensor, codebook: torch.Tensor, dtype: torch.dtype,
             max_exponent: int = 32) -> torch.Tensor:
    """0-d ``dtype`` power of two ``t`` so that ``t * z`` and ``t * codebook`` stay below ``2**max_exponent``
    (``SAFE_MAX`` by default): 1 unless their largest magnitude exceeds it (no host sync).
    ``argmax_k 2 <tz, tc_k> - ||tc_k||^2`` is the unscaled argmax; the scores are ``t^2`` times the unscaled
    ones."""
    amax = codebook.detach().abs().amax().to(torch.float64)
    if z2d.numel():
        amax = torch.maximum(amax, z2d.detach().abs().amax().to(torch.float64))
    _, exponent = torch.frexp(amax)  # amax = m * 2**exponent, m in [0.5, 1)
    shift = (exponent - max_exponent).clamp_min(0).to(torch.float64)
    return torch.exp2(-shift).to(dtype)


def unscale_scores(scores: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``scores / t^2``, computed in float64 (a score beyond the range of ``scores``' dtype becomes +-inf)."""
    inv = t.to(torch.float64).reciprocal()
    return (scores.to(torch.float64) * inv * inv).to(scores.dtype)


def prepare_codebook(codebook: torch.Tensor, normalize: bool, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """The codebook as used by the lookup: cast to ``dtype`` and l2-normalised when ``normalize``."""
    cb = codebook.detach().to(dtype)
    return l2n(cb, eps) if normalize else cb


def nearest_code_scores_reference(z2d, codebook, normalize=True, eps=1e-12, chunk_elems=DEFAULT_CHUNK_ELEMS):
    """Indices, chosen codebook rows (as used: normalised when ``normalize``) and best score; no autograd."""
    cdt = acc_dtype(z2d.dtype, codebook.dtype)
    cb = prepare_codebook(codebook, normalize, eps, cdt)
    M, K = z2d.shape[0], cb.shape[0]
    idx = torch.empty(M, dtype=torch.int64, device=z2d.device)
    best = torch.empty(M, dtype=cdt, device=z2d.device)
    if not normalize:  # a common power-of-two scale t (1 unless huge values): same argmax, no overflow
        t = l2_scale(z2d, cb, cdt)
        cb_s = cb * t
        c_sq = (cb_s * cb_s).sum(-1)
    rows = max(1, chunk_elems // max(K, 1))
    for start in range(0, M, rows):
        zc = z2d[start : start + rows].detach().to(cdt)
        if normalize:
            zc = l2n(zc, eps)
            scores = zc @ cb.t()
        else:
            scores = 2.0 * ((zc * t) @ cb_s.t()) - c_sq
        best_c, idx_c = scores.max(dim=1)  # first maximal index on ties (documented by torch)
        best[start : start + rows] = best_c
        idx[start : start + rows] = idx_c
    if not normalize:
        best = unscale_scores(best, t)
    return idx, cb[idx], best


def nearest_code_reference(z2d, codebook, normalize=True, eps=1e-12, chunk_elems=DEFAULT_CHUNK_ELEMS):
    """(indices int64 [M], straight-through z_q [M, d], best similarity [M]) for 2-D ``z2d``.

    ``z_q`` has dtype ``promote_types(z.dtype, codebook.dtype)``; gradient flows to ``z`` through the
    l2-normalisation (straight-through), never to the codebook.
    """
    out_dtype = torch.promote_types(z2d.dtype, codebook.dtype)
    idx, zq, best = nearest_code_scores_reference(z2d, codebook, normalize, eps, chunk_elems)
    return idx, straight_through_reference(z2d, zq.to(out_dtype), normalize, eps), best.to(acc_dtype(out_dtype))


def straight_through_reference(z2d, zq, normalize=True, eps=1e-12):
    """``zq`` (the chosen rows, in the output dtype) with the gradient of ``z_n = l2n(z)`` (``z`` when not
    normalising): the same gradient as ``z_n + (zq - z_n).detach()``, but the value is bit-exactly ``zq``
    (``z_n - z_n.detach() == 0``). The codebook plays no part in it, so the backward needs only ``z``."""
    zx = z2d.to(zq.dtype)
    z_n = l2n(zx, eps) if normalize else zx
    return zq + (z_n - z_n.detach())


# ----------------------------------------------------------------------------------------------------------
# EMA update


def ema_scatter_reference(z2d, indices, num_codes, normalize=True, eps=1e-5, sum_dtype=torch.float32):
    """Per-code counts [K] and sums [K, d] (of l2-normalised rows when ``normalize``) via index_add_.

    Rows of ``z2d`` holding a NaN or inf, and rows whose index is outside ``[0, num_codes)``, are skipped (no
    count, nothing added), without a host sync."""
    zz = z2d.detach().to(sum_dtype)
    ok = torch.isfinite(zz).all(dim=-1) & (indices >= 0) & (indices < num_codes)
    zz = torch.where(ok[:, None], zz, torch.zeros((), dtype=sum_dtype, device=zz.device))
    indices = torch.where(ok, indices, torch.zeros_like(indices))
    if normalize:
        zz = l2n(zz, eps)
    sums = torch.zeros(num_codes, z2d.shape[1], dtype=sum_dtype, device=z2d.device)
    sums.index_add_(0, indices, zz)
    counts = torch.zeros(num_codes, dtype=sum_dtype, device=z2d.device)
    counts.index_add_(0, indices, ok.to(sum_dtype))
    return counts, sums


def ema_finalize_reference(
    codebook, cluster_size, counts, sums, decay, eps, normalize, steps_since_used=None
):
    """In-place: cluster_size EMA on every code; norm-EMA of the codebook rows of used codes only."""
    cdt = acc_dtype(codebook.dtype, sums.dtype)
    used = counts > 0
    cluster_size.mul_(decay).add_(counts.to(cluster_size.dtype), alpha=1.0 - decay)
    mean = sums.to(cdt) / counts.to(cdt).clamp_min(1.0)[:, None]
    cb = codebook.detach().to(cdt)
    if normalize:
        new = l2n(decay * cb + (1.0 - decay) * l2n(mean, eps), eps)
    else:
        new = decay * cb + (1.0 - decay) * mean
    codebook.data.copy_(torch.where(used[:, None], new, cb).to(codebook.dtype))
    if steps_since_used is not None:
        steps_since_used.copy_(torch.where(used, torch.zeros_like(steps_since_used), steps_since_used + 1))
    return used


def ema_update_onehot_reference(
    codebook, cluster_size, z2d, indices, decay=0.99, eps=1e-5, normalize=True, dtype=torch.float64
):
    """Functional one-hot GEMM form (the unilm norm_ema_quantizer way): returns new (codebook, cluster_size).

    Materialises the [M, K] one-hot matrix; used as the independent float64 oracle in the tests and as the
    public-anchor baseline in the bench.
    """
    K = codebook.shape[0]
    zz = z2d.detach().to(dtype)
    if normalize:
        zz = l2n(zz, eps)
    onehot = F.one_hot(indices, K).to(dtype)  # [M, K]
    bins = onehot.sum(0)
    new_cluster = cluster_size.to(dtype) * decay + bins * (1.0 - decay)
    zero = bins == 0
    embed_sum = zz.t() @ onehot  # [d, K]
    mean = (embed_sum / bins.masked_fill(zero, 1.0)[None, :]).t()
    cb = codebook.detach().to(dtype)
    if normalize:
        mean = l2n(mean, eps)
        new = l2n(cb * decay + mean * (1.0 - decay), eps)
    else:
        new = cb * decay + mean * (1.0 - decay)
    new = torch.where(zero[:, None], cb, new)
    return new, new_cluster


# ----------------------------------------------------------------------------------------------------------
# helpers used by every backend


def commitment_loss_reference(z, z_q):
    """``mean((z - z_q.detach())^2)`` -- gradient to ``z`` only."""
    return F.mse_loss(z, z_q.detach().to(z.dtype))


def codebook_usage_reference(indices, num_codes):
    counts = torch.bincount(indices.reshape(-1), minlength=num_codes).to(torch.float64)
    total = counts.sum().clamp_min(1.0)
    p = counts / total
    entropy = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum()
    return {"fraction_used": (counts > 0).to(torch.float64).mean(), "perplexity": entropy.exp()}
