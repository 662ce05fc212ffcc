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

No autograd (in place, under ``no_grad``). Two steps, each one op with its own backends (``triton``:
``ema_codebook_update_triton.py``; ``reference``: ``reference.py``) and one custom op that mutates its state
in place (declared in the schema, so compiled graphs functionalise it)::

    ssl_kernels::codebook_ema_scatter(z, indices, sums!, counts!, normalize, eps)
    ssl_kernels::codebook_ema_finalize(codebook!, cluster_size!, counts, sums, decay, eps, normalize, steps!)

Eager calls run the same functions without the custom-op dispatch; the DDP all-reduce sits between them.
An eager update ends by bumping the codebook's autograd version counter (``bump_version``), which is what
invalidates the lookup's cached prepared codebook (``nearest_code(..., cache_codebook=True)``).
"""

# ruff: noqa: UP045
from __future__ import annotations

import dataclasses
from typing import Optional  # custom-op schema inference: Optional[Tensor] works on every torch >= 2.11

import torch
from torch import Tensor

from kernels import _buffers
from kernels._backend import define_op, same_device_reasons, triton_reasons
from kernels._checks import (
    FLOAT_DTYPES,
    acc_dtype,
    check_finite_tensor,
    check_real,
    check_same_device,
    check_tensor,
    host_checks_allowed,
)
from kernels._op import custom_op
from kernels.codebook import reference as ref

MAX_TRITON_DIM = 1024

# ----------------------------------------------------------------------------------------------------------
# inputs


@dataclasses.dataclass(frozen=True)
class EmaUpdateInputs:
    """Checked arguments of :func:`ema_codebook_update`: ``z`` as detached ``[M, d]``, ``indices`` as contiguous
    ``[M]``, the scalars as Python floats / bool."""

    codebook: Tensor
    cluster_size: Tensor
    embed_sum: Tensor
    z: Tensor
    indices: Tensor
    decay: float
    eps: float
    normalize: bool
    dead_code_threshold: Optional[int]
    steps_since_used: Optional[Tensor]
    generator: Optional[torch.Generator]
    process_group: object


@dataclasses.dataclass(frozen=True)
class ScatterInputs:
    """``codebook_ema_scatter``'s arguments: ``sums [K, d]`` and ``counts [K]`` are overwritten."""

    z: Tensor
    indices: Tensor
    sums: Tensor
    counts: Tensor
    normalize: bool
    eps: float


@dataclasses.dataclass(frozen=True)
class FinalizeInputs:
    """``codebook_ema_finalize``'s arguments: ``codebook``, ``cluster_size`` and ``steps`` are updated in place."""

    codebook: Tensor
    cluster_size: Tensor
    counts: Tensor
    sums: Tensor
    decay: float
    eps: float
    normalize: bool
    steps: Optional[Tensor]

    @property
    def args(self) -> tuple:
        return (self.codebook, self.cluster_size, self.counts, self.sums, self.decay, self.eps, self.normalize,
                self.steps)


def _check_in_place(**state) -> None:
    for name, t in state.items():
        if t is not None and any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
            raise ValueError(
                f"{name} is updated in place, so it must not be an expanded view (a stride-0 dimension), got "
                f"shape {tuple(t.shape)} with strides {t.stride()}; pass {name}.clone()"
            )


