"""Public mask generators: argument checks, seeding, and dispatch (native C++ > Python reference).

All return ``torch.bool`` masks with ``True`` = masked, generated for a whole batch in one call.
``seed=None`` draws the seed from torch's global generator, so ``torch.manual_seed`` makes runs
reproducible; an explicit seed gives the same masks on every machine and thread count (per backend).

Sizes are bounded: at most ``MAX_CELLS`` (2**24, e.g. a 4096 x 4096 grid) cells per sample and
``MAX_TOTAL_CELLS`` (2**30) cells per call (``batch_size * cells``); larger requests raise a
``ValueError`` naming the argument and the limit instead of exhausting memory (which used to abort the
process from inside the C++ generators' OpenMP region).
"""

from __future__ import annotations

import math

import torch

from kernels import _backend
from kernels.masks import reference

_blockwise = _backend.define_op("blockwise_masks", "BEiT blockwise masking on an h x w patch grid")
_choose_k = _backend.define_op("choose_k_masks", "exactly k of n cells masked, uniformly")
_shuffle = _backend.define_op("shuffle_masks", "MAE per-row shuffle: ids_keep, ids_restore, mask")


def _native_reasons(*args, **kwargs):
    return _backend.native_reasons()


MAX_CELLS = 2**24
"""Largest number of cells (grid_h * grid_w, num_tokens, ...) of one sample."""
MAX_TOTAL_CELLS = 2**30
"""Largest batch_size * cells of one call."""


@_blockwise.register("native", _native_reasons, note="C++/OpenMP")
def _blockwise_native(batch_size, h, w, num_masked, min_block, max_block, min_aspect, seed):
    out = torch.empty((batch_size, h, w), dtype=torch.bool)
    _backend.native().blockwise_masks(out.data_ptr(), batch_size, h, w, num_masked, min_block, max_block,
                                      min_aspect, seed, _backend.native_threads())
    return out


@_blockwise.register("reference", note="Python/numpy")
def _blockwise_reference(batch_size, h, w, num_masked, min_block, max_block, min_aspect, seed):
    return reference.blockwise_masks(batch_size, h, w, num_masked, min_block, max_block, min_aspect, seed)


@_choose_k.register("native", _native_reasons, note="C++/OpenMP")
def _choose_k_native(batch_size, n, k, seed):
    out = torch.empty((batch_size, n), dtype=torch.bool)
    _backend.native().choose_k_masks(out.data_ptr(), batch_size, n, k, seed, _backend.native_threads())
    return out


@_choose_k.register("reference", note="Python/numpy")
def _choose_k_reference(batch_size, n, k, seed):
    return reference.choose_k_masks(batch_size, n, k, seed)


@_shuffle.register("native", _native_reasons, note="C++/OpenMP")
def _shuffle_native(batch_size, n, keep, seed):
    ids_keep = torch.empty((batch_size, keep), dtype=torch.int64)
    ids_restore = torch.empty((batch_size, n), dtype=torch.int64)
    mask = torch.empty((batch_size, n), dtype=torch.bool)
    _backend.native().shuffle_masks(ids_keep.data_ptr(), ids_restore.data_ptr(), mask.data_ptr(), batch_size, n, keep,
                                    seed, _backend.native_threads())
    return ids_keep, ids_restore, mask


@_shuffle.register("reference", note="Python/numpy")
def _shuffle_reference(batch_size, n, keep, seed):
    return reference.shuffle_masks(batch_size, n, keep, seed)


# ----------------------------------------------------------------------------------------------------------
# argument checks


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _cells(batch_size, cells, what):
    """Bound the per-sample cell count ``cells`` (described by ``what``) and the total of one call."""
    if cells > MAX_CELLS:
        raise ValueError(f"{what} = {cells} is too large: at most MAX_CELLS = 2**24 = {MAX_CELLS} cells per sample")
    if batch_size * cells > MAX_TOTAL_CELLS:
        raise ValueError(
            f"batch_size * ({what}) = {batch_size} * {cells} = {batch_size * cells} is too large: at most "
            f"MAX_TOTAL_CELLS = 2**30 = {MAX_TOTAL_CELLS} cells per call (split the batch)"
        )
    return cells


def _ratio(value, name="ratio"):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")
    return float(value)


def _seed(seed) -> int:
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be None or a non-negative int, got {seed!r}")
    return seed % 2**64


# ----------------------------------------------------------------------------------------------------------
# public API


