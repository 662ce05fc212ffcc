"""Pre-training and evaluation loaders: DALI pipelines with a torch DataLoader fallback.

A loader iterates over one epoch of batches (dicts of torch tensors) of one rank. Per step the work splits:

* a background producer thread (``prefetch`` steps ahead) reads the encoded files of the batch, samples every
  augmentation parameter from the batch key (seed, epoch, shard, step) and calls ``mask_fn(batch, seed)`` with
  a seed derived from the same key -- masks are made off the training thread and are reproducible;
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
import collections
import logging
import os
import pathlib
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import augment
from . import folder as folder_mod
from .folder import ImageFolder

logger = logging.getLogger("engine.data")


def dali_available() -> tuple[bool, str]:
    try:
        import nvidia.dali
        import nvidia.dali.fn  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means fall back
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def _resolve_backend(backend: str | None) -> str:
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
    logger.warning(
        "engine.data: NVIDIA DALI unavailable (%s): using the torch DataLoader fallback loader", why
    )
    return "torch"


def _resolve_device(device) -> tuple[str, int | None, torch.device]:
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


def _key_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(1)[0] & 0x7FFFFFFF)


def _dali_to_torch(tl, kind: str, dev: torch.device) -> torch.Tensor:
    t = tl.as_tensor()
    if kind == "gpu":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(t.shape(), dtype=torch.float32, device=dev)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(dev))
        return out
    return torch.from_numpy(np.array(t))


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


class _Loader(abc.ABC):
    """Shared plumbing: plan, position, state, producer thread and the two execution backends."""

    def __init__(
        self,
        folder: ImageFolder,
        *,
        batch_size: int,
        seed: int,
        shard_id: int,
        num_shards: int,
        shuffle: bool,
        drop_last: bool,
        num_threads: int,
        device,
        prefetch: int,
        backend: str | None,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(num_shards, int) or num_shards < 1 or not 0 <= shard_id < num_shards:
            raise ValueError(
                f"need 0 <= shard_id < num_shards, got shard_id={shard_id!r}, num_shards={num_shards!r}"
            )
        if not isinstance(num_threads, int) or num_threads < 0:
            raise ValueError(f"num_threads must be an int >= 0, got {num_threads!r}")
        self.folder = folder
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shard_id, self.num_shards = shard_id, num_shards
        self.shuffle, self.drop_last = shuffle, drop_last
        self.num_threads = num_threads
        self.prefetch = max(1, int(prefetch))
        self._kind, self._device_id, self.device = _resolve_device(device)
        self.backend = _resolve_backend(backend)
        self.epoch = 0
        self._position = 0
        self._pipe = None  # DALI pipeline, built on first iteration and reused
        self._inflight: collections.deque = (
            collections.deque()
        )  # items of scheduled iterations (None: padding)
        self._primed = False
        if len(self) == 0:
            raise ValueError(
                f"{folder.root}: {len(folder)} images give 0 steps of batch {batch_size} x "
                f"{num_shards} shard(s) with drop_last={drop_last}"
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
            len(self.folder),
            batch_size=self.batch_size,
            shard_id=self.shard_id,
            num_shards=self.num_shards,
            seed=self.seed,
            epoch=self.epoch if epoch is None else epoch,
            shuffle=self.shuffle,
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
        had_gpu_pipe = self._pipe is not None and self._kind == "gpu"
        self._pipe, self._primed = None, False
        self._inflight.clear()
        if had_gpu_pipe:  # DALI keeps freed device memory in its own pool, out of torch's reach: hand it back
            try:
                from nvidia.dali.backend import ReleaseUnusedMemory

                ReleaseUnusedMemory()
            except (ImportError, AttributeError, RuntimeError):  # older DALI: the pool is kept
                pass

    def __getstate__(self):  # DataLoader workers started by spawn/forkserver get no DALI state
        state = self.__dict__.copy()
        state.update(_pipe=None, _inflight=collections.deque(), _primed=False)
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
        gen = self._iter_dali(plan, start) if self.backend == "dali" else self._iter_torch(plan, start)
        try:
            for step, batch in enumerate(gen, start):
                self._position = step + 1
                yield batch
        finally:
            gen.close()

    def _iter_dali(self, plan, start):
        """Producer thread -> feed_input -> schedule_run, keeping ``prefetch`` iterations in flight.

        The pipeline is built once and reused by later epochs; iterations still in flight from an abandoned
        pass are drained (discarded) first. If DALI fails (an image that passed the index-time check cannot be
        decoded: changed on disk, corrupt entropy data), the in-flight batches are redone by the torch path
        from the bytes already read, with the same parameters and the undecodable samples replaced (see
        :meth:`_torch_from_item`), and a fresh pipeline takes over from the next step; a failure with no
        undecodable image is re-raised.
        """
        q: queue.Queue = queue.Queue(maxsize=self.prefetch + 1)
        stop = threading.Event()
        total = len(plan) - start

        def read(i):
            return np.fromfile(self.folder.files[i], dtype=np.uint8)

        def produce():
            try:
                with ThreadPoolExecutor(max(1, min(8, self.num_threads))) as readers:  # overlapping file I/O
                    for step in range(start, len(plan)):
                        item = self._prepare(step, plan[step])
                        item["idx"] = plan[step]
                        item["encoded"] = list(readers.map(read, plan[step]))
                        if not _put(q, item, stop):
                            return
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                _put(q, exc, stop)

        taken = 0

        def next_item():
            nonlocal taken
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            taken += 1
            return item

        def feed(pipe, item):
            for name, value in self._dali_feed(item).items():
                pipe.feed_input(name, value)

        def fill(pipe, inflight):
            """Schedule up to ``prefetch`` iterations (priming a new pipeline, see below)."""
            want = min(self.prefetch - len(inflight), total - taken)
            if want <= 0:
                return
            if not self._primed:
                # DALI's first schedule_run runs prefetch_queue_depth iterations at once: feed that many,
                # padding with copies of the last batch (marked None, drained later) on a short epoch.
                items = [next_item() for _ in range(want)]
                for item in items + [items[-1]] * (self.prefetch - len(items)):
                    feed(pipe, item)
                pipe.schedule_run()
                self._primed = True
                inflight.extend(items + [None] * (self.prefetch - len(items)))
                return
            for _ in range(want):
                item = next_item()
                feed(pipe, item)
                pipe.schedule_run()
                inflight.append(item)

        thread = threading.Thread(target=produce, name="engine.data.producer", daemon=True)
        thread.start()
        try:
            if self._pipe is not None:
                while self._inflight:  # leftovers of an abandoned pass, or priming padding
                    self._pipe.outputs()
                    self._inflight.popleft()
            done = 0
            while done < total:
                if self._pipe is None:
                    self._pipe, self._primed = self._build_pipeline(), False
                    self._inflight.clear()
                pipe, inflight = self._pipe, self._inflight
                fill(pipe, inflight)
                try:
                    # GPU: outputs bound to torch's current stream (no host sync); CPU: host-synchronised
                    outs = (
                        pipe.outputs(cuda_stream=torch.cuda.current_stream(self.device))
                        if self._kind == "gpu"
                        else pipe.outputs()
                    )
                except Exception as exc:
                    pending = [it for it in inflight if it is not None]
                    self.close()
                    redone = [self._torch_from_item(it, dali_error=exc) for it in pending]
                    if not any(bad for _, bad in redone):
                        raise RuntimeError(
                            f"DALI pipeline failed on {self.folder.root} with every image of the "
                            f"in-flight batches decodable: {exc}"
                        ) from exc
                    for batch, _ in redone:
                        done += 1
                        yield batch
                    continue
                item = inflight.popleft()
                tensors = [_dali_to_torch(o, self._kind, self.device) for o in outs]
                del outs  # DALI's output buffers go back to its pool now, not after the consumer's step
                if taken < total:
                    fill(pipe, inflight)
                done += 1
                yield self._assemble(tensors, item)
        except GeneratorExit:  # abandoned mid-epoch: in-flight iterations are tracked and drained next time
            raise
        except BaseException:  # a failure may leave fed-but-unscheduled inputs: start afresh next time
            self.close()
            raise
        finally:
            stop.set()
            thread.join(timeout=5)

    def _iter_torch(self, plan, start):
        ds = _StepDataset(self, plan, start)
        kwargs = {}
        if self.num_threads > 0:
            kwargs = dict(prefetch_factor=self.prefetch, worker_init_fn=_worker_init)
        dl = torch.utils.data.DataLoader(
            ds,
            batch_size=None,
            shuffle=False,
            num_workers=self.num_threads,
            pin_memory=self._kind == "gpu",
            **kwargs,
        )
        for batch in dl:
            if self._kind == "gpu":
                batch = _to_device(batch, self.device)
            yield batch

    def _torch_batch(self, step: int, idx: np.ndarray) -> dict:
        item = self._prepare(step, idx)
        item["idx"] = idx
        # runs in a DataLoader worker (or its fetch): CPU tensors only; _iter_torch pins and moves them
        return self._torch_from_item(item, to_device=False)[0]

    def _torch_from_item(
        self, item: dict, dali_error: Exception | None = None, to_device: bool = True
    ) -> tuple[dict, int]:
        """The batch of a prepared step through the torch transforms, and its number of undecodable samples.

        Decodes ``item["encoded"]`` when present (bytes the DALI producer already read), else the files. A
        sample that cannot be decoded is replaced by a copy of the next decodable sample of the batch (image,
        label and augmentation parameters), warned about and recorded in ``folder.skipped`` (in this process),
        so the epoch keeps its length; a batch with no decodable sample raises.
        """
        from .torch_transforms import decode

        idx = item["idx"]
        sources = item.get("encoded") or [self.folder.files[j] for j in idx]
        images, bad = [], []
        for i, src in enumerate(sources):
            try:
                images.append(decode(src))
            except Exception as exc:  # noqa: BLE001 - any decoder failure
                images.append(None)
                bad.append((self.folder.files[idx[i]], f"{type(exc).__name__}: {exc}"))
        if bad:
            good = [i for i, im in enumerate(images) if im is not None]
            if not good:
                raise RuntimeError(f"no image of a batch could be decoded: {bad}") from dali_error
            labels = item["labels"].clone()
            for i in [i for i, im in enumerate(images) if im is None]:
                j = next((g for g in good if g > i), good[0])
                images[i] = images[j]
                labels[i] = labels[j]
                for params in item.get("params", []):
                    for arr in params.values():
                        arr[i] = arr[j]
            item = dict(item, labels=labels)
            self.folder.skipped.extend(bad)
            warnings.warn(
                f"{self.folder.root}: {len(bad)} image(s) failed to decode mid-epoch and were replaced "
                f"by other samples of their batch: {bad}",
                stacklevel=2,
            )
        per_sample = [self._torch_sample(img, item, i) for i, img in enumerate(images)]
        outputs = [torch.stack([s_[k] for s_ in per_sample]) for k in range(len(per_sample[0]))]
        if self._kind == "gpu" and to_device:
            outputs = [o.to(self.device, non_blocking=True) for o in outputs]
        return self._assemble(outputs, item, to_device), len(bad)


def _worker_init(_):
    torch.set_num_threads(1)


def _to_device(batch, dev):
    if isinstance(batch, torch.Tensor):
        return batch.to(dev, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, dev) for k, v in batch.items()}
    if isinstance(batch, list):
        return [_to_device(v, dev) for v in batch]
    return batch


class _StepDataset(torch.utils.data.Dataset):
    """Map-style dataset whose item k is the whole batch of step ``start + k`` (fallback backend)."""

    def __init__(self, loader: _Loader, plan, start: int):
        self.loader, self.plan, self.start = loader, plan, start

    def __len__(self):
        return len(self.plan) - self.start

    def __getitem__(self, k):
        step = self.start + k
        return self.loader._torch_batch(step, self.plan[step])


def _as_folder(data_dir, prefer: str | None) -> ImageFolder:
    root = pathlib.Path(data_dir)
    if prefer and (root / prefer).is_dir():
        root = root / prefer
    return ImageFolder.scan(root, num_threads=min(32, (os.cpu_count() or 1) * 4))


class PretrainLoader(_Loader):
    """Loader of one pre-training recipe (see :mod:`engine.data.augment`)."""

    def __init__(
        self,
        method: str,
        data_dir,
        *,
        batch_size: int,
        image_size: int,
        seed: int = 0,
        shard_id: int = 0,
        num_shards: int = 1,
        num_threads: int = 2,
        device="cpu",
        mask_fn=None,
        local_crops: int = 8,
        local_size: int | None = None,
        tokenizer_size: int | None = None,
        crop_scale=None,
        drop_last: bool = True,
        prefetch: int = 2,
        backend: str | None = None,
        shuffle: bool = True,
    ):
        self.recipe = augment.pretrain_recipe(
            method,
            image_size,
            local_crops=local_crops,
            local_size=local_size,
            tokenizer_size=tokenizer_size,
            crop_scale=crop_scale,
        )
        if mask_fn is not None and not callable(mask_fn):
            raise TypeError(
                f"mask_fn must be callable (batch_size, seed) -> dict, got {type(mask_fn).__name__}"
            )
        self.method, self.image_size, self.mask_fn = method, image_size, mask_fn
        super().__init__(
            _as_folder(data_dir, "train"),
            batch_size=batch_size,
            seed=seed,
            shard_id=shard_id,
            num_shards=num_shards,
            shuffle=shuffle,
            drop_last=drop_last,
            num_threads=num_threads,
            device=device,
            prefetch=prefetch,
            backend=backend,
        )

    def mask_seed(self, epoch: int, step: int) -> int:
        """The seed handed to ``mask_fn`` for (epoch, step) of this rank."""
        return _key_seed(self.seed, epoch, self.shard_id, step, 2)

    def _prepare(self, step, idx):
        sizes = self.folder.sizes[idx]
        params = augment.sample_recipe(
            self.recipe, sizes, seed=self.seed, epoch=self.epoch, shard_id=self.shard_id, step=step
        )
        item = {"step": step, "params": params, "labels": torch.from_numpy(self.folder.labels[idx].copy())}
        if self.mask_fn is not None:
            masks = self.mask_fn(len(idx), self.mask_seed(self.epoch, step))
            if not isinstance(masks, dict):
                raise TypeError(f"mask_fn must return a dict of tensors, got {type(masks).__name__}")
            item["masks"] = masks
        return item

    def _build_pipeline(self):
        from .dali_pipeline import build_pretrain_pipeline

        return build_pretrain_pipeline(
            self.recipe,
            batch_size=self.batch_size,
            num_threads=max(1, self.num_threads),
            device=self._kind,
            device_id=self._device_id,
            prefetch=self.prefetch,
        )

    def _dali_feed(self, item):
        from .dali_pipeline import pretrain_feed

        return pretrain_feed(self.recipe, item["encoded"], item["params"])

    def _torch_sample(self, img, item, i):
        from .torch_transforms import apply_view

        out = []
        for view, params in zip(self.recipe.views, item["params"]):
            out += apply_view(img, view, params, i)
        return out

    def _assemble(self, outputs, item, to_device: bool = True):
        move = to_device and self._kind == "gpu"
        batch: dict = {}
        pos = 0
        for view, key in zip(self.recipe.views, self.recipe.keys):
            main = outputs[pos]
            pos += 1
            if key == "crops":
                batch.setdefault("crops", []).append(main)
            else:
                batch[key] = main
            if view.twin is not None:
                batch[view.twin.key] = outputs[pos]
                pos += 1
        labels = item["labels"]
        batch["labels"] = labels.to(self.device, non_blocking=True) if move else labels
        for k, v in item.get("masks", {}).items():
            if k in batch:
                raise ValueError(f"mask_fn output key {k!r} collides with a batch key")
            batch[k] = v.to(self.device, non_blocking=True) if move and torch.is_tensor(v) else v
        return batch


class EvalLoader(_Loader):
    """Deterministic evaluation loader: every image of the folder once, in index order, last batch kept."""

    def __init__(
        self,
        data_dir,
        split: str | None = "val",
        *,
        batch_size: int,
        image_size: int,
        num_threads: int = 2,
        device="cpu",
        backend: str | None = None,
        prefetch: int = 2,
    ):
        root = pathlib.Path(data_dir)
        if split:
            root = root / split
            if not root.is_dir():
                raise FileNotFoundError(f"split folder {str(root)!r} does not exist")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
        self.image_size = image_size
        super().__init__(
            _as_folder(root, None),
            batch_size=batch_size,
            seed=0,
            shard_id=0,
            num_shards=1,
            shuffle=False,
            drop_last=False,
            num_threads=num_threads,
            device=device,
            prefetch=prefetch,
            backend=backend,
        )

    def _prepare(self, step, idx):
        return {"step": step, "labels": torch.from_numpy(self.folder.labels[idx].copy())}

    def _build_pipeline(self):
        from .dali_pipeline import build_eval_pipeline

        return build_eval_pipeline(
            image_size=self.image_size,
            batch_size=self.batch_size,
            num_threads=max(1, self.num_threads),
            device=self._kind,
            device_id=self._device_id,
            prefetch=self.prefetch,
        )

    def _dali_feed(self, item):
        return {"encoded": item["encoded"]}

    def _torch_sample(self, img, item, i):
        from .torch_transforms import eval_transform

        return [eval_transform(img, self.image_size)]

    def _assemble(self, outputs, item, to_device: bool = True):
        labels = item["labels"]
        return {
            "images": outputs[0],
            "labels": labels.to(self.device, non_blocking=True) if to_device and self._kind == "gpu" else labels,
        }


def build_pretrain_loader(
    method: str,
    data_dir,
    *,
    batch_size: int,
    image_size: int,
    seed: int = 0,
    shard_id: int = 0,
    num_shards: int = 1,
    num_threads: int = 2,
    device="cpu",
    mask_fn=None,
    local_crops: int = 8,
    local_size: int | None = None,
    tokenizer_size: int | None = None,
    crop_scale=None,
    drop_last: bool = True,
    prefetch: int = 2,
    backend: str | None = None,
) -> PretrainLoader:
    """Pre-training loader for ``method`` over the image folder ``data_dir`` (its ``train/`` subfolder when
    it has one). See :mod:`engine.data.augment` for the recipes and :mod:`engine.data.loader` for order,
    resume and masks. ``backend``: None (DALI when importable, else the torch fallback), "dali" or "torch"."""
    return PretrainLoader(
        method,
        data_dir,
        batch_size=batch_size,
        image_size=image_size,
        seed=seed,
        shard_id=shard_id,
        num_shards=num_shards,
        num_threads=num_threads,
        device=device,
        mask_fn=mask_fn,
        local_crops=local_crops,
        local_size=local_size,
        tokenizer_size=tokenizer_size,
        crop_scale=crop_scale,
        drop_last=drop_last,
        prefetch=prefetch,
        backend=backend,
    )


def build_eval_loader(
    data_dir,
    split: str | None = "val",
    *,
    batch_size: int,
    image_size: int,
    num_threads: int = 2,
    device="cpu",
    backend: str | None = None,
) -> EvalLoader:
    """Evaluation loader over ``data_dir/split`` (``split=None``: ``data_dir`` itself)."""
    return EvalLoader(
        data_dir,
        split,
        batch_size=batch_size,
        image_size=image_size,
        num_threads=num_threads,
        device=device,
        backend=backend,
    )
