"""Pre-training and evaluation loaders: DALI pipelines with a torch DataLoader fallback.

What a loader produces is one frozen value, how it runs another, each handed through as it is:

* :class:`DataRecipe` -- what a pre-training method asks for (:meth:`PretrainMethod.data_recipe`): its
  augmentation recipe (:mod:`engine.data.augment`), the recipe's options and the mask function;
* :class:`engine.data.core.LoaderOptions` -- batch size, seed, shard, threads, device, backend, ...

Order, resume and state: :mod:`engine.data.core`; execution: :mod:`engine.data.dali_executor` and
:mod:`engine.data.torch_executor`. The builders also take the fields of both as keywords
(``build_pretrain_loader("simmim", root, batch_size=8, image_size=32, mask_fn=fn)``).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable

import torch

from . import augment
from .core import LoaderOptions, _Loader, as_folder, dali_available, key_seed, split_fields

# the names other modules import from here (engine.data.finetune_recipe)
_as_folder, _key_seed = as_folder, key_seed


@dataclasses.dataclass(frozen=True)
class DataRecipe:
    """What a pre-training method needs from the loader.

    ``augment``: the augmentation recipe -- a name of :data:`engine.data.augment.RECIPES` (or of a
    :func:`engine.data.augment.recipe_variant`), or a callable ``image_size -> augment.Recipe`` for a recipe
    of the method's own; the options below are those of :func:`engine.data.augment.pretrain_recipe`
    (``None``: its default). ``mask_fn(batch_size, seed) -> {key: tensor}`` makes the masks of a batch (off
    the training thread, seeded per batch); its keys join the batch."""

    augment: str | Callable
    mask_fn: Callable | None = None
    local_crops: int | None = None
    local_size: int | None = None
    tokenizer_size: int | None = None
    crop_scale: tuple | None = None
    local_crops_scale: tuple | None = None
    color_jitter: float | None = None

    def __post_init__(self):
        if self.mask_fn is not None and not callable(self.mask_fn):
            raise TypeError(
                f"mask_fn must be callable (batch_size, seed) -> dict, got {type(self.mask_fn).__name__}"
            )

    @classmethod
    def of(cls, recipe: str | Callable | DataRecipe, **kw) -> DataRecipe:
        """``recipe`` (a DataRecipe, or the ``augment`` of a new one) with the fields in ``kw`` replaced."""
        if isinstance(recipe, cls):
            return dataclasses.replace(recipe, **kw)
        return cls(recipe, **kw)

    def options(self) -> dict:
        """The recipe options that are set, as keyword arguments of ``pretrain_recipe`` (and of the builders)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("augment", "mask_fn") and getattr(self, f.name) is not None}

    def loader_kwargs(self) -> dict:
        """The fields besides ``augment`` that are set: ``build_pretrain_loader(augment, root, **this)``."""
        return {**({"mask_fn": self.mask_fn} if self.mask_fn is not None else {}), **self.options()}

    def build(self, image_size: int) -> augment.Recipe:
        """The :class:`engine.data.augment.Recipe` of this data recipe at ``image_size``."""
        if callable(self.augment):
            return self.augment(image_size)
        return augment.pretrain_recipe(self.augment, image_size, **self.options())


class PretrainLoader(_Loader):
    """Loader of one pre-training :class:`DataRecipe` over ``data_dir`` (its ``train/`` when it has one).

    ``recipe``: a DataRecipe or an augmentation recipe name; ``options``: a LoaderOptions; ``**kw``: fields of
    either, replacing theirs."""

    def __init__(self, recipe: str | DataRecipe, data_dir, *, image_size: int,
                 options: LoaderOptions | None = None, **kw):
        recipe_kw, options_kw = split_fields(kw, DataRecipe, LoaderOptions)
        self.data_recipe = DataRecipe.of(recipe, **recipe_kw)
        self.recipe = self.data_recipe.build(image_size)
        self.method, self.image_size, self.mask_fn = self.recipe.method, image_size, self.data_recipe.mask_fn
        super().__init__(as_folder(data_dir, "train"), options, **options_kw)

    def mask_seed(self, epoch: int, step: int) -> int:
        """The seed handed to ``mask_fn`` for (epoch, step) of this rank."""
        return key_seed(self.seed, epoch, self.shard_id, step, 2)

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
    """Deterministic evaluation loader: every image of the folder once, in index order, last batch kept.

    ``**kw``: the LoaderOptions fields an evaluation may set (batch_size, num_threads, device, backend,
    prefetch); the order fields are fixed (seed 0, one shard, no shuffling, last batch kept)."""

    FIXED = dict(seed=0, shard_id=0, num_shards=1, shuffle=False, drop_last=False)

    def __init__(self, data_dir, split: str | None = "val", *, image_size: int, **kw):
        fixed = sorted(set(kw) & set(self.FIXED))
        if fixed:
            raise TypeError(f"an evaluation loader fixes {fixed}")
        root = pathlib.Path(data_dir)
        if split:
            root = root / split
            if not root.is_dir():
                raise FileNotFoundError(f"split folder {str(root)!r} does not exist")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
        self.image_size = image_size
        super().__init__(as_folder(root, None), **self.FIXED, **kw)

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


def build_pretrain_loader(recipe: str | DataRecipe, data_dir, **kw) -> PretrainLoader:
    """Pre-training loader for ``recipe`` (a method's :class:`DataRecipe`, or an augmentation recipe name) over
    the image folder ``data_dir`` (its ``train/`` subfolder when it has one); ``image_size`` and the fields of
    DataRecipe / LoaderOptions as keywords (or ``options=LoaderOptions(...)``). See
    :mod:`engine.data.augment` for the recipes and :mod:`engine.data.core` for order, resume and masks."""
    return PretrainLoader(recipe, data_dir, **kw)


def build_eval_loader(data_dir, split: str | None = "val", **kw) -> EvalLoader:
    """Evaluation loader over ``data_dir/split`` (``split=None``: ``data_dir`` itself); keywords of
    :class:`EvalLoader`."""
    return EvalLoader(data_dir, split, **kw)


__all__ = ["DataRecipe", "EvalLoader", "LoaderOptions", "PretrainLoader", "build_eval_loader",
           "build_pretrain_loader", "dali_available"]