def blockwise_masks(batch_size, grid_h, grid_w, num_masked, min_block=16, seed=None, *, max_block=None,
                    min_aspect=0.3):
    """BEiT blockwise masks ``[B, grid_h, grid_w]`` bool with exactly ``num_masked`` True per sample.

    Repeat: a block of area ``U[min_block, remaining]`` (capped by ``max_block``), aspect ratio
    log-uniform in ``[min_aspect, 1/min_aspect]``, at a uniform position, tried up to 10 times and kept
    only if it adds 1..remaining new patches (so it never overshoots). Where the official generator
    would stop short (10 tries added nothing), we top up with uniformly chosen unmasked patches, so the
    count is always exact (on grids too small for any block, e.g. 1 x 1, every patch comes from the top-up).
    """
    _positive_int("batch_size", batch_size)
    _positive_int("grid_h", grid_h)
    _positive_int("grid_w", grid_w)
    _cells(batch_size, grid_h * grid_w, "grid_h * grid_w")
    if isinstance(num_masked, bool) or not isinstance(num_masked, int) or not 0 <= num_masked <= grid_h * grid_w:
        raise ValueError(f"num_masked must be an int in [0, grid_h*grid_w={grid_h * grid_w}], got {num_masked!r}")
    _positive_int("min_block", min_block)
    max_block = num_masked if max_block is None else _positive_int("max_block", max_block)
    if isinstance(min_aspect, bool) or not isinstance(min_aspect, (int, float)) or not 0.0 < min_aspect <= 1.0:
        raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect!r}")
    return _blockwise(batch_size, grid_h, grid_w, num_masked, min_block, max_block, float(min_aspect), _seed(seed))


def simmim_masks(batch_size, image_size, mask_patch_size=32, model_patch_size=16, ratio=0.6, seed=None):
    """SimMIM masks on the model's patch grid ``[B, S/p, S/p]`` bool.

    ``ceil(ratio * units)`` of the ``(S / mask_patch_size)^2`` mask units are chosen uniformly, then each
    unit is repeated ``mask_patch_size / model_patch_size`` times along both axes.
    """
    _positive_int("batch_size", batch_size)
    _positive_int("image_size", image_size)
    _positive_int("mask_patch_size", mask_patch_size)
    _positive_int("model_patch_size", model_patch_size)
    ratio = _ratio(ratio)
    if image_size % mask_patch_size:
        raise ValueError(f"image_size ({image_size}) must be divisible by mask_patch_size ({mask_patch_size})")
    if mask_patch_size % model_patch_size:
        raise ValueError(f"mask_patch_size ({mask_patch_size}) must be divisible by model_patch_size ({model_patch_size})")
    units = image_size // mask_patch_size
    scale = mask_patch_size // model_patch_size
    _cells(batch_size, (image_size // model_patch_size) ** 2, "(image_size / model_patch_size)**2")
    k = math.ceil(ratio * units * units)
    mask = _choose_k(batch_size, units * units, k, _seed(seed)).view(batch_size, units, units)
    return mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2) if scale > 1 else mask


def spark_masks(batch_size, grid_h, grid_w, ratio=0.6, seed=None):
    """SparK masks on the stride-32 grid ``[B, grid_h, grid_w]`` bool: ``round((1 - ratio) * units)``
    units stay visible, chosen uniformly; the rest are masked."""
    _positive_int("batch_size", batch_size)
    _positive_int("grid_h", grid_h)
    _positive_int("grid_w", grid_w)
    ratio = _ratio(ratio)
    n = _cells(batch_size, grid_h * grid_w, "grid_h * grid_w")
    visible = round((1.0 - ratio) * n)
    return _choose_k(batch_size, n, n - visible, _seed(seed)).view(batch_size, grid_h, grid_w)


def random_masks(batch_size, num_tokens, ratio=0.75, seed=None):
    """MAE random masking. Returns ``(ids_keep [B, L] int64, ids_restore [B, N] int64, mask [B, N] bool)``
    with ``L = int(N * (1 - ratio))`` kept tokens; ``mask`` is True at dropped tokens (original order)."""
    _positive_int("batch_size", batch_size)
    _positive_int("num_tokens", num_tokens)
    _cells(batch_size, num_tokens, "num_tokens")
    ratio = _ratio(ratio)
    keep = int(num_tokens * (1.0 - ratio))
    return _shuffle(batch_size, num_tokens, keep, _seed(seed))
