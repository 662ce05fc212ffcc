"""Activity maps of sparse (submanifold) convolution: output sizes, the stride rule, active-site lists.

An activity map is a ``bool [B, H, W]`` tensor, True where a site carries a feature. Inactive sites are
treated as exact zeros by every sparse layer (they never contribute) and sparse layers write zeros there.

Output activity (the "cell rule"). Output site ``(i, j)`` of a stride-``(sh, sw)`` layer owns the input cell
``[i*sh, (i+1)*sh) x [j*sw, (j+1)*sw)`` (clipped to the input); it is active iff ANY site of its cell is
active::

    active_out[b, i, j] = any(active[b, i*sh:(i+1)*sh, j*sw:(j+1)*sw])

* stride 1 gives the submanifold rule ``active_out = active`` (for "same" padding, where ``Ho = H``);
* SparK masks are constant on 32-px units, so every cell of a network with total stride <= 32 is
  uniformly active or inactive and ``any == all``: the rule is exactly SparK's downsampled mask;
* ``any`` composes: a stride-2 layer followed by a stride-2 layer gives the stride-4 rule, so every path
  through a ResNet (stem + max-pool, strided 3x3, strided 1x1 shortcut) agrees on each resolution;
* cells past the input edge (``Ho * sh > H`` from large padding) are inactive; the cell anchors output
  ``(i, j)`` at input ``(i*sh, j*sw)``, the kernel centre for the usual padding ``p = d*(k-1)//2``.
  Pass ``active_out`` explicitly to :func:`kernels.sparse_conv2d` for any other convention.

Mask units. A map built by :func:`upsample_active` from a coarse map (SparK's unit mask) is constant on
``f x f`` blocks; it is marked with its :class:`UnitGrid` (the coarse map, snapshotted) and unit size, and so are
the maps derived from it by :func:`downsample_active` with a stride dividing the unit (SparK's every scale).
:func:`unit_structure` reads the mark back (None once the map was modified in place), :func:`unit_tiling` says
whether a convolution between two marked maps can run tiled over whole units (the Triton unit kernels), and
:meth:`UnitGrid.index` holds the unit lists those kernels use, built once per coarse mask and shared by every
layer, every scale and the backward.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


def pair(v, name: str) -> tuple[int, int]:
    """``v`` (an int or a pair of ints, not bools) as a pair; a TypeError naming ``name`` otherwise."""
    if isinstance(v, bool):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        return (v, v)
    if (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(isinstance(e, int) and not isinstance(e, bool) for e in v)
    ):
        return (int(v[0]), int(v[1]))
    raise TypeError(f"{name}: expected an int or a pair of ints, got {v!r}")


def conv_output_size(size, kernel_size, stride=1, padding=0, dilation=1):
    """``(Ho, Wo)`` of a convolution (same formula as ``F.conv2d``)."""
    (H, W), (kh, kw) = size, pair(kernel_size, "kernel_size")
    (sh, sw), (ph, pw), (dh, dw) = (
        pair(stride, "stride"),
        pair(padding, "padding"),
        pair(dilation, "dilation"),
    )
    return ((H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def downsample_active(active: torch.Tensor, stride=1, out_size=None) -> torch.Tensor:
    """The cell rule: ``bool [B, Ho, Wo]`` with ``active_out[b, i, j] = any(active[b, cell(i, j)])``.

    ``out_size`` defaults to ``ceil(H / sh), ceil(W / sw)``. Cells outside the input are inactive.
    """
    if not isinstance(active, torch.Tensor) or active.dtype != torch.bool or active.dim() != 3:
        raise TypeError(
            f"active: expected a bool tensor [B, H, W], got {getattr(active, 'dtype', type(active))} "
            f"{tuple(getattr(active, 'shape', ()))}"
        )
    sh, sw = pair(stride, "stride")
    if sh < 1 or sw < 1:
        raise ValueError(f"stride must be >= 1, got {(sh, sw)}")
    B, H, W = active.shape
    Ho, Wo = out_size if out_size is not None else (-(-H // sh), -(-W // sw))
    if (sh, sw) == (1, 1) and (Ho, Wo) == (H, W):
        return active
    out = _any_cells(_any_cells(active, 1, sh, Ho), 2, sw, Wo)
    marked = unit_structure(active)
    if marked is not None:  # constant units: the cell rule is exact, the output keeps the units (shrunk)
        grid, (uh, uw) = marked
        if uh % sh == 0 and uw % sw == 0 and (Ho, Wo) == (grid.shape[1] * uh // sh, grid.shape[2] * uw // sw):
            mark_units(out, grid, (uh // sh, uw // sw))
    return out


def _any_cells(a: torch.Tensor, dim: int, s: int, n_out: int) -> torch.Tensor:
    """``out[..., i, ...] = any(a[..., i*s:(i+1)*s, ...])`` along ``dim`` for ``n_out`` cells (False past the
    input). Intermediates stay within twice the input size, whatever the stride (a huge stride is one
    cell)."""
    L = a.shape[dim]
    held = min(n_out, -(-L // s))  # cells that contain input sites
    if held <= 1 or s >= L:
        part = a.narrow(dim, 0, min(s, L)).any(dim=dim, keepdim=True)
        part = part.narrow(dim, 0, held)
    else:  # here s < L, so the padding below is < L
        part = a.narrow(dim, 0, min(held * s, L))
        if part.shape[dim] < held * s:
            shape = list(part.shape)
            shape[dim] = held * s - part.shape[dim]
            part = torch.cat([part, part.new_zeros(shape)], dim=dim)
        shape = list(part.shape)
        shape[dim : dim + 1] = [held, s]
        part = part.reshape(shape).any(dim=dim + 1)
    if held < n_out:
        shape = list(part.shape)
        shape[dim] = n_out - held
        part = torch.cat([part, part.new_zeros(shape)], dim=dim)
    return part


def upsample_active(active: torch.Tensor, factor) -> torch.Tensor:
    """Nearest upsampling of a coarse map (e.g. SparK's 7x7 unit mask to a 56x56 feature map)."""
    fh, fw = pair(factor, "factor")
    out = active
    if fh > 1:
        out = out.repeat_interleave(fh, dim=1)
    if fw > 1:
        out = out.repeat_interleave(fw, dim=2)
    if active.dim() == 3 and active.dtype == torch.bool and _version(active) is not None:
        if unit_structure(active) is None:  # the coarse map is its own unit mask (1-site units), same grid
            mark_units(active, UnitGrid(active), (1, 1))
        grid, (uh, uw) = unit_structure(active)
        if out is not active:
            mark_units(out, grid, (uh * fh, uw * fw))
    return out


def active_site_index(active: torch.Tensor):
    """Flat indices ``b*H*W + h*W + w`` of the active sites (ascending) and their count, without a host sync.

    Returns ``(sites int64 [B*H*W], count int64 [1])``: the first ``count`` entries are the active sites, the
    rest are -1. The list is padded to the dense size so a kernel grid can be sized without reading
    ``count`` on the host; programs past ``count`` exit at once.
    """
    flat = active.reshape(-1)
    n = flat.numel()
    count = flat.sum(dtype=torch.int64).reshape(1)
    try:
        sites = torch.nonzero_static(flat, size=n, fill_value=-1).reshape(-1)
    except (AttributeError, NotImplementedError, RuntimeError):  # pragma: no cover - older builds
        idx = torch.arange(n, device=flat.device)
        sites = torch.where(flat, idx, torch.full_like(idx, n)).sort().values
        sites = torch.where(sites == n, torch.full_like(sites, -1), sites)
    return sites.to(torch.int64), count


_SITES = "_kernels_site_index"  # attribute on a map: (its active_site_index, map version when built)


def cached_site_index(active: torch.Tensor):
    """:func:`active_site_index`, built once per map (kept on the map, rebuilt after an in-place edit): the
    forward, dx and dW of every layer on the same map share one list. Not cached while compiling or for
    inference tensors."""
    version = _version(active)
    if version is None:
        return active_site_index(active)
    hit = getattr(active, _SITES, None)
    if hit is not None and hit[1] == version:
        return hit[0]
    index = active_site_index(active)
    setattr(active, _SITES, (index, version))
    return index


def active_fraction(active: torch.Tensor) -> float:
    """Fraction of active sites (host sync on CUDA; for reports and benches)."""
    return float(active.float().mean()) if active.numel() else 0.0


# ----------------------------------------------------------------------------------------------------------
# mask units (SparK): the unit grid of a coarse mask, the marks on maps built from it, the unit tiling rule

UNIT_REACH = 3
"""Neighbour window of the unit kernels, in units: offsets -3..3 (7 x 7 = 49 bits of an int64 per unit) cover
every SparK layer (a 3x3 or 7x7 stem on 8x8+ units reaches 1 unit, a 7x7 depthwise on 1x1 units 3)."""
UNIT_WINDOW = 2 * UNIT_REACH + 1
_MARK = "_kernels_unit_grid"  # attribute on a marked map: (UnitGrid, unit size, map version when marked)


class UnitGrid:
    """The mask units of one coarse unit mask ``bool [B, Hc, Wc]`` (snapshotted: later in-place edits of the
    caller's tensor do not reach it)."""

    def __init__(self, coarse: torch.Tensor):
        self.coarse = coarse.detach().clone()
        self.shape = tuple(coarse.shape)
        self._index = None

    def index(self):
        """``(order int32 [N], count int32 [1], bits int64 [N])`` with ``N = B*Hc*Wc``, built once (no host
        sync) and cached: ``order`` the flat unit indices ``b*Hc*Wc + cy*Wc + cx``, active units first (ascending),
        then the inactive ones; ``count`` the number of active units (on the device); ``bits[i]`` the activity
        of the 7 x 7 neighbourhood of unit ``order[i]`` (bit ``(dy+3)*7 + dx+3`` for offset ``(dy, dx)``; 0 past
        the edge, and 0 for an inactive unit), so a kernel tests any neighbour without reading a map."""
        if self._index is None:
            c = self.coarse
            flat = c.reshape(-1)
            order = torch.argsort((~flat).to(torch.uint8), stable=True)
            count = flat.sum(dtype=torch.int32).reshape(1)
            r, n = UNIT_REACH, UNIT_WINDOW
            cols = F.unfold(F.pad(c.unsqueeze(1).float(), (r, r, r, r)), n)  # [B, 49, Hc*Wc] of 0/1
            weights = torch.ones(n * n, dtype=torch.int64, device=c.device) << torch.arange(n * n, device=c.device)
            bits = (cols.to(torch.int64) * weights[None, :, None]).sum(1).reshape(-1) * flat
            self._index = (order.to(torch.int32), count, bits[order].contiguous())
        return self._index


def _version(t: torch.Tensor):
    """The in-place version counter, or None (inference tensors have none; traced tensors are not marked)."""
    if torch.compiler.is_compiling():
        return None
    try:
        return t._version
    except RuntimeError:
        return None


def mark_units(active: torch.Tensor, grid: UnitGrid, unit) -> None:
    """Record that ``active`` is ``grid``'s coarse mask upsampled by ``unit = (uh, uw)`` (constant units); a
    no-op while compiling and for inference tensors (no version counter to detect a later in-place edit)."""
    version = _version(active)
    if version is not None:
        setattr(active, _MARK, (grid, (int(unit[0]), int(unit[1])), version))


def unit_structure(active: torch.Tensor):
    """``(UnitGrid, (uh, uw))`` when ``active`` is a marked unit-structured map (see module doc), else None
    (unmarked, modified in place since it was marked, or a traced/fake tensor)."""
    version = _version(active)
    mark = getattr(active, _MARK, None) if version is not None else None
    if mark is None:
        return None
    grid, (uh, uw), marked_at = mark
    B, Hc, Wc = grid.shape
    if version != marked_at or tuple(active.shape) != (B, Hc * uh, Wc * uw):
        return None
    return grid, (uh, uw)


@dataclasses.dataclass(frozen=True)
class UnitTiling:
    """How a convolution between two maps of one :class:`UnitGrid` runs tiled over whole units: ``unit_in`` /
    ``unit_out`` sites per unit of the input and output maps (``unit_in = unit_out * stride``); ``dx`` False
    when the input gradient cannot (it then runs on the site list, ``dx_reason`` says why)."""

    grid: UnitGrid
    unit_in: tuple
    unit_out: tuple
    dx: bool
    dx_reason: str = ""

    def describe(self) -> str:
        u_i, u_o = self.unit_in, self.unit_out
        dx = "" if self.dx else f"; dx on the site list ({self.dx_reason})"
        return f"tiled over {u_o[0]}x{u_o[1]}-site output units ({u_i[0]}x{u_i[1]} input){dx}"


def _reach(lo: int, hi: int, unit: int) -> bool:
    """Are unit offsets floor(lo / unit) .. floor(hi / unit) inside the window?"""
    return lo // unit >= -UNIT_REACH and hi // unit <= UNIT_REACH


def unit_tiling(active_in, active_out, kernel_size, stride, padding, dilation):
    """``(UnitTiling, "")`` when the convolution can be tiled over whole mask units, else ``(None, reason)``.

    Needs both maps marked with the same grid, ``unit_in = unit_out * stride`` and every tap of a unit's sites
    inside the 7 x 7 unit neighbourhood (forward: input offsets ``-p .. (u_out-1)*s - p + (k-1)*d`` in units
    of ``u_in``; dx: output offsets ``floor((p - (k-1)*d)/s) .. floor((u_in-1+p)/s)`` in units of ``u_out``,
    and dilation 1 when strided: the parity classes)."""
    a, b = unit_structure(active_in), unit_structure(active_out)
    if a is None or b is None:
        which = "input" if a is None else "output"
        return None, f"the {which} activity map is not marked as mask units (not built by upsample_active)"
    if a[0] is not b[0]:
        return None, "the input and output maps come from different unit masks"
    if max(active_in.numel(), active_out.numel()) >= 2**31:
        return None, "2**31 sites or more (the unit kernels index sites in 32 bits)"
    u_in, u_out = a[1], b[1]
    dx, why = True, ""
    for dim in range(2):
        ui, uo, k, s, p, d = u_in[dim], u_out[dim], kernel_size[dim], stride[dim], padding[dim], dilation[dim]
        if ui != uo * s:
            return None, f"input unit {u_in} is not output unit {u_out} x stride {tuple(stride)}"
        if not _reach(-p, (uo - 1) * s - p + (k - 1) * d, ui):
            return None, f"kernel reach exceeds {UNIT_REACH} units of {u_in} sites"
        if s > 1 and d > 1:
            dx, why = False, "strided and dilated"
        elif not _reach((p - (k - 1) * d) // s, (ui - 1 + p) // s, uo):
            dx, why = False, f"transposed reach exceeds {UNIT_REACH} units of {u_out} sites"
    return UnitTiling(a[0], tuple(u_in), tuple(u_out), dx, why), ""
