"""VQ-KD codebook ops: fused nearest-code lookup (Triton under the interpreter vs the reference),
straight-through gradients, EMA update vs a one-hot float64 oracle, k-means init, usage stats,
VectorQuantizer."""

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, assert_close, poison

from kernels import (
    VectorQuantizer,
    codebook_usage,
    commitment_loss,
    ema_codebook_update,
    kmeans_init_codebook,
    nearest_code,
    use_backend,
)
from kernels.codebook import reference as ref

BACKENDS = ["triton", "reference"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# unit roundoff of the score-GEMM operands (the Triton interpreter truncates fp32 -> bf16: one full ulp)
OPERAND_ROUNDOFF = {
    torch.float64: 1e-13,
    torch.float32: 1e-6,
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-10,
}


def _lookup_tolerance(x, cb_used, dtype, normalize):
    """Per-row bound on the score error from rounding both GEMM operands: 2u ||x|| max||c||.

    Doubled for the L2 score (2 <x, c> - ||c||^2)."""
    u = OPERAND_ROUNDOFF[dtype]
    bound = 2 * u * x.norm(dim=-1) * cb_used.norm(dim=-1).max()
    return (bound * (1 if normalize else 2) + TOLERANCES[dtype][0]).to(torch.float64)


def _exact_scores(z, codebook, normalize, eps=1e-12):
    x = z.detach().reshape(-1, z.shape[-1]).to(torch.float64)
    cb = ref.prepare_codebook(codebook, normalize, eps, torch.float64)
    if normalize:
        x = ref.l2n(x, eps)
        return x, cb, x @ cb.t()
    return x, cb, 2 * x @ cb.t() - (cb * cb).sum(-1)


def _check_lookup(z, codebook, normalize, indices, z_q, sim, dtype):
    x, cb64, scores = _exact_scores(z, codebook, normalize)
    flat_idx = indices.reshape(-1)
    assert flat_idx.dtype == torch.int64 and (flat_idx >= 0).all() and (flat_idx < codebook.shape[0]).all()
    top2 = scores.topk(min(2, scores.shape[1]), dim=1).values
    tol = _lookup_tolerance(x, cb64, dtype, normalize)
    chosen = scores.gather(1, flat_idx[:, None]).squeeze(1)
    # the chosen code is never worse than the best by more than the rounding bound ...
    assert (chosen >= top2[:, 0] - tol).all(), (
        f"chosen similarity below best by {(top2[:, 0] - chosen).max():.3g}"
    )
    # ... and where the best is separated from the runner-up by more than that bound, it is the argmax
    if scores.shape[1] > 1:
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tol
        assert clear.float().mean() > 0.5, "test data has too many near-ties to be meaningful"
        assert torch.equal(flat_idx[clear], scores.argmax(1)[clear])
    # z_q is exactly the (normalised) codebook row as used by the op, in the promoted dtype
    out_dtype = torch.promote_types(z.dtype, codebook.dtype)
    cdt = ref.compute_dtype(out_dtype)
    cb_used = ref.prepare_codebook(codebook, normalize, 1e-12, cdt)
    assert z_q.dtype == out_dtype
    assert torch.equal(z_q.detach().reshape(-1, z.shape[-1]), cb_used[flat_idx].to(out_dtype))
    # the reported similarity is the exact score of the chosen code (fp32/fp64 accumulation)
    assert sim.dtype == cdt
    assert_close(
        sim.reshape(-1),
        chosen,
        dtype=cdt,
        atol=1e-5 if cdt == torch.float32 else 1e-10,
        rtol=1e-5 if cdt == torch.float32 else 1e-10,
        name="similarity",
    )


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "l2"])
@pytest.mark.parametrize("d", [32, 13])
def test_lookup_forward_backward_vs_reference(backend, dtype, normalize, d, device):
    M, K = 777, 1000
    codebook = torch.randn(K, d, dtype=torch.float64)
    if normalize:
        codebook = F.normalize(codebook, dim=-1)
    codebook = codebook.to(dtype)
    # 2/3 of the rows near a code (clear winners even in bf16), 1/3 random (many near-ties)
    base = torch.randn(M, 2 * d, dtype=torch.float64)
    near = torch.randint(0, K, (2 * M // 3,))
    base[: near.numel(), ::2] = 2.0 * codebook[near].to(torch.float64) + 0.3 * base[: near.numel(), ::2]
    codebook = codebook.to(device)
    z = base.to(device, dtype)[:, ::2]  # non-contiguous rows and columns
    assert not z.is_contiguous()
    z = z.detach().requires_grad_(True)
    zr = z.detach().clone().requires_grad_(True)
    with use_backend(backend, op="nearest_code"):
        idx, z_q, sim = nearest_code(z, codebook, normalize)
    _check_lookup(z, codebook, normalize, idx, z_q, sim, dtype)

    # straight-through gradient: identical to autograd of F.normalize on the reference path
    g = torch.randn(M, d, dtype=torch.float64).to(device, z_q.dtype)
    (z_q * g).sum().backward()
    _, zq_ref, _ = ref.nearest_code_reference(zr, codebook, normalize)
    (zq_ref * g).sum().backward()
    assert z.grad.dtype == dtype
    assert_close(z.grad, zr.grad, dtype=dtype, name="dz")
    if dtype == torch.float64 and normalize:
        # and equal to the analytic projection (g - x <x, g>) / ||z|| in float64
        zz = z.detach()
        n = zz.norm(dim=-1, keepdim=True)
        x = zz / n
        expected = (g - x * (x * g).sum(-1, keepdim=True)) / n
        assert_close(z.grad, expected, dtype=torch.float64, name="dz analytic")


@pytest.mark.interpreter
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "l2"])
def test_triton_launcher_writes_every_output(normalize, device):
    """Call the launchers directly on NaN/sentinel-poisoned buffers: every element must be written."""
    from kernels.codebook import triton_kernels as tk

    M, K, d = 301, 333, 13
    z = torch.randn(M, d, device=device)
    cb = ref.prepare_codebook(torch.randn(K, d, device=device), normalize, 1e-12, torch.float32).contiguous()
    cb_sq = None if normalize else (cb * cb).sum(-1)
    out = tuple(
        poison(torch.empty(shape, dtype=dt, device=device))
        for shape, dt in (((M,), torch.int64), ((M, d), torch.float32), ((M,), torch.float32))
    )
    idx, zq, sim = tk.nearest_code_forward(z, cb, cb, cb_sq, normalize, 1e-12, "ieee", torch.float32, out=out)
    ridx, _, rsim = ref.nearest_code_scores_reference(z, cb, normalize)
    assert torch.equal(idx, ridx)
    assert torch.equal(zq, cb[idx])
    assert_close(sim, rsim, dtype=torch.float32, name="similarity")
    g = torch.randn(M, d, device=device)
    gz = tk.nearest_code_backward(z, g, 1e-12, out=poison(torch.empty(M, d, device=device)))
    zr = z.clone().requires_grad_(True)
    F.normalize(zr, dim=-1, eps=1e-12).backward(g)
    assert_close(gz, zr.grad, dtype=torch.float32, name="dz")


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "l2"])
@pytest.mark.parametrize("K", [300, 256], ids=["ragged_K", "even_K"])
def test_ties_resolve_to_lowest_index(backend, normalize, K, device):
    d = 13
    codebook = F.normalize(torch.randn(K, d), dim=-1)
    # duplicates of code 7 inside the same 128-wide tile (60) and in later tiles (135 at the same tile
    # position as 7, 150, K-1)
    for j in (60, 135, 150, K - 1):
        codebook[j] = codebook[7]
    # z points at code 7 (slightly perturbed, still nearest), plus rows equidistant to everything
    z = torch.cat([3 * codebook[7] + 1e-3 * torch.randn(50, d), codebook[150:151].expand(5, d)]).to(device)
    codebook = codebook.to(device)
    with use_backend(backend, op="nearest_code"):
        idx = nearest_code(z, codebook, normalize).indices
    assert (idx == 7).all(), idx
    # an all-identical codebook: every row must pick code 0
    same = codebook[3:4].expand(K, d).contiguous()
    with use_backend(backend, op="nearest_code"):
        idx = nearest_code(torch.randn(40, d, device=device), same, normalize).indices
    assert (idx == 0).all()


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_mixed_dtypes_and_empty(backend, device):
    codebook = F.normalize(torch.randn(257, 32), dim=-1)  # fp32 codebook, bf16 activations (autocast case)
    near = codebook[torch.randint(0, 257, (3, 67))]
    z = (2 * near + 0.3 * torch.randn(3, 67, 32)).to(device, torch.bfloat16).requires_grad_(True)
    codebook = codebook.to(device)
    with use_backend(backend, op="nearest_code"):
        idx, z_q, sim = nearest_code(z, codebook)
    assert idx.shape == (3, 67) and z_q.shape == (3, 67, 32) and sim.shape == (3, 67)
    assert z_q.dtype == torch.float32
    _check_lookup(z, codebook, True, idx, z_q, sim, torch.bfloat16)
    z_q.sum().backward()
    assert z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad.float()).all()
    with use_backend(backend, op="nearest_code"):
        e_idx, e_zq, e_sim = nearest_code(torch.randn(0, 5, 32, device=device), codebook)
    assert e_idx.shape == (0, 5) and e_zq.shape == (0, 5, 32) and e_sim.shape == (0, 5)


