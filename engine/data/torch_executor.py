"""The torch executor of a loader: ``torch.utils.data.DataLoader`` workers build whole batches with PIL + torch
ops (one step per worker task), and the decode substitution shared with the DALI executor's recovery."""

from __future__ import annotations

import warnings

import torch


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
    """Map-style dataset whose item k is the whole batch of step ``start + k``."""

    def __init__(self, loader, plan, start: int):
        self.loader, self.plan, self.start = loader, plan, start

    def __len__(self):
        return len(self.plan) - self.start

    def __getitem__(self, k):
        step = self.start + k
        return self.loader._torch_batch(step, self.plan[step])


def iterate(loader, plan, start):
    """Yield the batches of steps ``start..`` of ``plan``, moved to the loader's GPU when it has one."""
    kwargs = {}
    if loader.num_threads > 0:
        kwargs = dict(prefetch_factor=loader.prefetch, worker_init_fn=_worker_init)
    dl = torch.utils.data.DataLoader(
        _StepDataset(loader, plan, start),
        batch_size=None,
        shuffle=False,
        num_workers=loader.num_threads,
        pin_memory=loader._kind == "gpu",
        **kwargs,
    )
    for batch in dl:
        if loader._kind == "gpu":
            batch = _to_device(batch, loader.device)
        yield batch


def _substitute(loader, item: dict, images: list, bad: list, dali_error) -> dict:
    """Replace each undecodable sample (``None`` in ``images``) by a copy of the next decodable one of the batch
    (image, label and augmentation parameters, in place), warn and record it in ``folder.skipped``."""
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
    loader.folder.skipped.extend(bad)
    warnings.warn(
        f"{loader.folder.root}: {len(bad)} image(s) failed to decode mid-epoch and were replaced "
        f"by other samples of their batch: {bad}",
        stacklevel=3,
    )
    return dict(item, labels=labels)


def batch_from_item(loader, item: dict, dali_error: Exception | None = None,
                    to_device: bool = True) -> tuple[dict, int]:
    """The batch of a prepared step through the torch transforms, and its number of undecodable samples.

    Decodes ``item["encoded"]`` when present (bytes the DALI producer already read), else the files. A sample
    that cannot be decoded is replaced by another of its batch (:func:`_substitute`), so the epoch keeps its
    length; a batch with no decodable sample raises.
    """
    from .torch_transforms import decode

    idx = item["idx"]
    sources = item.get("encoded") or [loader.folder.files[j] for j in idx]
    images, bad = [], []
    for i, src in enumerate(sources):
        try:
            images.append(decode(src))
        except Exception as exc:  # noqa: BLE001 - any decoder failure
            images.append(None)
            bad.append((loader.folder.files[idx[i]], f"{type(exc).__name__}: {exc}"))
    if bad:
        item = _substitute(loader, item, images, bad, dali_error)
    per_sample = [loader._torch_sample(img, item, i) for i, img in enumerate(images)]
    outputs = [torch.stack([s_[k] for s_ in per_sample]) for k in range(len(per_sample[0]))]
    if loader._kind == "gpu" and to_device:
        outputs = [o.to(loader.device, non_blocking=True) for o in outputs]
    return loader._assemble(outputs, item, to_device), len(bad)