def validate(codebook, cluster_size, embed_sum, z, indices, decay=0.99, eps=1e-5, normalize=True,
             dead_code_threshold=None, steps_since_used=None, generator=None, process_group=None,
             check_inputs=True) -> EmaUpdateInputs:
    check_tensor("codebook", codebook, ndim=2, dtypes=FLOAT_DTYPES)
    K, d = codebook.shape
    if K == 0:
        raise ValueError(f"codebook is empty: expected shape [K, d] with K >= 1, got {tuple(codebook.shape)}")
    check_tensor("cluster_size", cluster_size, ndim=1, dtypes=FLOAT_DTYPES)
    check_tensor("embed_sum", embed_sum, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("z", z, dtypes=FLOAT_DTYPES)
    check_tensor("indices", indices)
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64 (as returned by nearest_code), got {indices.dtype!s}")
    if cluster_size.shape[0] != K:
        raise ValueError(f"cluster_size must have shape [K={K}], got {tuple(cluster_size.shape)}")
    if tuple(embed_sum.shape) != (K, d):
        raise ValueError(f"embed_sum must have shape [K={K}, d={d}], got {tuple(embed_sum.shape)}")
    if embed_sum.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"embed_sum must be float32 or float64 (it accumulates sums), got {embed_sum.dtype!s}")
    if z.dim() < 1 or z.shape[-1] != d:
        raise ValueError(f"z must have shape [..., d] with d = codebook.shape[1] = {d}, got {tuple(z.shape)}")
    if indices.numel() != z.numel() // d:
        raise ValueError(f"indices must have one entry per row of z ({z.numel() // d}), got {indices.numel()}")
    check_same_device(codebook=codebook, cluster_size=cluster_size, embed_sum=embed_sum, z=z, indices=indices)
    decay = check_real("decay", decay, 0.0, 1.0)
    eps = check_real("eps", eps, 0.0, lo_open=True)
    if dead_code_threshold is not None:
        threshold = dead_code_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
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
    _check_in_place(codebook=codebook, cluster_size=cluster_size, embed_sum=embed_sum,
                    steps_since_used=steps_since_used)
    if check_inputs and host_checks_allowed(z):  # a host sync: skipped while compiling and on meta tensors
        check_finite_tensor("z", z)
        if indices.numel() and bool(((indices < 0) | (indices >= K)).any()):
            raise ValueError(
                f"indices must lie in [0, K={K}), got values in [{int(indices.min())}, {int(indices.max())}]"
            )
    return EmaUpdateInputs(
        codebook, cluster_size, embed_sum, z.detach().reshape(-1, d),
        indices.reshape(-1).contiguous(),  # a strided 1-D view stays strided after reshape
        decay, eps, bool(normalize), dead_code_threshold, steps_since_used, generator, process_group,
    )


# ----------------------------------------------------------------------------------------------------------
# backends

SCATTER = define_op("codebook_ema_scatter", doc="per-code counts and sums of assigned vectors (scatter-add)")
FINALIZE = define_op("codebook_ema_finalize", doc="cluster-size EMA + norm-EMA of used codebook rows")


def _triton_scatter_not_supported(i: ScatterInputs) -> list[str]:
    reasons = triton_reasons(i.z, i.indices, i.sums, i.counts)
    reasons += same_device_reasons(z=i.z, indices=i.indices, embed_sum=i.sums)
    if i.sums.dtype not in (torch.float32, torch.float64):
        reasons.append(f"embed_sum must be float32/float64 for atomic adds, got {i.sums.dtype}")
    if not i.sums.is_contiguous() or not i.counts.is_contiguous() or not i.indices.is_contiguous():
        reasons.append("embed_sum, counts and indices must be contiguous for the Triton scatter-add")
    if i.z.shape[1] > MAX_TRITON_DIM:
        reasons.append(f"d={i.z.shape[1]} > {MAX_TRITON_DIM}")
    if torch.are_deterministic_algorithms_enabled():
        reasons.append("deterministic algorithms are on: the atomic scatter-add is order-dependent")
    return reasons


@SCATTER.register("triton", _triton_scatter_not_supported)
def _scatter_triton(i: ScatterInputs) -> None:
    from kernels.codebook.ema_codebook_update_triton import ema_scatter

    torch._foreach_zero_([i.sums, i.counts])  # one multi-tensor launch on CUDA instead of two fills
    ema_scatter(i.z, i.indices, i.sums, i.counts, i.normalize, i.eps)


@SCATTER.register("reference")
def _scatter_reference(i: ScatterInputs) -> None:
    counts, sums = ref.ema_scatter_reference(i.z, i.indices, i.sums.shape[0], i.normalize, i.eps, i.sums.dtype)
    i.sums.copy_(sums)
    i.counts.copy_(counts)


def _triton_finalize_not_supported(i: FinalizeInputs) -> list[str]:
    reasons = triton_reasons(i.codebook, i.cluster_size, i.counts, i.sums, i.steps)
    state = (i.codebook, i.cluster_size, i.counts, i.sums) + (() if i.steps is None else (i.steps,))
    if not all(t.is_contiguous() for t in state):
        reasons.append("codebook, cluster_size, counts, embed_sum and steps_since_used must be contiguous for the "
                       "in-place Triton update")
    if i.codebook.shape[1] > MAX_TRITON_DIM:
        reasons.append(f"d={i.codebook.shape[1]} > {MAX_TRITON_DIM}")
    return reasons


@FINALIZE.register("triton", _triton_finalize_not_supported)
def _finalize_triton(i: FinalizeInputs) -> None:
    from kernels.codebook.ema_codebook_update_triton import ema_finalize

    ema_finalize(*i.args)


@FINALIZE.register("reference")
def _finalize_reference(i: FinalizeInputs) -> None:
    ref.ema_finalize_reference(*i.args)


