"""Custom ops of the VQ-KD codebook kernels (``ssl_kernels::nearest_code_*``, ``codebook_ema_*``).

nearest_code_fwd on ``z [M, d]``, codebook ``c [K, d]`` (``l2n(x) = x / max(||x||, eps)``)::

    normalize:  i = argmax_k <l2n(z), l2n(c_k)>,  z_q = l2n(c)[i]
    otherwise:  i = argmax_k 2 <z, c_k> - ||c_k||^2,  z_q = c[i]          (lowest k on ties)

``z_q``'s gradient is the straight-through one, i.e. that of ``l2n(z)`` (``z`` when not normalising)::

    n = ||z|| > eps:  dz = g / n - z <z, g> / n^3        n <= eps:  dz = g / eps

codebook_ema_scatter / codebook_ema_finalize mutate their state tensors in place (declared in the schema,
so compiled graphs functionalise them); see :mod:`kernels.codebook.ema` for the maths.
"""

# ruff: noqa: UP045
from __future__ import annotations

from typing import Optional  # custom-op schema inference: Optional[Tensor] works on every torch >= 2.11

import torch
from torch import Tensor

from kernels._library import acc_dtype, backend_for, qualname


@torch.library.custom_op(qualname("nearest_code_fwd"), mutates_args=())
def nearest_code_fwd(z: Tensor, codebook: Tensor, normalize: bool, eps: float,
                     precision: str) -> tuple[Tensor, Tensor, Tensor]:
    """(z_q [M, d] in promote(z, codebook), indices int64 [M], similarity [M] float32 / float64).

    z_q comes first so that generic tooling that sums the outputs (opcheck) starts from a float tensor."""
    from kernels.codebook import reference as ref

    out_dtype = torch.promote_types(z.dtype, codebook.dtype)
    if backend_for("nearest_code", z, codebook, normalize, eps, precision) == "triton":
        from kernels.codebook import triton_kernels as tk
        from kernels.codebook.function import resolve_precision

        cdt = ref.compute_dtype(out_dtype)
        cb = ref.prepare_codebook(codebook, normalize, eps, cdt).contiguous()
        dot_dtype, input_precision = resolve_precision(precision, z.dtype, out_dtype)
        cb_dot = cb if dot_dtype == cdt else cb.to(dot_dtype)
        cb_sq = None if normalize else (cb * cb).sum(-1)
        idx, zq, sim = tk.nearest_code_forward(z, cb, cb_dot, cb_sq, normalize, eps, input_precision, out_dtype)
        return zq, idx, sim
    idx, zq, best = ref.nearest_code_scores_reference(z, codebook, normalize, eps)
    return zq.to(out_dtype).contiguous(), idx, best.to(ref.compute_dtype(out_dtype))


@nearest_code_fwd.register_fake
def _(z, codebook, normalize, eps, precision):
    out_dtype = torch.promote_types(z.dtype, codebook.dtype)
    M, d = z.shape
    return (z.new_empty((M, d), dtype=out_dtype), z.new_empty((M,), dtype=torch.int64),
            z.new_empty((M,), dtype=acc_dtype(out_dtype)))


@torch.library.custom_op(qualname("nearest_code_bwd"), mutates_args=())
def nearest_code_bwd(z: Tensor, grad_zq: Tensor, eps: float) -> Tensor:
    """Straight-through gradient through ``l2n(z)`` (normalize=True), in z's dtype, contiguous."""
    if backend_for("nearest_code", z, grad_zq, True, eps, "auto") == "triton":
        from kernels.codebook import triton_kernels as tk

        return tk.nearest_code_backward(z, grad_zq, eps)
    from kernels.codebook import reference as ref

    # d l2n(z) = s (g / n - x (x.g) / n^3) with x = s z, n = ||x|| (s: reference.l2n's overflow-safe row scale)
    ct = acc_dtype(z.dtype, grad_zq.dtype)
    zc, g = z.to(ct), grad_zq.to(ct)
    s = ref.row_scale(zc)
    x = zc * s
    n = x.norm(dim=-1, keepdim=True)
    dz = torch.where(n > eps * s, s * (g / n - x * (x * g).sum(-1, keepdim=True) / n**3), g / eps)
    return dz.to(z.dtype).contiguous()


@nearest_code_bwd.register_fake
def _(z, grad_zq, eps):
    return z.new_empty(z.shape)


def _setup(ctx, inputs, output):
    z, _codebook, normalize, eps, _precision = inputs
    _zq, idx, sim = output
    ctx.save_for_backward(z if normalize else None)
    ctx.normalize, ctx.eps, ctx.z_dtype = normalize, eps, z.dtype
    ctx.mark_non_differentiable(idx, sim)


def _backward(ctx, g_zq, _g_idx, _g_sim):
    if g_zq is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    if not ctx.normalize:
        return g_zq.to(ctx.z_dtype), None, None, None, None
    (z,) = ctx.saved_tensors
    return nearest_code_bwd(z, g_zq, ctx.eps), None, None, None, None


nearest_code_fwd.register_autograd(_backward, setup_context=_setup)


def nearest_code(z, codebook, normalize=True, eps=1e-12, precision="auto", check_finite=True):
    """(indices [...], straight-through z_q [..., d], similarity [...]) through the registered ops; same
    checks as :func:`kernels.nearest_code`."""
    from kernels.codebook.function import NearestCode, validate_lookup

    validate_lookup(z, codebook, precision, check_finite)
    lead, d = z.shape[:-1], z.shape[-1]
    zq, idx, sim = nearest_code_fwd(z.reshape(-1, d), codebook, bool(normalize), float(eps), precision)
    return NearestCode(idx.reshape(lead), zq.reshape(*lead, d), sim.reshape(lead))


# ----------------------------------------------------------------------------------------------------------
# EMA update (in place, no autograd)


@torch.library.custom_op(qualname("codebook_ema_scatter"), mutates_args=("sums", "counts"))
def codebook_ema_scatter(z: Tensor, indices: Tensor, sums: Tensor, counts: Tensor, normalize: bool,
                         eps: float) -> None:
    """``counts[k] = #{i_m = k}``, ``sums[k] = sum_{i_m = k} (l2n(z_m) if normalize else z_m)`` (overwritten)."""
    from kernels._backend import REGISTRY

    REGISTRY["codebook_ema_scatter"].select(z, indices, sums, counts, normalize, eps).fn(
        z, indices, sums, counts, normalize, eps
    )


@codebook_ema_scatter.register_fake
def _(z, indices, sums, counts, normalize, eps):
    return None


@torch.library.custom_op(qualname("codebook_ema_finalize"), mutates_args=("codebook", "cluster_size", "steps"))
def codebook_ema_finalize(codebook: Tensor, cluster_size: Tensor, counts: Tensor, sums: Tensor, decay: float,
                          eps: float, normalize: bool, steps: Optional[Tensor]) -> None:
    """Cluster-size EMA of every code and (norm-)EMA of the used rows, in place; ``steps`` counts unused steps."""
    from kernels._backend import REGISTRY

    args = (codebook, cluster_size, counts, sums, decay, eps, normalize, steps)
    REGISTRY["codebook_ema_finalize"].select(*args).fn(*args)


@codebook_ema_finalize.register_fake
def _(codebook, cluster_size, counts, sums, decay, eps, normalize, steps):
    return None
