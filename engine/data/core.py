"""The loader core: run options, backend/device resolution, the sample plan, position/state, and the dispatch of
one pass to an executor (:mod:`engine.data.dali_executor` or :mod:`engine.data.torch_executor`).

A loader iterates over one epoch of batches (dicts of torch tensors) of one rank. Per step the work splits:

* ``_prepare(step, idx)`` (on a producer thread or a DataLoader worker) samples every augmentation parameter
  from the batch key (seed, epoch, shard, step) and, for pre-training, calls ``mask_fn(batch, seed)`` with a
  seed derived from the same key -- masks are made off the training thread and are reproducible;
* DALI decodes and augments (``device="cpu"``: CPU operators, ``"gpu"``: nvJPEG + GPU operators), or, in the
  fallback, ``torch.utils.data.DataLoader`` workers do the same with PIL + torch ops (one batch per worker
  task).

Order and resume: :func:`engine.data.folder.shard_plan` fixes which samples form step k of epoch e on rank r;
together with the keyed parameters a batch is a pure function of (seed, epoch, rank, step). ``state_dict()``
holds (epoch, step) where step counts the batches already yielded, so a run restored with
``load_state_dict`` yields exactly the batch that would have come next. ``set_epoch(e)`` with a new epoch
rewinds to step 0; with the current epoch (as a resumed trainer does) it keeps the restored position.
Iterating again after an epoch was fully consumed replays it from step 0 (same order) unless
``set_epoch`` moved on.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import pathlib

import numpy as np
import torch

from . import folder as folder_mod
from .folder import ImageFolder

logger = logging.getLogger("engine.data")


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """How a loader runs (not what it produces): one frozen value handed from the builders to the core.

    ``backend``: None (DALI when importable, else the torch fallback), "dali" or "torch"; ``device``: "cpu",
    "gpu" or "cuda[:N]"; ``num_threads``: DALI threads / DataLoader workers (0: in the main process)."""

    batch_size: int
    seed: int = 0
    shard_id: int = 0
    num_shards: int = 1
    shuffle: bool = True
    drop_last: bool = True
    num_threads: int = 2
    device: object = "cpu"
    prefetch: int = 2
    backend: str | None = None

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        n, r = self.num_shards, self.shard_id
        if not isinstance(n, int) or n < 1 or not 0 <= r < n:
            raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id={r!r}, num_shards={n!r}")
        if not isinstance(self.num_threads, int) or self.num_threads < 0:
            raise ValueError(f"num_threads must be an int >= 0, got {self.num_threads!r}")
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "prefetch", max(1, int(self.prefetch)))

    @classmethod
    def of(cls, options: LoaderOptions | None, **kw) -> LoaderOptions:
        """``options`` with the fields in ``kw`` replaced (a new value from ``kw`` alone when None)."""
        return dataclasses.replace(options, **kw) if options is not None else cls(**kw)


def split_fields(kw: dict, *classes) -> list[dict]:
    """``kw`` split by the dataclass whose field each key is (first match); an unknown key is a TypeError."""
    out: list[dict] = [{} for _ in classes]
    for key, value in kw.items():
        for part, cls in zip(out, classes):
            if key in {f.name for f in dataclasses.fields(cls)}:
                part[key] = value
                break
        else:
            raise TypeError(f"unexpected keyword argument {key!r}")
    return out


def dali_available() -> tuple[bool, str]:
    try:
        import nvidia.dali
        import nvidia.dali.fn  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means fall back
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def resolve_backend(backend: str | None) -> str:
    if backend not in (None, "dali", "torch"):
        raise ValueError(f"backend must be None, 'dali' or 'torch', got {backend!r}")
    if backend == "torch":
        logger.warning("engine.data: backend='torch' forced: using the torch DataLoader fallback loader")
        return "torch"
    ok, why = dali_available()
    if ok:
        return "dali"
    if backend == "dali":
        raise ImportError(f"backend='dali' requested but nvidia.dali cannot be imported ({why})")
    logger.warning("engine.data: NVIDIA DALI unavailable (%s): using the torch DataLoader fallback loader", why)
    return "torch"


def resolve_device(device) -> tuple[str, int | None, torch.device]:
    """('cpu', None, cpu) or ('gpu', index, cuda:index). Does not initialise CUDA for 'cpu'."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    name = device.strip().lower()
    if name == "cpu":
        return "cpu", None, torch.device("cpu")
    if name in ("gpu", "cuda") or name.startswith("cuda:") or name.startswith("gpu:"):
        idx = int(name.split(":")[1]) if ":" in name else None
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} requested but no CUDA device is available")
        idx = torch.cuda.current_device() if idx is None else idx
        return "gpu", idx, torch.device("cuda", idx)
    raise ValueError(f"device must be 'cpu', 'gpu' or 'cuda[:N]', got {device!r}")


def key_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(1)[0] & 0x7FFFFFFF)