# ----------------------------------------------------------------------------------------------------------
# the two in-place steps, each one custom op (no autograd)


def _scatter(z: Tensor, indices: Tensor, sums: Tensor, counts: Tensor, normalize: bool, eps: float) -> None:
    """``counts[k] = #{i_m = k}``, ``sums[k] = sum_{i_m = k} (l2n(z_m) if normalize else z_m)`` (overwritten)."""
    i = ScatterInputs(z, indices, sums, counts, normalize, eps)
    SCATTER.select(i).fn(i)


def _finalize(codebook: Tensor, cluster_size: Tensor, counts: Tensor, sums: Tensor, decay: float, eps: float,
              normalize: bool, steps: Optional[Tensor]) -> None:
    """Cluster-size EMA of every code and (norm-)EMA of the used rows, in place; ``steps`` counts unused steps."""
    i = FinalizeInputs(codebook, cluster_size, counts, sums, decay, eps, normalize, steps)
    FINALIZE.select(i).fn(i)


scatter_op = custom_op("codebook_ema_scatter", _scatter, mutates_args=("sums", "counts"))
finalize_op = custom_op("codebook_ema_finalize", _finalize, mutates_args=("codebook", "cluster_size", "steps"))


@scatter_op.register_fake
def _(z, indices, sums, counts, normalize, eps):
    return None


@finalize_op.register_fake
def _(codebook, cluster_size, counts, sums, decay, eps, normalize, steps):
    return None


# ----------------------------------------------------------------------------------------------------------
# public API


def _dist_group_size(process_group) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_world_size(process_group)


@torch.no_grad()
def ema_codebook_update(codebook, cluster_size, embed_sum, z, indices, decay=0.99, eps=1e-5, normalize=True,
                        dead_code_threshold=None, steps_since_used=None, generator=None, process_group=None,
                        check_inputs=True):
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
    i = validate(codebook, cluster_size, embed_sum, z, indices, decay, eps, normalize, dead_code_threshold,
                 steps_since_used, generator, process_group, check_inputs)
    counts = _buffers.empty((codebook.shape[0],), embed_sum.dtype, codebook.device)
    compiling = torch.compiler.is_compiling()  # then the custom ops: opaque nodes, mutations declared
    (scatter_op if compiling else _scatter)(i.z, i.indices, embed_sum, counts, i.normalize, i.eps)
    world = _dist_group_size(process_group)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(counts, group=process_group)
        dist.all_reduce(embed_sum, group=process_group)
    (finalize_op if compiling else _finalize)(codebook, cluster_size, counts, embed_sum, i.decay, i.eps, i.normalize,
                                              steps_since_used)
    if dead_code_threshold is not None:
        _restart_dead_codes(i, world)
    if not compiling:
        bump_version(codebook)
    return counts


def bump_version(codebook: Tensor) -> None:
    """Mark ``codebook`` as changed for the lookup's prepared-codebook cache (``nearest_code``'s
    ``cache_codebook``): the Triton kernels, ``.data`` writes and NCCL broadcasts bypass autograd's version
    counter, so the update bumps it once at its end (eager calls; compiled graphs never use the cache)."""
    if not codebook.is_inference():
        torch.autograd.graph.increment_version(codebook)


def _restart_dead_codes(i: EmaUpdateInputs, world: int) -> None:
    codebook, steps = i.codebook, i.steps_since_used
    dead = (steps >= i.dead_code_threshold).nonzero().flatten()  # host sync; only when restarts are enabled
    if dead.numel() == 0:  # the same on every rank (counts are all-reduced)
        return
    rows = torch.isfinite(i.z).all(dim=-1).nonzero().flatten()  # restart from finite rows only
    if rows.numel():  # else (an empty or all-NaN batch) keep the dead rows for now, but join the broadcast
        gdev = i.generator.device if i.generator is not None else i.z.device
        pick = torch.randint(rows.numel(), (dead.numel(),), generator=i.generator, device=gdev).to(i.z.device)
        new = i.z[rows[pick]].to(acc_dtype(codebook.dtype))
        if i.normalize:
            new = ref.l2n(new, i.eps)
        codebook.data[dead] = new.to(codebook.dtype)
    steps[dead] = 0  # on every rank alike, so that the ranks keep agreeing on the dead set
    if world > 1:
        import torch.distributed as dist

        src = dist.get_global_rank(i.process_group, 0) if i.process_group is not None else 0
        dist.broadcast(codebook.data, src=src, group=i.process_group)
