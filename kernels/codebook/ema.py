"""EMA codebook update (BEiT v2 norm-EMA) with scatter-add statistics, DDP all-reduce and dead-code restarts.

For one batch of vectors ``z [M, d]`` assigned to codes ``i [M]`` (``l2n(x) = x / max(||x||, eps)``)::

    x_m = l2n(z_m) if normalize else z_m
    n_k = sum_m [i_m = k]          S_k = sum_m [i_m = k] x_m       (scatter-add, no one-hot; then all-reduce)
    cluster_size <- decay * cluster_size + (1 - decay) * n          (every code, as BEiT v2)
    for n_k > 0:  c_k <- l2n(decay * c_k + (1 - decay) * l2n(S_k / n_k))      (normalize=True)
                  c_k <- decay * c_k + (1 - decay) * S_k / n_k                (normalize=False)
    for n_k = 0:  c_k unchanged (bit-exact)
    embed_sum <- S        (the all-reduced batch sums; a state buffer so no [K, d] allocation per step)

Rows of ``z`` holding a NaN or inf are skipped: they count for no code and add nothing to ``S`` (both
backends, no host sync), so one bad batch cannot poison a codebook row; ``check_inputs=True`` raises a
``ValueError`` on them instead. Dead-code restarts draw only finite rows.

The Triton scatter uses atomic adds (fp32 rounding depends on arrival order); with
``torch.use_deterministic_algorithms(True)`` the scatter falls back to ``index_add_`` (deterministic there).

Dead codes (off by default): with ``dead_code_threshold=N`` and a ``steps_since_used [K]`` int64 buffer,
``steps_since_used`` is reset to 0 for used codes and incremented otherwise; codes with
``steps_since_used >= N`` are replaced by random batch vectors ``x_m`` (uniform over rows), their counter is
reset. Under DDP the counts are all-reduced so every rank agrees on which codes are dead, and rank 0's
codebook is then broadcast so the random replacements agree too.
"""

from __future__ import annotations

import torch

from kernels._backend import define_op, same_device_reasons, triton_reasons
from kernels.codebook import reference as ref
from kernels.codebook.function import check_finite_tensor, check_real, check_tensor, host_checks_allowed

ema_scatter_op = define_op(
    "codebook_ema_scatter", "per-code counts and sums of assigned vectors (scatter-add)"
)
ema_finalize_op = define_op("codebook_ema_finalize", "cluster-size EMA + norm-EMA of used codebook rows")


def _triton_scatter_reasons(z2d, indices, sums, counts, normalize, eps):
    reasons = triton_reasons(z2d, indices, sums, counts)
    reasons += same_device_reasons(z=z2d, indices=indices, embed_sum=sums)
    if sums.dtype not in (torch.float32, torch.float64):
        reasons.append(f"embed_sum must be float32/float64 for atomic adds, got {sums.dtype}")
    if not sums.is_contiguous() or not counts.is_contiguous() or not indices.is_contiguous():
        reasons.append("embed_sum, counts and indices must be contiguous for the Triton scatter-add")
    if z2d.shape[1] > 1024:
        reasons.append(f"d={z2d.shape[1]} > 1024")
    if torch.are_deterministic_algorithms_enabled():
        reasons.append("deterministic algorithms are on: the atomic scatter-add is order-dependent")
    return reasons


@ema_scatter_op.register("triton", _triton_scatter_reasons)
def _scatter_triton(z2d, indices, sums, counts, normalize, eps):
    from kernels.codebook import triton_kernels as tk

    torch._foreach_zero_([sums, counts])  # one multi-tensor launch on CUDA instead of two fills
    tk.ema_scatter(z2d, indices, sums, counts, normalize, eps)


@ema_scatter_op.register("reference")
def _scatter_reference(z2d, indices, sums, counts, normalize, eps):
    c, s = ref.ema_scatter_reference(z2d, indices, sums.shape[0], normalize, eps, sums.dtype)
    sums.copy_(s)
    counts.copy_(c)


def _triton_finalize_reasons(codebook, cluster_size, counts, sums, decay, eps, normalize, steps):
    reasons = triton_reasons(codebook, cluster_size, counts, sums, steps)
    state = (codebook, cluster_size, counts, sums) + (() if steps is None else (steps,))
    if not all(t.is_contiguous() for t in state):
        reasons.append("codebook, cluster_size, counts, embed_sum and steps_since_used must be contiguous for the "
                       "in-place Triton update")
    if codebook.shape[1] > 1024:
        reasons.append(f"d={codebook.shape[1]} > 1024")
    return reasons


