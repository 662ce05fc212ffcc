"""The fine-tuning augmentation recipe (timm ``create_transform(is_training=True)`` as BEiT, BEiT v2, SimMIM and
SparK fine-tune with it) and its loader, on DALI like the pre-training data, with the torch/PIL fallback.

Per image (S = image_size)::

    RandomResizedCrop(S, scale=(0.08, 1), ratio=(3/4, 4/3), bicubic, antialiased)
    -> RandAugment rand-m9-mstd0.5-inc1 (engine.data.randaugment)        [randaug: 'none' turns it off]
    -> horizontal flip p=0.5 (hflip), ImageNet mean/std normalisation
    -> random erasing p=0.25, per-pixel noise (engine.data.random_erasing)  [reprob]

and per batch (in the method, on the device): mixup 0.8 / cutmix 1.0, prob 1, switch 0.5, label smoothing 0.1
(:mod:`engine.data.mixup`; the loader draws the parameters, ``batch["mix"]``). With RandAugment on, timm drops
the colour jitter, so there is none here. Evaluation uses :func:`engine.data.build_eval_loader` (resize the
shorter side to S * 256/224, centre crop S: crop_pct 0.875, BEiT's default below 384 px; SparK's recipe crops
0.95 -- a small deviation for the SparK preset).

Order: the flip comes after RandAugment (timm flips before), as the flip is fused into DALI's
``crop_mirror_normalize``; the RandAugment ops commute with a flip up to the sign of their geometric argument,
which is drawn symmetrically, so the distribution of the views is the same.

DALI graph (``device="cpu"``: CPU decoder and operators; ``"gpu"``: nvJPEG and GPU operators)::

    decode -> resize(roi = crop window, S x S, bicubic, antialias)
           -> [RandAugment: n layers of DALI conditionals over the op kinds, arguments fed per sample]
           -> crop_mirror_normalize(mirror = flip, ImageNet mean/std, CHW float32)

then erasing on the output tensors (torch, keyed noise). Keys of a batch: ``images`` [B, 3, S, S] float32,
``labels`` [B] int64, ``mix`` a list of 6 floats (``[lam, cutmix, y0, y1, x0, x1]``).

Few labels (``train_fraction``): :func:`class_subset` keeps, of every class, the first
``max(1, round(fraction * n_c))`` images of a permutation seeded with 0 -- a deterministic per-class subset that
depends only on the folder and the fraction (not on ``--seed``), so runs with different seeds, and the
pre-trained and random-init runs, see the same labelled images.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from . import augment
from .folder import ImageFolder
from .loader import _as_folder, _key_seed, _Loader
from .mixup import NO_MIX, MixSpec, sample_mix
from .randaugment import RandAugSpec, dali_randaugment, input_names, parse_randaug, pil_randaugment, \
    sample_randaugment
from .random_erasing import apply_erasing, sample_erasing


@dataclasses.dataclass(frozen=True)
class FinetuneRecipe:
    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interp: str = "bicubic"
    hflip: float = 0.5
    randaug: RandAugSpec | None = dataclasses.field(default_factory=RandAugSpec)
    reprob: float = 0.25
    mix: MixSpec = dataclasses.field(default_factory=lambda: MixSpec(0.8, 1.0, 1.0, 0.5))

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {self.size!r}")
        augment._check_scale(self.scale)
        if self.interp not in augment.INTERPOLATIONS:
            raise ValueError(f"interp must be one of {augment.INTERPOLATIONS}, got {self.interp!r}")
        if not 0.0 <= self.hflip <= 1.0 or not 0.0 <= self.reprob <= 1.0:
            raise ValueError(f"hflip and reprob must be in [0, 1], got {self.hflip!r}, {self.reprob!r}")


def recipe_from_config(cfg: dict) -> FinetuneRecipe:
    """The recipe of a resolved fine-tuning configuration (``None`` values: the paper defaults)."""
    def get(key, default):
        v = cfg.get(key)
        return default if v is None else v

    scale = cfg.get("crop_scale") or (0.08, 1.0)
    mix = MixSpec(float(get("mixup", 0.8)), float(get("cutmix", 1.0)), float(get("mixup_prob", 1.0)),
                  float(get("mixup_switch_prob", 0.5)))
    return FinetuneRecipe(int(cfg["image_size"]), tuple(float(v) for v in scale), hflip=float(get("hflip", 0.5)),
                          randaug=parse_randaug(get("randaug", "rand-m9-mstd0.5-inc1")),
                          reprob=float(get("reprob", 0.25)), mix=mix)


def class_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a per-class subset: ``max(1, round(fraction * n_c))`` of each class ``c``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction!r}")
    labels = np.asarray(labels)
    if fraction >= 1.0:
        return np.arange(len(labels))
    if (labels < 0).any():
        raise ValueError("train_fraction needs class-folder labels (the folder is flat: no classes)")
    rng = np.random.default_rng([int(seed), 0xF1])
    keep = []
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        k = max(1, int(round(fraction * len(idx))))
        keep.append(idx[rng.permutation(len(idx))[:k]])
    return np.sort(np.concatenate(keep))


def subset_folder(folder: ImageFolder, fraction: float) -> ImageFolder:
    if fraction is None or fraction >= 1.0:
        return folder
    idx = class_subset(folder.labels, fraction)
    return dataclasses.replace(folder, files=[folder.files[i] for i in idx], labels=folder.labels[idx].copy(),
                               sizes=folder.sizes[idx].copy())


class FinetuneLoader(_Loader):
    """Training loader of the fine-tuning recipe over ``data_dir`` (its ``train/`` when it has one); order,
    sharding, state and resume as :class:`engine.data.loader.PretrainLoader`."""

    def __init__(self, data_dir, recipe: FinetuneRecipe, *, batch_size: int, seed: int = 0, shard_id: int = 0,
                 num_shards: int = 1, num_threads: int = 2, device="cpu", train_fraction: float | None = None,
                 drop_last: bool = True, prefetch: int = 2, backend: str | None = None):
        self.recipe = recipe
        self.image_size = recipe.size
        folder = _as_folder(data_dir, "train")
        if (folder.labels < 0).any():
            raise ValueError(f"{folder.root}: fine-tuning needs labelled images (class sub-folders), the folder is "
                             "flat")
        self.num_classes = len(folder.classes)
        self.classes = list(folder.classes)
        self.train_fraction = train_fraction
        super().__init__(subset_folder(folder, float(train_fraction or 1.0)), batch_size=batch_size, seed=seed,
                         shard_id=shard_id, num_shards=num_shards, shuffle=True, drop_last=drop_last,
                         num_threads=num_threads, device=device, prefetch=prefetch, backend=backend)

    # ---- parameters of one step (producer thread / DataLoader worker)
    def _prepare(self, step, idx):
        r = self.recipe
        n, S = len(idx), r.size
        sizes = self.folder.sizes[idx]
        rng = augment.batch_rng(self.seed, self.epoch, self.shard_id, step, stream=1)
        params = {"crop": augment.sample_rrc(rng, sizes[:, 0], sizes[:, 1], r.scale, r.ratio),
                  "flip": rng.random(n) < r.hflip}
        if r.randaug is not None:
            params.update(sample_randaugment(rng, r.randaug, n, S, S))
        erase_rng = augment.batch_rng(self.seed, self.epoch, self.shard_id, step, stream=3)
        params["erase"] = sample_erasing(erase_rng, n, S, S, prob=r.reprob)
        mix_rng = augment.batch_rng(self.seed, self.epoch, self.shard_id, step, stream=4)
        mix = sample_mix(mix_rng, r.mix, S, S) if r.mix.active else NO_MIX.copy()
        return {"step": step, "params": [params], "labels": torch.from_numpy(self.folder.labels[idx].copy()),
                "mix": mix, "noise_seed": _key_seed(self.seed, self.epoch, self.shard_id, step, 5)}

    # ---- DALI
    def _build_pipeline(self):
        return build_finetune_pipeline(self.recipe, batch_size=self.batch_size, num_threads=max(1, self.num_threads),
                                       device=self._kind, device_id=self._device_id, prefetch=self.prefetch)

    def _dali_feed(self, item):
        return finetune_feed(self.recipe, item["encoded"], item["params"][0])

    # ---- torch fallback
    def _torch_sample(self, img, item, i):
        from .torch_transforms import normalise, resized_crop

        p = item["params"][0]
        x = resized_crop(img, p["crop"][i], self.recipe.size, self.recipe.interp)
        if self.recipe.randaug is not None:
            x = pil_randaugment(x, p, i, self.recipe.randaug.n)
        return [normalise(x, "imagenet", bool(p["flip"][i]))]

    def _assemble(self, outputs, item, to_device: bool = True):
        move = to_device and self._kind == "gpu"
        images = outputs[0]
        apply_erasing(images, item["params"][0]["erase"], item["noise_seed"])
        labels = item["labels"]
        return {"images": images, "labels": labels.to(self.device, non_blocking=True) if move else labels,
                "mix": [float(v) for v in item["mix"]]}  # a list: no host sync to read it back on a GPU


def build_finetune_loader(data_dir, cfg: dict, *, shard_id: int = 0, num_shards: int = 1, device="cpu",
                          backend: str | None = None) -> FinetuneLoader:
    """The fine-tuning loader of a resolved configuration (recipe from :func:`recipe_from_config`)."""
    return FinetuneLoader(data_dir, recipe_from_config(cfg), batch_size=int(cfg["batch_size"]), seed=int(cfg["seed"]),
                          shard_id=shard_id, num_shards=num_shards, num_threads=int(cfg["num_threads"]),
                          device=device, train_fraction=cfg.get("train_fraction"), backend=backend)


# ----------------------------------------------------------------------------------------------------- DALI graph
def finetune_feed(recipe: FinetuneRecipe, encoded: list, params: dict) -> dict:
    """The ``feed_input`` dict of one batch (dense per-input arrays, sample i = row i)."""
    crop = np.asarray(params["crop"])  # x0, y0, w, h
    start = np.ascontiguousarray(np.stack([crop[:, 1], crop[:, 0]], 1), dtype=np.float32)  # DALI roi is (y, x)
    end = np.ascontiguousarray(start + np.stack([crop[:, 3], crop[:, 2]], 1).astype(np.float32))
    feed = {"encoded": encoded, "roi_start": start, "roi_end": end,
            "flip": np.ascontiguousarray(params["flip"], dtype=np.int32)}
    for name in input_names(recipe.randaug):
        feed[name] = np.ascontiguousarray(params[name])
    return feed


def build_finetune_pipeline(recipe: FinetuneRecipe, *, batch_size: int, num_threads: int, device: str,
                            device_id: int | None, prefetch: int):
    from nvidia.dali import fn, pipeline_def, types

    from .dali_pipeline import _decode, _interp, _norm

    dec_device = "mixed" if device == "gpu" else "cpu"
    S = recipe.size
    names = input_names(recipe.randaug)

    @pipeline_def(enable_conditionals=recipe.randaug is not None)
    def graph():
        encoded = fn.external_source(name="encoded", batch=True)
        image = _decode(encoded, dec_device)
        start = fn.external_source(name="roi_start", batch=True)
        end = fn.external_source(name="roi_end", batch=True)
        flip = fn.external_source(name="flip", batch=True)
        x = fn.resize(image, size=[S, S], roi_start=start, roi_end=end, roi_relative=False,
                      interp_type=_interp(types, recipe.interp), antialias=True)
        if recipe.randaug is not None:
            inputs = {k: fn.external_source(name=k, batch=True) for k in names}
            x = dali_randaugment(x, inputs, recipe.randaug.n, S, device)
        mean, std = _norm("imagenet")
        return fn.crop_mirror_normalize(x, mirror=flip, mean=mean, std=std, output_layout="CHW", dtype=types.FLOAT)

    pipe = graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                 prefetch_queue_depth=max(1, prefetch), seed=0)
    pipe.build()
    return pipe
