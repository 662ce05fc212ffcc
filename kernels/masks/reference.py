"""Pure-Python reference mask generators: the same algorithms as csrc/masks.cpp, one sample at a time.

They use ``numpy.random.Generator`` streams, so they agree with the native generators in distribution,
not bit for bit. Masks are ``True`` = masked.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _place_block(mask, min_block, max_patches, log_ar, rng) -> int:
    """One BEiT placement round: up to 10 tries; accept a block adding 1..max_patches new patches."""
    h, w = mask.shape
    for _ in range(10):
        lo, hi = sorted((float(min_block), float(max_patches)))
        area = rng.uniform(lo, hi) if hi > lo else lo
        ar = math.exp(rng.uniform(*log_ar))
        bh = int(round(math.sqrt(area * ar)))
        bw = int(round(math.sqrt(area / ar)))
        if bh < 1 or bw < 1 or bh >= h or bw >= w:
            continue
        top = int(rng.integers(0, h - bh + 1))
        left = int(rng.integers(0, w - bw + 1))
        fresh = bh * bw - int(mask[top : top + bh, left : left + bw].sum())
        if 0 < fresh <= max_patches:
            mask[top : top + bh, left : left + bw] = True
            return fresh
    return 0


def _top_up(flat, k, rng):
    free = np.flatnonzero(~flat)
    flat[rng.choice(free, size=k, replace=False)] = True


def blockwise_masks(batch_size, grid_h, grid_w, num_masked, min_block=16, max_block=None, min_aspect=0.3, seed=0):
    log_ar = (math.log(min_aspect), math.log(1 / min_aspect))
    max_block = num_masked if max_block is None else max_block
    out = np.zeros((batch_size, grid_h, grid_w), dtype=bool)
    for b in range(batch_size):
        rng = _rng(seed, b)
        mask = out[b]
        count = 0
        while count < num_masked:
            delta = _place_block(mask, min_block, min(num_masked - count, max_block), log_ar, rng)
            if delta == 0:
                break
            count += delta
        if count < num_masked:
            _top_up(mask.reshape(-1), num_masked - count, rng)
    return torch.from_numpy(out)


def choose_k_masks(batch_size, n, k, seed=0):
    out = np.zeros((batch_size, n), dtype=bool)
    for b in range(batch_size):
        rng = _rng(seed, b)
        out[b, rng.choice(n, size=k, replace=False)] = True
    return torch.from_numpy(out)


def shuffle_masks(batch_size, n, keep, seed=0):
    ids_shuffle = np.stack([_rng(seed, b).permutation(n) for b in range(batch_size)]).astype(np.int64)
    ids_restore = np.argsort(ids_shuffle, axis=1)
    mask = np.ones((batch_size, n), dtype=bool)
    mask[:, :keep] = False
    mask = np.take_along_axis(mask, ids_restore, axis=1)
    return torch.from_numpy(ids_shuffle[:, :keep].copy()), torch.from_numpy(ids_restore), torch.from_numpy(mask)
