"""ema_codebook_update: the in-place norm-EMA update (Triton under the interpreter vs a one-hot float64
oracle), low-precision state, dead-code restarts, deterministic mode, the DDP all-reduce, input checks."""

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, poison

from kernels import ema_codebook_update, use_backend
from kernels.codebook import reference as ref

BACKENDS = ["triton", "reference"]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every buffer the Triton launchers allocate starts NaN (or a sentinel), so unwritten elements fail."""

    def alloc(shape, dtype, device):
        return poison(torch.empty(shape, dtype=dtype, device=device))

    monkeypatch.setattr("kernels._buffers.empty", alloc)


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
    from kernels.codebook.ema_codebook_update import SCATTER, ScatterInputs

    z, idx = torch.randn(5, 4, device=device), torch.zeros(5, dtype=torch.int64, device=device)
    sums, counts = torch.zeros(3, 4, device=device), torch.zeros(3, device=device)
    with use_backend("triton", op="codebook_ema_scatter"):
        assert SCATTER.not_supported_reasons("triton", ScatterInputs(z, idx, sums, counts, True, 1e-5)) == []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with use_backend("triton", op="codebook_ema_scatter"):
            reasons = SCATTER.not_supported_reasons("triton", ScatterInputs(z, idx, sums, counts, True, 1e-5))
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


def test_ema_bad_inputs_raise_clear_errors():
    cb = torch.randn(10, 8)
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