def test_cpu_default_is_reference_and_zero_norm_rows():
    from kernels.codebook.function import nearest_code_op

    z = torch.randn(9, 13)
    z[2] = 0.0  # zero row: F.normalize semantics (x / eps) -> all scores 0 -> lowest index
    codebook = torch.randn(21, 13)
    assert nearest_code_op.select(z, codebook, True, 1e-12, "auto").backend == "reference"
    idx, _, sim = nearest_code(z, codebook)
    assert idx[2] == 0 and sim[2] == 0


def test_bad_inputs_raise_clear_errors():
    cb = torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"z must have shape \[\.\.\., d\] with d = codebook.shape\[1\] = 8"):
        nearest_code(torch.randn(4, 7), cb)
    with pytest.raises(ValueError, match="codebook is empty"):
        nearest_code(torch.randn(4, 8), torch.randn(0, 8))
    with pytest.raises(ValueError, match="codebook must be 2-D"):
        nearest_code(torch.randn(4, 8), torch.randn(8))
    with pytest.raises(TypeError, match="z must be float16, bfloat16, float32 or float64, got int64"):
        nearest_code(torch.ones(4, 8, dtype=torch.int64), cb)
    with pytest.raises(TypeError, match="codebook must be a torch.Tensor"):
        nearest_code(torch.randn(4, 8), [[1.0] * 8])
    z = torch.randn(4, 8)
    z[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"z contains 1 non-finite value\(s\)"):
        nearest_code(z, cb)
    bad_cb = cb.clone()
    bad_cb[0, 0] = float("inf")
    with pytest.raises(ValueError, match="codebook contains 1 non-finite"):
        nearest_code(torch.randn(4, 8), bad_cb)
    with pytest.raises(ValueError, match="precision must be one of"):
        nearest_code(torch.randn(4, 8), cb, precision="int8")
    with pytest.raises(ValueError, match="same shape"):
        commitment_loss(torch.randn(4, 8), torch.randn(4, 7))

    state = {"codebook": cb.clone(), "cluster_size": torch.zeros(10), "embed_sum": torch.zeros(10, 8)}
    zz, ii = torch.randn(6, 8), torch.randint(0, 10, (6,))
    with pytest.raises(TypeError, match="indices must be int64"):
        ema_codebook_update(**state, z=zz, indices=ii.int())
    with pytest.raises(ValueError, match=r"indices must lie in \[0, K=10\)"):
        ema_codebook_update(**state, z=zz, indices=ii + 5)
    with pytest.raises(ValueError, match="one entry per row of z"):
        ema_codebook_update(**state, z=zz, indices=ii[:5])
    with pytest.raises(ValueError, match=r"z must have shape \[\.\.\., d\]"):
        ema_codebook_update(**state, z=torch.randn(6, 9), indices=ii)
    with pytest.raises(ValueError, match="cluster_size must have shape"):
        ema_codebook_update(cb.clone(), torch.zeros(9), torch.zeros(10, 8), zz, ii)
    with pytest.raises(TypeError, match="embed_sum must be float32 or float64"):
        ema_codebook_update(cb.clone(), torch.zeros(10), torch.zeros(10, 8, dtype=torch.bfloat16), zz, ii)
    with pytest.raises(ValueError, match="decay must lie in"):
        ema_codebook_update(**state, z=zz, indices=ii, decay=1.5)
    with pytest.raises(ValueError, match="needs a steps_since_used buffer"):
        ema_codebook_update(**state, z=zz, indices=ii, dead_code_threshold=3)
    zz[0, 0] = float("nan")
    with pytest.raises(ValueError, match="z contains 1 non-finite"):
        ema_codebook_update(**state, z=zz, indices=ii)
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        codebook_usage(torch.rand(5), 10)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, num_codes=10\)"):
        codebook_usage(torch.tensor([0, 10]), 10)
    with pytest.raises(ValueError, match="num_codes must be a positive int"):
        kmeans_init_codebook(torch.randn(5, 8), 0)


