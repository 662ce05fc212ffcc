"""Codebook initialisation by k-means on the first batch (BEiT v2: 10 iterations, cosine).

Cosine k-means (``normalize=True``)::

    x_m = l2n(z_m);  c^0 = x[random sample]      (without replacement when M >= K, with replacement otherwise)
    repeat iters:  a_m = argmax_k <x_m, c_k>     (the fused lookup, kernels.nearest_code)
                   c_k = l2n(sum_{a_m = k} x_m)  for clusters with members; empty clusters keep c_k

With ``normalize=False`` it is plain Euclidean k-means (nearest code by squared distance, c_k = mean).
"""

from __future__ import annotations

import torch

from kernels._checks import FLOAT_DTYPES, acc_dtype, check_finite_tensor, check_int, check_tensor
from kernels.codebook import reference as ref
from kernels.codebook.nearest_code import nearest_code


@torch.no_grad()
def kmeans_init_codebook(
    z, num_codes, iters=10, seed=None, normalize=True, eps=1e-12, generator=None, return_counts=False
):
    """A ``[num_codes, d]`` codebook (float32; float64 for float64 ``z``) from k-means on ``z [..., d]``.

    ``seed`` (int) makes the initial sample reproducible via a private generator on ``z``'s device;
    alternatively pass a ``generator``; with neither, the global RNG is used. With ``return_counts`` it
    returns ``(codebook, counts)``, the cluster sizes of the last assignment (BEiT v2 seeds ``cluster_size``
    with them).
    """
    check_tensor("z", z, dtypes=FLOAT_DTYPES)
    if z.dim() < 1 or z.shape[-1] < 1:
        raise ValueError(f"z must have shape [..., d] with d >= 1, got {tuple(z.shape)}")
    if not isinstance(num_codes, int) or isinstance(num_codes, bool) or num_codes < 1:
        raise ValueError(f"num_codes must be a positive int, got {num_codes!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    if seed is not None:
        check_int("seed", seed)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if z.device.type == "meta":
        raise ValueError("z is a meta tensor: k-means needs its values (pass a real tensor)")
    x = z.detach().reshape(-1, z.shape[-1])
    M = x.shape[0]
    if M == 0:
        raise ValueError("z is empty: k-means needs at least one vector")
    check_finite_tensor("z", x)
    cdt = acc_dtype(x.dtype)
    x = x.to(cdt)
    if normalize:
        x = ref.l2n(x, eps)
    if generator is None and seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(int(seed))
    gdev = generator.device if generator is not None else x.device
    if M >= num_codes:
        pick = torch.randperm(M, generator=generator, device=gdev)[:num_codes]
    else:
        pick = torch.randint(M, (num_codes,), generator=generator, device=gdev)
    centroids = x[pick.to(x.device)].clone()
    counts = torch.zeros(num_codes, dtype=cdt, device=x.device)
    for _ in range(iters):
        idx = nearest_code(x, centroids, normalize=normalize, eps=eps, check_finite=False).indices
        sums = torch.zeros_like(centroids).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=num_codes).to(cdt)
        new = ref.l2n(sums, eps) if normalize else sums / counts.clamp_min(1.0)[:, None]
        centroids = torch.where((counts > 0)[:, None], new, centroids)
    return (centroids, counts) if return_counts else centroids
