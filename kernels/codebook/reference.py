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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_ELEMS = 1 << 24


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def l2n(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-wise ``x / max(||x||_2, eps)`` (same rule as ``F.normalize``)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def prepare_codebook(codebook: torch.Tensor, normalize: bool, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """The codebook as used by the lookup: cast to ``dtype`` and l2-normalised when ``normalize``."""
    cb = codebook.detach().to(dtype)
    return l2n(cb, eps) if normalize else cb


def nearest_code_scores_reference(z2d, codebook, normalize=True, eps=1e-12, chunk_elems=DEFAULT_CHUNK_ELEMS):
    """Indices, chosen codebook rows (as used: normalised when ``normalize``) and best score; no autograd."""
    cdt = compute_dtype(z2d.dtype, codebook.dtype)
    cb = prepare_codebook(codebook, normalize, eps, cdt)
    M, K = z2d.shape[0], cb.shape[0]
    idx = torch.empty(M, dtype=torch.int64, device=z2d.device)
    best = torch.empty(M, dtype=cdt, device=z2d.device)
    c_sq = (cb * cb).sum(-1) if not normalize else None
    rows = max(1, chunk_elems // max(K, 1))
    for start in range(0, M, rows):
        zc = z2d[start : start + rows].detach().to(cdt)
        if normalize:
            zc = l2n(zc, eps)
            scores = zc @ cb.t()
        else:
            scores = 2.0 * (zc @ cb.t()) - c_sq
        best_c, idx_c = scores.max(dim=1)  # first maximal index on ties (documented by torch)
        best[start : start + rows] = best_c
        idx[start : start + rows] = idx_c
    return idx, cb[idx], best


def nearest_code_reference(z2d, codebook, normalize=True, eps=1e-12, chunk_elems=DEFAULT_CHUNK_ELEMS):
    """(indices int64 [M], straight-through z_q [M, d], best similarity [M]) for 2-D ``z2d``.

    ``z_q`` has dtype ``promote_types(z.dtype, codebook.dtype)``; gradient flows to ``z`` through the
    l2-normalisation (straight-through), never to the codebook.
    """
    out_dtype = torch.promote_types(z2d.dtype, codebook.dtype)
    idx, zq, best = nearest_code_scores_reference(z2d, codebook, normalize, eps, chunk_elems)
    zx = z2d.to(out_dtype)
    z_n = F.normalize(zx, dim=-1, eps=eps) if normalize else zx
    # same gradient as z_n + (z_q - z_n).detach(), but the value is bit-exactly z_q (z_n - z_n.detach() == 0)
    z_q_st = zq.to(out_dtype) + (z_n - z_n.detach())
    return idx, z_q_st, best.to(compute_dtype(out_dtype))


# ----------------------------------------------------------------------------------------------------------
# EMA update


def ema_scatter_reference(z2d, indices, num_codes, normalize=True, eps=1e-5, sum_dtype=torch.float32):
    """Per-code counts [K] and sums [K, d] (of l2-normalised rows when ``normalize``) via index_add_."""
    zz = z2d.detach().to(sum_dtype)
    if normalize:
        zz = l2n(zz, eps)
    sums = torch.zeros(num_codes, z2d.shape[1], dtype=sum_dtype, device=z2d.device)
    sums.index_add_(0, indices, zz)
    counts = torch.zeros(num_codes, dtype=sum_dtype, device=z2d.device)
    counts.index_add_(0, indices, torch.ones_like(indices, dtype=sum_dtype))
    return counts, sums


def ema_finalize_reference(
    codebook, cluster_size, counts, sums, decay, eps, normalize, steps_since_used=None
):
    """In-place: cluster_size EMA on every code; norm-EMA of the codebook rows of used codes only."""
    cdt = compute_dtype(codebook.dtype, sums.dtype)
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