def as_folder(data_dir, prefer: str | None) -> ImageFolder:
    root = pathlib.Path(data_dir)
    if prefer and (root / prefer).is_dir():
        root = root / prefer
    return ImageFolder.scan(root, num_threads=min(32, (os.cpu_count() or 1) * 4))


class _Loader(abc.ABC):
    """Shared plumbing: plan, position, state and the dispatch to the two executors.

    Built from a :class:`LoaderOptions` (``options``) or its fields as keywords (``**kw``), or both (the
    keywords replace fields of ``options``)."""

    def __init__(self, folder: ImageFolder, options: LoaderOptions | None = None, **kw):
        self.options = options = LoaderOptions.of(options, **kw)
        self.folder = folder
        for f in dataclasses.fields(options):  # batch_size, seed, shard_id, ... as attributes
            setattr(self, f.name, getattr(options, f.name))
        self._kind, self._device_id, self.device = resolve_device(options.device)
        self.backend = resolve_backend(options.backend)
        self.epoch = 0
        self._position = 0
        self._dali = None  # the DALI executor (its pipeline is built on first iteration and reused)
        if len(self) == 0:
            raise ValueError(
                f"{folder.root}: {len(folder)} images give 0 steps of batch {self.batch_size} x "
                f"{self.num_shards} shard(s) with drop_last={self.drop_last}"
            )

    # ---- order and state ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return folder_mod.num_steps(
            len(self.folder), batch_size=self.batch_size, num_shards=self.num_shards, drop_last=self.drop_last
        )

    @property
    def num_samples(self) -> int:
        return len(self.folder)

    def plan(self, epoch: int | None = None) -> list[np.ndarray]:
        """Index batches of this rank for ``epoch`` (default: the current one)."""
        return folder_mod.shard_plan(
            len(self.folder), batch_size=self.batch_size, shard_id=self.shard_id, num_shards=self.num_shards,
            seed=self.seed, epoch=self.epoch if epoch is None else epoch, shuffle=self.shuffle,
            drop_last=self.drop_last,
        )

    def set_epoch(self, epoch: int) -> None:
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch, self._position = epoch, 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self._position,
            "seed": self.seed,
            "num_samples": len(self.folder),
            "batch_size": self.batch_size,
            "num_shards": self.num_shards,
            "shard_id": self.shard_id,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_samples", "batch_size", "num_shards", "seed"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(
                    f"loader state has {key}={state[key]} but this loader has {key}={mine}: "
                    "resuming would not continue the same sequence"
                )
        step = int(state["step"])
        if not 0 <= step <= len(self):
            raise ValueError(f"loader state step={step} outside [0, {len(self)}]")
        self.epoch, self._position = int(state["epoch"]), step

    def close(self) -> None:
        """Release the DALI pipeline (its threads and, on GPU, its memory); a later pass builds a new one."""
        if self._dali is not None:
            self._dali.close()

    def __getstate__(self):  # DataLoader workers started by spawn/forkserver get no DALI state
        state = self.__dict__.copy()
        state["_dali"] = None
        return state

    # ---- provided by the subclasses ---------------------------------------------------------------------
    @abc.abstractmethod
    def _prepare(self, step: int, idx: np.ndarray) -> dict:
        """Labels, augmentation parameters and masks of one step (runs on the producer thread / a worker)."""

    @abc.abstractmethod
    def _build_pipeline(self):
        """The built DALI pipeline."""

    @abc.abstractmethod
    def _dali_feed(self, item: dict) -> dict:
        """``{external_source name: per-sample list}`` of one prepared step."""

    @abc.abstractmethod
    def _assemble(self, outputs: list[torch.Tensor], item: dict, to_device: bool = True) -> dict:
        """The batch dict from the view tensors (pipeline output order) and the prepared step; labels and
        masks are moved to the loader's GPU when ``to_device`` (never inside a DataLoader worker)."""

    @abc.abstractmethod
    def _torch_sample(self, img: torch.Tensor, item: dict, i: int) -> list[torch.Tensor]:
        """Fallback: the output tensors of sample ``i`` of a step, in pipeline output order."""

    # ---- iteration -----------------------------------------------------------------------------------
    def __iter__(self):
        if self._position >= len(self):
            self._position = 0
        plan = self.plan()
        start = self._position
        if self.backend == "dali":
            from .dali_executor import DaliExecutor

            if self._dali is None:
                self._dali = DaliExecutor(self)
            gen = self._dali.run(plan, start)
        else:
            from .torch_executor import iterate

            gen = iterate(self, plan, start)
        try:
            for step, batch in enumerate(gen, start):
                self._position = step + 1
                yield batch
        finally:
            gen.close()

    def _torch_batch(self, step: int, idx: np.ndarray) -> dict:
        """The batch of one step through the torch transforms: CPU tensors only (it runs in a DataLoader
        worker, or its fetch); the torch executor pins and moves them."""
        from .torch_executor import batch_from_item

        item = self._prepare(step, idx)
        item["idx"] = idx
        return batch_from_item(self, item, to_device=False)[0]
