"""Random erasing (Zhong et al. 2017) as the fine-tuning recipes use it: timm ``RandomErasing`` with
``mode="pixel"``, one box per image, on the normalised image.

Per image, with probability ``prob``: up to 10 tries of area ``a ~ U(min_area, max_area) * H * W`` and aspect
``r = exp(U(log min_aspect, log 1/min_aspect))``, ``h = round(sqrt(a r))``, ``w = round(sqrt(a / r))``; the first
with ``h < H`` and ``w < W`` is placed at a uniform corner and filled with per-pixel N(0, 1) noise (in normalised
units, i.e. around the dataset mean). Defaults: prob 0.25 (BEiT, SimMIM, SparK), area [0.02, 1/3], aspect 0.3.

Randomness: :func:`sample_erasing` draws the boxes in numpy from the loader's keyed generator and
:func:`apply_erasing` draws the noise from a ``torch.Generator`` seeded with the batch key, on the batch's
device, so the erased pixels are a pure function of (seed, epoch, rank, step) -- exact resume, and the DALI and
torch loaders give the same batch. (timm draws both from the global ``random``/torch generators.)
"""

from __future__ import annotations

import math

import numpy as np
import torch


def sample_erasing(rng: np.random.Generator, n: int, height: int, width: int, prob: float = 0.25,
                   min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                   tries: int = 10) -> np.ndarray:
    """``[n, 4]`` int64 boxes ``(top, left, h, w)``; ``h = 0`` where the image is not erased."""
    out = np.zeros((n, 4), dtype=np.int64)
    if prob <= 0:
        return out
    log_ratio = (math.log(min_aspect), math.log(1.0 / min_aspect))
    area = height * width
    draw = rng.random(n) < prob
    target = rng.uniform(min_area, max_area, size=(n, tries)) * area
    aspect = np.exp(rng.uniform(log_ratio[0], log_ratio[1], size=(n, tries)))
    corner = rng.random((n, 2))
    h = np.round(np.sqrt(target * aspect)).astype(np.int64)
    w = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (h < height) & (w < width) & (h > 0) & (w > 0)
    for i in np.nonzero(draw)[0]:
        good = np.nonzero(ok[i])[0]
        if not len(good):
            continue
        t = good[0]
        hi, wi = int(h[i, t]), int(w[i, t])
        top = int(corner[i, 0] * (height - hi + 1))
        left = int(corner[i, 1] * (width - wi + 1))
        out[i] = (top, left, hi, wi)
    return out


def apply_erasing(images: torch.Tensor, boxes, seed: int) -> torch.Tensor:
    """Fill each box of ``boxes`` (``[B, 4]`` from :func:`sample_erasing`) of ``images`` [B, C, H, W] with
    per-pixel N(0, 1) noise drawn from a generator seeded with ``seed``; in place, returns ``images``."""
    boxes = np.asarray(boxes)
    todo = [i for i in range(len(boxes)) if boxes[i, 2] > 0 and boxes[i, 3] > 0]
    if not todo:
        return images
    gen = torch.Generator(device=images.device)
    gen.manual_seed(int(seed))
    c = images.shape[1]
    for i in todo:
        top, left, h, w = (int(v) for v in boxes[i])
        noise = torch.randn((c, h, w), generator=gen, device=images.device, dtype=torch.float32)
        images[i, :, top:top + h, left:left + w] = noise.to(images.dtype)
    return images
