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
"""

from __future__ import annotations

import torch


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
    return _any_cells(_any_cells(active, 1, sh, Ho), 2, sw, Wo)


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


def active_fraction(active: torch.Tensor) -> float:
    """Fraction of active sites (host sync on CUDA; for reports and benches)."""
    return float(active.float().mean()) if active.numel() else 0.0