# ----------------------------------------------------------------------------------------------------------
# EMA update


def _ema_state(K, d, dtype, normalize):
    cb = torch.randn(K, d, dtype=torch.float64)
    if normalize:
        cb = F.normalize(cb, dim=-1)
    return cb.to(dtype), torch.rand(K, dtype=torch.float64).to(dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm_ema", "mean_ema"])
def test_ema_update_matches_onehot_float64(backend, dtype, normalize, device):
    K, d, M = 1000, 13, 777
    codebook, cluster = (t.to(device) for t in _ema_state(K, d, dtype, normalize))
    z = torch.randn(M, 2 * d, dtype=dtype, device=device)[:, ::2]  # non-contiguous
    # half the codes unused (they keep their value); a strided view, as a column of a larger index tensor
    indices = torch.randint(0, K // 2, (M, 3), device=device)[:, 1]
    indices[:50] = 3  # a heavily used code (many atomic adds on one row)
    expected_cb, expected_cluster = ref.ema_update_onehot_reference(
        codebook, cluster, z, indices, 0.9, 1e-5, normalize
    )
    cb, cl = codebook.clone(), cluster.clone()
    embed_sum = poison(torch.empty(K, d, dtype=dtype, device=device))
    steps = torch.full((K,), 4, dtype=torch.int64, device=device)
    with use_backend(backend):
        counts = ema_codebook_update(
            cb, cl, embed_sum, z, indices, decay=0.9, eps=1e-5, normalize=normalize, steps_since_used=steps
        )
    onehot = F.one_hot(indices, K).to(torch.float64)
    assert_close(counts, onehot.sum(0).to(dtype), dtype=dtype, name="counts")
    x = z.to(torch.float64)
    x = ref.l2n(x, 1e-5) if normalize else x
    assert_close(embed_sum, onehot.t() @ x, dtype=dtype, name="embed_sum")
    assert_close(cb, expected_cb, dtype=dtype, name="codebook")
    assert_close(cl, expected_cluster, dtype=dtype, name="cluster_size")
    unused = onehot.sum(0) == 0
    assert torch.equal(cb[unused], codebook[unused]), "unused codes must keep their exact value"
    assert torch.equal(steps, torch.where(unused, 5, 0))
    if normalize:
        assert_close(
            cb.to(torch.float64).norm(dim=-1),
            torch.ones(K, dtype=torch.float64, device=device),
            dtype=dtype,
            name="|c|",
        )


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_low_precision_codebook(backend, device):
    K, d, M = 97, 32, 301
    codebook, cluster = (t.to(device) for t in _ema_state(K, d, torch.bfloat16, True))
    z = torch.randn(M, d, dtype=torch.bfloat16, device=device)
    indices = torch.randint(0, K, (M,), device=device)
    expected_cb, expected_cluster = ref.ema_update_onehot_reference(codebook, cluster, z, indices)
    cb, cl = codebook.clone(), cluster.clone()
    with use_backend(backend):
        ema_codebook_update(cb, cl, torch.zeros(K, d, device=device), z, indices)
    assert_close(cb, expected_cb, dtype=torch.bfloat16, name="codebook")
    assert_close(cl, expected_cluster, dtype=torch.bfloat16, name="cluster_size")


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_codes_are_restarted_from_batch_vectors(backend, device):
    K, d = 64, 13
    codebook = F.normalize(torch.randn(K, d, device=device), dim=-1)
    cluster, embed_sum = torch.zeros(K, device=device), torch.zeros(K, d, device=device)
    steps = torch.zeros(K, dtype=torch.int64, device=device)
    z = torch.randn(100, d, device=device)
    indices = torch.randint(0, 8, (100,), device=device)  # only codes 0..7 used
    before = codebook.clone()
    gen = torch.Generator().manual_seed(0)
    with use_backend(backend):
        ema_codebook_update(
            codebook,
            cluster,
            embed_sum,
            z,
            indices,
            dead_code_threshold=2,
            steps_since_used=steps,
            generator=gen,
        )
        assert torch.equal(codebook[8:], before[8:]) and (steps[8:] == 1).all()  # not yet dead
        ema_codebook_update(
            codebook,
            cluster,
            embed_sum,
            z,
            indices,
            dead_code_threshold=2,
            steps_since_used=steps,
            generator=gen,
        )
    assert (steps == 0).all()
    x = F.normalize(z, dim=-1)
    # every restarted code is exactly one of the (normalised) batch vectors
    match = (codebook[8:, None, :] - x[None]).abs().amax(-1).min(1).values
    assert (match < 1e-6).all()
    assert not torch.equal(codebook[8:], before[8:])


def test_deterministic_mode_avoids_the_atomic_scatter(device):
    from kernels.codebook.ema import ema_scatter_op

    z, idx = torch.randn(5, 4, device=device), torch.zeros(5, dtype=torch.int64, device=device)
    sums, counts = torch.zeros(3, 4, device=device), torch.zeros(3, device=device)
    with use_backend("triton", op="codebook_ema_scatter"):
        assert ema_scatter_op.not_supported_reasons("triton", z, idx, sums, counts, True, 1e-5) == []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with use_backend("triton", op="codebook_ema_scatter"):
            reasons = ema_scatter_op.not_supported_reasons("triton", z, idx, sums, counts, True, 1e-5)
        assert any("deterministic" in r for r in reasons), reasons
    finally:
        torch.use_deterministic_algorithms(previous)


def _ddp_worker(rank, world, init_file, z, indices, state, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        codebook, cluster, embed_sum = (t.clone() for t in state)
        rows = z.shape[0] // world
        sl = slice(rank * rows, (rank + 1) * rows)
        counts = ema_codebook_update(codebook, cluster, embed_sum, z[sl], indices[sl])
        if rank == 0:
            torch.save((codebook, cluster, embed_sum, counts), out_file)
    finally:
        dist.destroy_process_group()


def test_ema_ddp_all_reduce_equals_single_process():
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    K, d, M = 50, 13, 120
    state = (F.normalize(torch.randn(K, d), dim=-1), torch.rand(K), torch.zeros(K, d))
    z, indices = torch.randn(M, d), torch.randint(0, K, (M,))
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")
        mp.spawn(_ddp_worker, args=(2, init_file, z, indices, state, out_file), nprocs=2, join=True)
        got = torch.load(out_file)
    single = [t.clone() for t in state]
    counts = ema_codebook_update(*single, z, indices)
    for a, e, name in zip(got, (*single, counts), ("codebook", "cluster_size", "embed_sum", "counts")):
        assert_close(a, e, dtype=torch.float32, name=name)


# ----------------------------------------------------------------------------------------------------------
# k-means, usage, commitment loss, VectorQuantizer


def _clustered(num_clusters, per_cluster, d, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_clusters, d, generator=g), dim=-1)
    z = centres.repeat_interleave(per_cluster, 0) + spread * torch.randn(
        num_clusters * per_cluster, d, generator=g
    )
    return centres, z[torch.randperm(z.shape[0], generator=g)]


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_recovers_clusters(backend, device):
    centres, z = (t.to(device) for t in _clustered(6, 40, 13))
    with use_backend(backend, op="nearest_code"):
        cb = kmeans_init_codebook(z, 6, iters=10, seed=1)
        cb_again = kmeans_init_codebook(z, 6, iters=10, seed=1)
    assert torch.equal(cb, cb_again), "a fixed seed must be reproducible"
    with use_backend(backend, op="nearest_code"):
        cb_c, counts = kmeans_init_codebook(z, 6, iters=10, seed=1, return_counts=True)
    assert torch.equal(cb_c, cb) and counts.sum().item() == z.shape[0]
    with use_backend(backend, op="nearest_code"):
        # counts of the last assignment step; converged on this data, so equal to a fresh assignment
        assert torch.equal(
            torch.bincount(nearest_code(z, cb_c).indices, minlength=6).to(counts.dtype), counts
        )
    assert cb.shape == (6, 13) and cb.dtype == torch.float32
    assert_close(cb.norm(dim=-1), torch.ones(6, device=device), name="|c|")
    # every true centre has a centroid within the noise level (k-means may split/merge on unlucky starts,
    # so check with enough codes to cover all clusters)
    with use_backend(backend, op="nearest_code"):
        cb12 = kmeans_init_codebook(z, 12, iters=10, seed=0)
    assert (centres @ cb12.t()).max(1).values.min() > 0.98


def test_kmeans_with_fewer_vectors_than_codes():
    z = torch.randn(5, 13, dtype=torch.float64)
    cb = kmeans_init_codebook(z, 17, iters=3, seed=0)
    assert cb.shape == (17, 13) and cb.dtype == torch.float64
    x = F.normalize(z, dim=-1)
    # with replacement: every centroid is one of the 5 normalised vectors (or their cluster means)
    assert (cb @ x.t()).max(1).values.min() > 0.999


def test_codebook_usage_values():
    K = 10
    uniform = torch.arange(K).repeat(7)
    u = codebook_usage(uniform, K)
    assert u["fraction_used"].item() == 1.0 and abs(u["perplexity"].item() - K) < 1e-9
    single = torch.full((3, 4), 2)
    s = codebook_usage(single, K)
    assert abs(s["fraction_used"].item() - 0.1) < 1e-12 and abs(s["perplexity"].item() - 1.0) < 1e-12
    counts = torch.tensor([3, 1, 0, 0, 6, 0, 0, 0, 0, 0])
    idx = torch.repeat_interleave(torch.arange(K), counts)
    p = counts[counts > 0].double() / 10
    r = codebook_usage(idx, K)
    assert abs(r["perplexity"].item() - torch.exp(-(p * p.log()).sum()).item()) < 1e-12
    assert abs(r["fraction_used"].item() - 0.3) < 1e-12


def test_commitment_loss_value_and_gradient():
    z = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
    z_q = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
    loss = commitment_loss(z, z_q)
    assert_close(loss, ((z - z_q) ** 2).mean(), dtype=torch.float64, name="loss")
    loss.backward()
    assert z_q.grad is None
    assert_close(z.grad, 2 * (z - z_q).detach() / z.numel(), dtype=torch.float64, name="dz")


def test_vector_quantizer_kmeans_init_and_eval_is_frozen(device):
    _centres, z = _clustered(16, 24, 16)
    z = z.to(device)
    vq = VectorQuantizer(num_codes=32, dim=16, decay=0.9, kmeans_init=True).to(device)
    assert not bool(vq.initialized)
    z_in = (3.0 * z).requires_grad_(True)  # unnormalised input
    z_q, idx, loss = vq(z_in)
    assert bool(vq.initialized)
    assert z_q.shape == z.shape and idx.shape == (z.shape[0],) and loss.ndim == 0
    assert codebook_usage(idx, 32)["perplexity"].item() > 12  # k-means init covers the 16 clusters
    assert loss.item() < 0.01  # codes close to the normalised inputs
    (z_q.sum() + loss).backward()
    assert z_in.grad is not None and torch.isfinite(z_in.grad).all()
    vq.eval()
    frozen = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(z)
    for k, v in vq.state_dict().items():
        assert torch.equal(v, frozen[k]), f"eval forward changed buffer {k}"
    # state round-trips
    vq2 = VectorQuantizer(num_codes=32, dim=16, kmeans_init=True).to(device)
    vq2.load_state_dict(vq.state_dict())
    vq2.train()
    vq2(z)
    assert bool(vq2.initialized)


def test_vector_quantizer_training_raises_usage_on_clustered_data():
    torch.manual_seed(0)
    centres, _ = _clustered(32, 1, 16, seed=3)
    vq = VectorQuantizer(num_codes=64, dim=16, decay=0.8, kmeans_init=False, dead_code_threshold=2)
    g = torch.Generator().manual_seed(5)
    usage, losses = [], []
    for step in range(30):
        labels = torch.randint(0, 32, (256,), generator=g)
        z = centres[labels] + 0.05 * torch.randn(256, 16, generator=g)
        _z_q, idx, loss = vq(z)
        # how many distinct clusters are told apart (cluster -> code is injective on the batch)
        pairs = torch.unique(torch.stack([labels, idx]), dim=1)
        usage.append(torch.unique(pairs[1]).numel())
        losses.append(loss.item())
    assert usage[-1] > usage[0] + 5, usage
    assert usage[-1] >= 28, usage
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.interpreter
def test_vector_quantizer_triton_step_matches_reference(device):
    _centres, z = _clustered(8, 20, 13)
    z = z.to(device)
    vqs = []
    for backend in BACKENDS:
        torch.manual_seed(0)
        vq = VectorQuantizer(num_codes=24, dim=13, decay=0.9, kmeans_init=True, kmeans_iters=3).to(device)
        with use_backend(backend):
            out = vq(z)
            out2 = vq(z)
        vqs.append((vq, out, out2))
    (a, oa, oa2), (b, ob, ob2) = vqs
    assert torch.equal(oa[1], ob[1]) and torch.equal(oa2[1], ob2[1])
    for k, v in a.state_dict().items():
        assert_close(v.double(), b.state_dict()[k].double(), dtype=torch.float32, name=k)


def test_kernels_compile_for_sm90_without_a_gpu():
    """Ahead-of-time compile for an H100 target with the JIT's real specialisation, at the BEiT v2 tokenizer
    shape (M 50176, K 8192, d 32): three of the lookup's autotune configs (bf16, TF32, the spill-free IEEE fp32
    tile), its backward and the EMA kernels. Catches typing and lowering errors the interpreter cannot see;
    every autotune config for every precision: ``python -m bench.static_gpu_check --ops codebook``."""
    from _aot import run_static

    results = run_static("codebook")
    assert len(results) == 6
    lookups = {r["case"].split(" config")[0]: r for r in results if r["kernel"] == "_nearest_code_fwd_kernel"}
    assert lookups["z=bfloat16 dot=bfloat16/ieee cosine"]["found"] == "wgmma"
    assert lookups["z=float32 dot=float32/tf32 cosine"]["found"] == "wgmma"
    ieee = lookups["z=float32 dot=float32/ieee cosine"]
    assert ieee["found"] == "none" and ieee["spill_stores"] == 0  # FMA dots, the tile that does not spill