@ema_finalize_op.register("triton", _triton_finalize_reasons)
def _finalize_triton(codebook, cluster_size, counts, sums, decay, eps, normalize, steps):
    from kernels.codebook import triton_kernels as tk

    tk.ema_finalize(codebook, cluster_size, counts, sums, decay, eps, normalize, steps)


@ema_finalize_op.register("reference")
def _finalize_reference(codebook, cluster_size, counts, sums, decay, eps, normalize, steps):
    ref.ema_finalize_reference(codebook, cluster_size, counts, sums, decay, eps, normalize, steps)


def _dist_group_size(process_group):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_world_size(process_group)


def _validate(
    codebook,
    cluster_size,
    embed_sum,
    z,
    indices,
    decay,
    eps,
    dead_code_threshold,
    steps_since_used,
    check_inputs,
):
    check_tensor("codebook", codebook, dims=2)
    K, d = codebook.shape
    if K == 0:
        raise ValueError(f"codebook is empty: expected shape [K, d] with K >= 1, got {tuple(codebook.shape)}")
    check_tensor("cluster_size", cluster_size, dims=1)
    check_tensor("embed_sum", embed_sum, dims=2)
    check_tensor("z", z)
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64 (as returned by nearest_code), got {indices.dtype!s}")
    if cluster_size.shape[0] != K:
        raise ValueError(f"cluster_size must have shape [K={K}], got {tuple(cluster_size.shape)}")
    if tuple(embed_sum.shape) != (K, d):
        raise ValueError(f"embed_sum must have shape [K={K}, d={d}], got {tuple(embed_sum.shape)}")
    if embed_sum.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"embed_sum must be float32 or float64 (it accumulates sums), got {embed_sum.dtype!s}"
        )
    if z.dim() < 1 or z.shape[-1] != d:
        raise ValueError(f"z must have shape [..., d] with d = codebook.shape[1] = {d}, got {tuple(z.shape)}")
    if indices.numel() != z.numel() // d:
        raise ValueError(
            f"indices must have one entry per row of z ({z.numel() // d}), got {indices.numel()}"
        )
    for name, t in (("cluster_size", cluster_size), ("embed_sum", embed_sum), ("z", z), ("indices", indices)):
        if t.device != codebook.device:
            raise ValueError(f"{name} is on {t.device} but codebook is on {codebook.device}")
    check_real("decay", decay, 0.0, 1.0)
    check_real("eps", eps, 0.0, lo_open=True)
    if dead_code_threshold is not None:
        if (
            not isinstance(dead_code_threshold, int)
            or isinstance(dead_code_threshold, bool)
            or dead_code_threshold < 1
        ):
            raise ValueError(f"dead_code_threshold must be None or an int >= 1, got {dead_code_threshold!r}")
        if steps_since_used is None:
            raise ValueError("dead_code_threshold needs a steps_since_used buffer: int64 tensor of shape [K]")
    if steps_since_used is not None:
        if not isinstance(steps_since_used, torch.Tensor) or steps_since_used.dtype != torch.int64:
            raise TypeError("steps_since_used must be an int64 tensor of shape [K]")
        if tuple(steps_since_used.shape) != (K,) or steps_since_used.device != codebook.device:
            raise ValueError(
                f"steps_since_used must have shape [K={K}] on {codebook.device}, "
                f"got {tuple(steps_since_used.shape)} on {steps_since_used.device}"
            )
    for name, t in (("codebook", codebook), ("cluster_size", cluster_size), ("embed_sum", embed_sum),
                    ("steps_since_used", steps_since_used)):
        if t is not None and any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
            raise ValueError(
                f"{name} is updated in place, so it must not be an expanded view (a stride-0 dimension), got "
                f"shape {tuple(t.shape)} with strides {t.stride()}; pass {name}.clone()"
            )
    if check_inputs and host_checks_allowed(z):  # a host sync: skipped while compiling and on meta tensors
        check_finite_tensor("z", z)
        if indices.numel() and bool(((indices < 0) | (indices >= K)).any()):
            raise ValueError(
                f"indices must lie in [0, K={K}), got values in [{int(indices.min())}, {int(indices.max())}]"
            )


