"""Synchronised batch norm for DDP runs, dense and sparse (SparK), on any device and process-group backend.

The originals synchronise batch-norm statistics across GPUs: SparK builds its encoder, densify norms and
decoder with ``sbn=True`` (``SparseSyncBatchNorm2d`` / ``nn.SyncBatchNorm``), DINO converts student and
teacher with ``nn.SyncBatchNorm.convert_sync_batchnorm`` whenever they hold a batch norm (ResNet backbones,
``use_bn_in_head``). A method sets ``sync_batchnorm = True`` and the trainer calls
:meth:`PretrainMethod.convert_sync_batchnorm` before wrapping it in DDP.

``nn.SyncBatchNorm`` only runs on GPUs and knows nothing of SparK's activity maps, so the modules here compute
the statistics themselves, over all ranks, with two differentiable all-reduces (``torch.distributed.nn``: its
backward all-reduces the gradient, which gives the exact gradient of the synchronised statistics)::

    mean = sum_ranks sum_sites a x / N,   var = sum_ranks sum_sites a (x - mean)^2 / N,   N = sum_ranks sum a
    y    = a * ((x - mean) / sqrt(var + eps) * weight + bias)

with ``a`` = 1 everywhere for a dense norm and the active-site map inside a :func:`kernels.sparse_context`
for a sparse one (so inactive sites stay exact zeros). Running estimates use the unbiased ``N / (N - 1)``
variance, as ``nn.BatchNorm``. Outside training, without a process group or with one rank, each module is
exactly its parent class (same parameters, buffers and state-dict names, so checkpoints move freely between
single-process and DDP runs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from kernels.sparse_conv import SparseBatchNorm2d
from kernels.sparse_conv.context import current_maps


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t, op=dist.ReduceOp.SUM)


def sync_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, active: torch.Tensor | None = None):
    """Batch norm of ``x`` ([N, C] or [N, C, ...]) with statistics over every rank (module doc); updates
    ``bn``'s running estimates when it tracks them."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    xf = x.float()
    if active is None:
        a = None
        n_local = xf.new_full((1,), float(xf.numel() // xf.shape[1]))
    else:
        a = active.unsqueeze(1).to(xf.dtype)
        n_local = a.sum().reshape(1)
    s1 = (xf * a).sum(dims) if a is not None else xf.sum(dims)
    tot = _all_reduce(torch.cat([s1, n_local]))
    n = tot[-1].clamp_min(1.0)
    mean = tot[:-1] / n
    d = xf - mean.view(shape)
    s2 = ((d * d * a).sum(dims) if a is not None else (d * d).sum(dims))
    var = _all_reduce(s2) / n
    y = d * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.float().view(shape) + bn.bias.float().view(shape)
    if a is not None:
        y = y * a
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            mom = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
            if float(tot[-1]) > 0:
                unbiased = var * tot[-1] / (tot[-1] - 1).clamp_min(1.0)
                bn.running_mean.mul_(1 - mom).add_(mean.to(bn.running_mean.dtype), alpha=mom)
                bn.running_var.mul_(1 - mom).add_(unbiased.to(bn.running_var.dtype), alpha=mom)
    return y.to(x.dtype)


def _needs_sync(bn) -> bool:
    return bn.training and _world() > 1


class SyncBatchNorm1d(nn.BatchNorm1d):
    def forward(self, x):
        return sync_batch_norm(self, x) if _needs_sync(self) else super().forward(x)


class SyncBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x):
        return sync_batch_norm(self, x) if _needs_sync(self) else super().forward(x)


class SparseSyncBatchNorm2d(SparseBatchNorm2d):
    """:class:`kernels.SparseBatchNorm2d` with statistics over every rank (SparK's ``SparseSyncBatchNorm2d``)."""

    def forward(self, x):
        if not _needs_sync(self):
            return super().forward(x)
        maps = current_maps()
        active = None if maps is None else maps.get(x.shape[-2:], x.shape[0])
        return sync_batch_norm(self, x, active)


_SYNC = ((SparseBatchNorm2d, SparseSyncBatchNorm2d), (nn.BatchNorm2d, SyncBatchNorm2d),
         (nn.BatchNorm1d, SyncBatchNorm1d))
_DONE = (SparseSyncBatchNorm2d, SyncBatchNorm2d, SyncBatchNorm1d)


def _convert_one(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module | None:
    if isinstance(bn, _DONE):
        return None
    for base, sync in _SYNC:
        if type(bn) is base:
            new = sync(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
            if bn.affine:
                new.weight, new.bias = bn.weight, bn.bias
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(new, name, getattr(bn, name))
            new.train(bn.training)
            return new
    return None


def convert_sync_batchnorm(module: nn.Module) -> int:
    """Replace, in place, every ``BatchNorm1d`` / ``BatchNorm2d`` / ``SparseBatchNorm2d`` below ``module`` by
    its synchronised version (same parameter and buffer objects). Returns how many were converted."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            new = _convert_one(child) if isinstance(child, nn.modules.batchnorm._BatchNorm) else None
            if new is not None:
                setattr(parent, name, new)
                count += 1
    return count


__all__ = ["SparseSyncBatchNorm2d", "SyncBatchNorm1d", "SyncBatchNorm2d", "convert_sync_batchnorm",
           "sync_batch_norm"]
