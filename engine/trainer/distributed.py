"""torchrun -> DistributedDataParallel (NCCL on GPU, gloo on CPU); helpers for all-reduced metrics.

Launch: ``torchrun --nproc_per_node N -m engine.pretrain ...``. Each rank reads its own shard of the data
(``shard_id=rank, num_shards=world_size``), gradients are averaged by DDP and logged metrics are averaged
with :func:`all_reduce_mean`. Only rank 0 writes checkpoints and logs.

FSDP is an option for models that do not fit one GPU (ViT-L with large batches): wrap the method's
trainable backbone with ``torch.distributed.fsdp.fully_shard`` instead of DDP and save with
``torch.distributed.checkpoint``; the loop is otherwise unchanged. The default here is DDP because every
supported backbone fits a single device.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


DEFAULT_TIMEOUT_S = 300.0


class PeerTimeoutError(RuntimeError):
    """A collective did not complete within ``--dist-timeout``: a peer rank died, hung or was stopped."""


def init_distributed(device: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1), else a single process.

    ``timeout_s`` bounds every collective (``--dist-timeout``): a rank that stops answering (killed, hung,
    SIGSTOP'ed) makes the others fail after that many seconds instead of waiting forever."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1:
        if dev.type == "cuda" and dev.index is not None:
            torch.cuda.set_device(dev)  # so that everything launched on "the current device" uses it
        return DistInfo(device=dev)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (one all-reduce for the whole dict)."""
    if not is_dist() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of a tensor when distributed (no-op otherwise)."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (a list in rank order); ``[obj]`` when not distributed."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def is_timeout_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective's timeout / lost peer (gloo and NCCL word it differently)."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, PeerTimeoutError) or any(
        w in text for w in ("timed out", "timeout", "connection closed by peer", "connection reset by peer",
                            "broken pipe", "dist_backend_error", "distbackenderror"))


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
