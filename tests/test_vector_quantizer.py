"""VectorQuantizer (BEiT v2 VQ-KD) and the plain-PyTorch codebook helpers: k-means init, usage stats,
commitment loss."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from kernels import (
    VectorQuantizer,
    codebook_usage,
    commitment_loss,
    kmeans_init_codebook,
    nearest_code,
    use_backend,
)

BACKENDS = ["triton", "reference"]


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


def test_helpers_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="same shape"):
        commitment_loss(torch.randn(4, 8), torch.randn(4, 7))
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        codebook_usage(torch.rand(5), 10)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, num_codes=10\)"):
        codebook_usage(torch.tensor([0, 10]), 10)
    with pytest.raises(ValueError, match="num_codes must be a positive int"):
        kmeans_init_codebook(torch.randn(5, 8), 0)