@torch.no_grad()
def ema_codebook_update(
    codebook,
    cluster_size,
    embed_sum,
    z,
    indices,
    decay=0.99,
    eps=1e-5,
    normalize=True,
    dead_code_threshold=None,
    steps_since_used=None,
    generator=None,
    process_group=None,
    check_inputs=True,
):
    """In-place norm-EMA update of ``codebook``, ``cluster_size``, ``embed_sum`` (and ``steps_since_used``).

    Args:
        codebook: ``[K, d]`` float state, updated in place (rows of unused codes untouched).
        cluster_size: ``[K]`` float state, EMA of the per-batch counts.
        embed_sum: ``[K, d]`` float32/float64 state, overwritten with the (all-reduced) batch sums.
        z, indices: the vectors ``[..., d]`` and their int64 code indices ``[...]`` (from ``nearest_code``).
        decay, eps: EMA decay; ``eps`` floors the norm in every l2-normalisation.
        normalize: norm-EMA (BEiT v2) when True, plain mean-EMA when False.
        dead_code_threshold, steps_since_used, generator: dead-code restarts (see module docstring).
        process_group: the DDP group for the all-reduce (default group when torch.distributed is initialised).
        check_inputs: check z is finite and indices in range (one host sync); without it, rows of ``z`` with a
            NaN or inf, and rows whose index is outside ``[0, K)``, are skipped (not counted, not summed) so
            they never reach the codebook (nor memory outside it).

    Returns the per-code counts of this batch ``[K]`` (all-reduced), e.g. for usage logs.
    """
    _validate(
        codebook,
        cluster_size,
        embed_sum,
        z,
        indices,
        decay,
        eps,
        dead_code_threshold,
        steps_since_used,
        check_inputs,
    )
    d = codebook.shape[1]
    z2d = z.detach().reshape(-1, d)
    idx = indices.reshape(-1).contiguous()  # a strided 1-D view stays strided after reshape
    counts = torch.empty(codebook.shape[0], dtype=embed_sum.dtype, device=codebook.device)
    decay, eps, normalize = float(decay), float(eps), bool(normalize)
    compiling = torch.compiler.is_compiling()  # then the registered ops (kernels.library), mutations declared
    if compiling:
        torch.ops.ssl_kernels.codebook_ema_scatter(z2d, idx, embed_sum, counts, normalize, eps)
    else:
        ema_scatter_op(z2d, idx, embed_sum, counts, normalize, eps)
    world = _dist_group_size(process_group)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(counts, group=process_group)
        dist.all_reduce(embed_sum, group=process_group)
    if compiling:
        torch.ops.ssl_kernels.codebook_ema_finalize(codebook, cluster_size, counts, embed_sum, decay, eps, normalize,
                                                    steps_since_used)
    else:
        ema_finalize_op(codebook, cluster_size, counts, embed_sum, decay, eps, normalize, steps_since_used)
    if dead_code_threshold is not None:
        _restart_dead_codes(
            codebook,
            z2d,
            steps_since_used,
            dead_code_threshold,
            normalize,
            eps,
            generator,
            process_group,
            world,
        )
    return counts


def _restart_dead_codes(codebook, z2d, steps, threshold, normalize, eps, generator, process_group, world):
    dead = (steps >= threshold).nonzero().flatten()  # host sync; only when restarts are enabled
    if dead.numel() == 0:  # the same on every rank (counts are all-reduced)
        return
    rows = torch.isfinite(z2d).all(dim=-1).nonzero().flatten()  # restart from finite rows only
    if rows.numel():  # else (an empty or all-NaN batch) keep the dead rows for now, but join the broadcast
        gdev = generator.device if generator is not None else z2d.device
        pick = torch.randint(rows.numel(), (dead.numel(),), generator=generator, device=gdev).to(z2d.device)
        new = z2d[rows[pick]].to(ref.compute_dtype(codebook.dtype))
        if normalize:
            new = ref.l2n(new, eps)
        codebook.data[dead] = new.to(codebook.dtype)
    steps[dead] = 0  # on every rank alike, so that the ranks keep agreeing on the dead set
    if world > 1:
        import torch.distributed as dist

        src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
        dist.broadcast(codebook.data, src=src, group=process_group)
