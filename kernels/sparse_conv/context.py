"""The activity map of the current masked forward pass, passed to sparse layers through a context.

SparK keeps one mask per forward and lets every sparse layer read the mask at its own resolution. Here::

    with sparse_context(active):          # bool [B, H, W]: input resolution or SparK's coarse unit mask
        features = model(x)

Inside the block every sparse module (``SparseConv2d``, ``SparseBatchNorm2d``, ...) asks
:func:`current_maps` for the map at its input resolution and strided layers record the map of their output
resolution (the cell rule of :func:`kernels.sparse_conv.active.downsample_active`). Maps of resolutions not
recorded yet are derived from a recorded one: coarser by the cell rule, finer by nearest upsampling when
the sizes divide (e.g. a 7 x 7 unit mask feeding a 224 x 224 stem). Every derived map carries the mark of
its mask units (:func:`kernels.sparse_conv.active.unit_structure`): the given map is its own unit mask, so the
Triton kernels tile every layer over whole units, from one unit list per step
(:meth:`~kernels.sparse_conv.active.UnitGrid.index`, built on first use and shared by every scale).
Outside a ``sparse_context`` the sparse modules behave exactly like their dense parents. A ``contextvars.ContextVar`` holds the state, so threads
and asyncio tasks each see their own map.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from kernels.sparse_conv.active import UnitGrid, downsample_active, mark_units, unit_structure, upsample_active

_current: contextvars.ContextVar[ActivityMaps | None] = contextvars.ContextVar(
    "sparse_activity", default=None
)


class ActivityMaps:
    """bool activity maps ``[B, H, W]`` of one forward pass, keyed by resolution ``(H, W)``."""

    def __init__(self, active: torch.Tensor, gather_rows: bool = True):
        if not isinstance(active, torch.Tensor) or active.dtype != torch.bool or active.dim() != 3:
            raise TypeError(
                "sparse_context: expected a bool tensor [B, H, W] (True = active/visible), got "
                f"{getattr(active, 'dtype', type(active).__name__)} {tuple(getattr(active, 'shape', ()))}"
            )
        self.batch = active.shape[0]
        if unit_structure(active) is None and not torch.compiler.is_compiling():  # its own unit mask (1-site units)
            mark_units(active, UnitGrid(active), (1, 1))
        self.maps: dict[tuple[int, int], torch.Tensor] = {(active.shape[1], active.shape[2]): active}
        self._sites: dict[tuple[int, int], torch.Tensor] = {}
        self.gather_rows = bool(gather_rows)
        """Models may run per-site layers (e.g. ConvNeXt's MLP) on the gathered active rows (False: on every
        site, as SparK's dense code does; the bench's dense reference)."""

    def sites(self, size, batch: int | None = None) -> torch.Tensor:
        """Flat indices ``b*H*W + h*W + w`` (int64, ascending) of the active sites at ``size``, computed once
        per resolution and shared by every layer that works on gathered rows (one host sync on CUDA)."""
        key = (int(size[0]), int(size[1]))
        cached = self._sites.get(key)
        if cached is None:
            cached = self.get(key, batch).reshape(-1).nonzero().reshape(-1)
            self._sites[key] = cached
        return cached

    def __contains__(self, size) -> bool:
        return tuple(size) in self.maps

    def set(self, size, active: torch.Tensor) -> None:
        self.maps[(int(size[0]), int(size[1]))] = active

    def get(self, size, batch: int | None = None) -> torch.Tensor:
        """The map at ``size = (H, W)``: recorded, else derived from a recorded one (see module doc)."""
        H, W = int(size[0]), int(size[1])
        if batch is not None and batch != self.batch:
            raise ValueError(
                f"sparse_context: the activity map has batch {self.batch}, the layer input has {batch}"
            )
        if (H, W) in self.maps:
            return self.maps[(H, W)]
        finer = sorted((k for k in self.maps if k[0] >= H and k[1] >= W), key=lambda k: k[0] * k[1])
        for h, w in finer:
            sh, sw = max(1, round(h / H)), max(1, round(w / W))
            if -(-h // sh) == H and -(-w // sw) == W:
                out = downsample_active(self.maps[(h, w)], (sh, sw), (H, W))
                self.maps[(H, W)] = out
                return out
        coarser = sorted((k for k in self.maps if k[0] <= H and k[1] <= W), key=lambda k: -k[0] * k[1])
        for h, w in coarser:
            if H % h == 0 and W % w == 0:
                out = upsample_active(self.maps[(h, w)], (H // h, W // w))
                self.maps[(H, W)] = out
                return out
        raise ValueError(
            f"sparse_context: no activity map for resolution {H}x{W} and none can be derived from "
            f"the recorded resolutions {sorted(self.maps)}"
        )


@contextlib.contextmanager
def sparse_context(active: torch.Tensor, *, gather_rows: bool = True) -> Iterator[ActivityMaps]:
    """Run sparse modules inside the block on the activity map ``active`` (bool ``[B, H, W]``, True = active).

    ``gather_rows``: per-site layers of the model (ConvNeXt's LN/MLP) may compute on the active rows only
    (see :attr:`ActivityMaps.gather_rows`)."""
    token = _current.set(ActivityMaps(active, gather_rows))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def current_maps() -> ActivityMaps | None:
    """The :class:`ActivityMaps` of the enclosing :func:`sparse_context`, or None (dense mode)."""
    return _current.get()
