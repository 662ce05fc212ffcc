"""Synchronised batch norm (engine.methods.sync_bn): 2 gloo ranks, each with half of a batch, give the outputs,
input gradients, parameter gradients (summed over ranks) and running statistics of ONE batch norm over the whole
batch -- dense [N, C], dense [N, C, H, W] and sparse (SparK, statistics over active sites only); conversion
keeps parameters, buffers and state-dict names; the trainer's per-method hooks."""

import os
import tempfile

import pytest
import torch
from torch import nn

import kernels
from engine.methods.sync_bn import (SparseSyncBatchNorm2d, SyncBatchNorm1d, SyncBatchNorm2d,
                                    convert_sync_batchnorm)
from kernels.sparse_conv import SparseBatchNorm2d


def _case(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "1d":
        x = torch.randn(8, 5, generator=g) * 3 + 1
        return x, None
    x = torch.randn(4, 5, 6, 6, generator=g) * 2 - 1
    active = torch.rand(4, 6, 6, generator=g) > 0.5 if kind == "sparse" else None
    return x, active


def _bn(kind, sync):
    cls = {"1d": (nn.BatchNorm1d, SyncBatchNorm1d), "2d": (nn.BatchNorm2d, SyncBatchNorm2d),
           "sparse": (SparseBatchNorm2d, SparseSyncBatchNorm2d)}[kind][int(sync)]
    torch.manual_seed(3)
    bn = cls(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def _run(bn, x, active, w):
    x = x.clone().requires_grad_(True)
    if active is None:
        y = bn(x)
    else:
        with kernels.sparse_context(active):
            y = bn(x)
    (y * w).sum().backward()
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean.clone(), bn.running_var.clone()


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for kind in ("1d", "2d", "sparse"):
            x, active = _case(kind)
            w = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
            half = x.shape[0] // world
            sl = slice(rank * half, (rank + 1) * half)
            got = _run(_bn(kind, True), x[sl], None if active is None else active[sl], w[sl])
            torch.save(got, os.path.join(out_dir, f"{kind}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["1d", "2d", "sparse"])
def test_two_ranks_equal_one_batch_norm_over_the_whole_batch(kind, sync_results):
    x, active = _case(kind)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    ref = _run(_bn(kind, False), x, active, w)
    r0, r1 = (torch.load(os.path.join(sync_results, f"{kind}-{r}.pt")) for r in (0, 1))
    torch.testing.assert_close(torch.cat([r0[0], r1[0]]), ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r0[1], r1[1]]), ref[1], rtol=1e-4, atol=1e-5)
    for i in (2, 3):  # parameter gradients: each rank holds its part, DDP sums (then averages) them
        torch.testing.assert_close(r0[i] + r1[i], ref[i], rtol=1e-4, atol=1e-5)
    for i in (4, 5):  # running statistics: the same on both ranks, equal to the whole batch's
        torch.testing.assert_close(r0[i], ref[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r1[i], ref[i], rtol=1e-5, atol=1e-6)
    if active is not None:  # inactive sites stay exact zeros
        dead = ~active.unsqueeze(1).expand_as(x)
        assert torch.all(torch.cat([r0[0], r1[0]])[dead] == 0)


@pytest.fixture(scope="module")
def sync_results():
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        yield tmp


def test_single_process_is_the_parent_class():
    for kind in ("1d", "2d", "sparse"):
        x, active = _case(kind)
        w = torch.randn(x.shape)
        for a, b in zip(_run(_bn(kind, True), x, active, w), _run(_bn(kind, False), x, active, w)):
            torch.testing.assert_close(a, b)


def test_conversion_keeps_parameters_buffers_and_names():
    net = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
                        nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.BatchNorm2d(4))
    kernels.to_sparse(net[0])
    params = {n: p for n, p in net.named_parameters()}
    buffers = {n: b for n, b in net.named_buffers()}
    keys = list(net.state_dict())
    assert convert_sync_batchnorm(net) == 3
    assert isinstance(net[0][1], SparseSyncBatchNorm2d) and isinstance(net[1][1], SyncBatchNorm1d)
    assert type(net[2]) is SyncBatchNorm2d
    assert all(p is params[n] for n, p in net.named_parameters())
    assert all(b is buffers[n] for n, b in net.named_buffers())
    assert list(net.state_dict()) == keys
    assert convert_sync_batchnorm(net) == 0  # idempotent


def test_method_hooks():
    from engine.methods import get_method
    from engine.methods.base import PretrainMethod

    assert get_method("spark").sync_batchnorm
    assert not PretrainMethod.sync_batchnorm
    # default clipping: the global norm, as torch.nn.utils.clip_grad_norm_
    p1, p2 = torch.zeros(3, requires_grad=True), torch.zeros(4, requires_grad=True)
    p1.grad, p2.grad = torch.full((3,), 4.0), torch.full((4,), 1.0)
    total = torch.linalg.vector_norm(torch.cat([p1.grad, p2.grad]))
    PretrainMethod({}).clip_gradients([p1, p2], 1.0, total)
    torch.testing.assert_close(torch.linalg.vector_norm(torch.cat([p1.grad, p2.grad])), torch.tensor(1.0))


# ------------------------------------------------------------------------------ the trainer under DDP
def _trainer_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from _train_helpers import make_cfg, make_trainer
    from engine.trainer.distributed import cleanup, init_distributed

    dist = init_distributed("cpu")
    torch.manual_seed(0)
    cfg = make_cfg(out_dir, method="dino", model="resnet_femto", max_steps=2, batch_size=8, out_dim=32,
                   head_hidden_dim=16, bottleneck_dim=8, local_crops=0, use_bn_in_head=True, clip_grad=0.5)
    tr = make_trainer(cfg, dist)
    kinds = sorted({type(m).__name__ for m in tr.method.modules() if "BatchNorm" in type(m).__name__})
    tr.fit()
    flat = torch.cat([t.detach().reshape(-1).float() for t in tr.method.state_dict().values()])
    torch.save({"kinds": kinds, "flat": flat}, os.path.join(out_dir, f"rank{rank}.pt"))
    cleanup()


def test_trainer_converts_before_ddp_and_replicas_stay_identical(tmp_path):
    """DINO on a ResNet with head BN, 2 gloo ranks: the trainer converts every BN (backbone, head, student and
    teacher) before wrapping, the synchronised statistics and the per-parameter clipping run under DDP, and the
    replicas stay identical."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_trainer_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["kinds"] == ["SyncBatchNorm1d", "SyncBatchNorm2d"]
    torch.testing.assert_close(r0["flat"], r1["flat"], rtol=1e-5, atol=1e-6)
