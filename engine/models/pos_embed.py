"""Position tables at the start of fine-tuning: the shared relative position bias copied into every layer, and
absolute / relative tables resampled when the fine-tuning patch grid differs from the pre-training one.

Layouts (this engine's ViT, :mod:`engine.models.vit`; the names timm/unilm use in brackets):

* shared relative position bias ``rel_pos_bias.relative_position_bias_table`` [R, H], one table for all layers
  (BEiT / SimMIM pre-training);
* per-layer tables ``blocks.<i>.rel_pos_bias.relative_position_bias_table`` [R, H]
  (unilm ``blocks.<i>.attn.relative_position_bias_table``; BEiT / SimMIM fine-tuning);
* ``R = (2 Wh - 1)(2 Ww - 1) + 3``: row ``(dy + Wh - 1)(2 Ww - 1) + (dx + Ww - 1)`` holds offset (dy, dx), then
  the three [CLS] rows (cls->token, token->cls, cls->cls; :mod:`kernels.attn.relative_position`);
* absolute ``pos_embed`` [1, extra + Wh * Ww, D] (``extra`` = 1 for the [CLS] row).

:func:`expand_shared_rel_pos_bias` is what unilm ``beit/run_class_finetuning.py`` and SimMIM's
``remap_pretrained_keys_vit`` do when the fine-tuning model has per-layer tables: every layer starts from a
copy (``clone``: the layers then train apart) of the shared table, which keeps the pre-trained function exactly.

Resampling, when the grid changes (another resolution or patch size):

* relative tables (:func:`resize_rel_pos_table`), ``mode="geometric"`` as BEiT and SimMIM: the source offsets
  are placed at the positions of a geometric progression ``1, 1 + q, 1 + q + q^2, ...`` whose ratio ``q`` (found
  by bisection in [1.01, 1.5]) stretches the source half-width to the target half-width, and a cubic
  interpolating spline through those positions (the official code calls ``scipy.interpolate.interp2d(kind=
  "cubic")``, removed from SciPy 1.14; ``RectBivariateSpline(kx=ky=3, s=0)`` is the same interpolating spline on a
  rectilinear grid) is evaluated at the integer target offsets, head by head; the three [CLS] rows are kept.
  Target offsets beyond the outermost source position (only when even q = 1.5 falls short: a grid more than
  ~2.5x larger) take the nearest edge value, as ``interp2d``'s default (``fill_value=None``) does.
  ``mode="bicubic"`` resizes the offset grid with ``F.interpolate`` instead (timm's ``resize_rel_pos_bias_table``).
* absolute tables (:func:`resize_pos_embed`): the patch rows as a grid, bicubic ``F.interpolate``
  (``align_corners=False``), the [CLS] row kept -- as BEiT, DeiT and timm.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F

SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
_LAYER_TABLE = "blocks.{}.rel_pos_bias.relative_position_bias_table"
_EXTRA_ROWS = 3  # cls->token, token->cls, cls->cls


def table_rows(window: tuple[int, int], with_cls: bool = True) -> int:
    wh, ww = int(window[0]), int(window[1])
    return (2 * wh - 1) * (2 * ww - 1) + (_EXTRA_ROWS if with_cls else 0)


def window_of_table(rows: int, with_cls: bool = True) -> tuple[int, int]:
    """The square window ``(W, W)`` whose table has ``rows`` rows; ValueError when none does."""
    n = rows - (_EXTRA_ROWS if with_cls else 0)
    side = int(round(math.sqrt(max(n, 0))))
    if side * side != n or side % 2 == 0:
        raise ValueError(f"a relative position table of {rows} rows is not the table of a square window")
    w = (side + 1) // 2
    return (w, w)


def expand_shared_rel_pos_bias(state_dict: dict, depth: int) -> dict:
    """``state_dict`` with the shared table replaced by one copy per layer (``blocks.<i>.rel_pos_bias...``).

    A state dict without a shared table is returned unchanged (as a new dict); one that already has per-layer
    tables keeps them."""
    out = dict(state_dict)
    shared = out.pop(SHARED_TABLE, None)
    if shared is None:
        return out
    for i in range(int(depth)):
        out.setdefault(_LAYER_TABLE.format(i), shared.clone())
    return out


def geometric_positions(src_half: int, dst_half: int) -> np.ndarray:
    """Positions ``[-p_k .. -p_1, 0, p_1 .. p_k]`` (k = ``src_half``) of the source offsets: ``p_1 = 1``,
    ``p_{i+1} = p_i + q^i`` with the ratio ``q`` in [1.01, 1.5] for which ``1 + q + .. + q^(k-1)`` reaches
    ``dst_half`` (BEiT's rule; ``q`` stays at 1.5 when even that falls short, and the spline extrapolates)."""
    def progression_sum(q: float, n: int) -> float:
        return (1.0 - q ** n) / (1.0 - q)

    lo, hi, q = 1.01, 1.5, 1.01
    while hi - lo > 1e-6:  # bisection; as the official loop, the last midpoint is the ratio
        q = (lo + hi) / 2.0
        if progression_sum(q, src_half) > dst_half:
            hi = q
        else:
            lo = q
    pos, cur = [], 1.0
    for i in range(src_half):
        pos.append(cur)
        cur += q ** (i + 1)
    pos = np.asarray(pos, dtype=np.float64)
    return np.concatenate([-pos[::-1], [0.0], pos])


def _spline_resample(grid: np.ndarray, src_pos: np.ndarray, dst_pos: np.ndarray) -> np.ndarray:
    from scipy.interpolate import RectBivariateSpline

    k = min(3, len(src_pos) - 1)
    spline = RectBivariateSpline(src_pos, src_pos, grid, kx=k, ky=k, s=0)
    return spline(dst_pos, dst_pos)


def resize_rel_pos_table(table: torch.Tensor, src_window, dst_window, mode: str = "geometric",
                         with_cls: bool = True) -> torch.Tensor:
    """The ``[R_src, H]`` table of ``src_window`` resampled to ``dst_window`` (square windows); see the module
    docstring for the two modes. Same window: the table itself."""
    src, dst = tuple(int(v) for v in src_window), tuple(int(v) for v in dst_window)
    if table.ndim != 2 or table.shape[0] != table_rows(src, with_cls):
        raise ValueError(f"relative position table: expected [{table_rows(src, with_cls)}, heads] for window "
                         f"{src}, got {tuple(table.shape)}")
    if src == dst:
        return table
    if src[0] != src[1] or dst[0] != dst[1]:
        raise ValueError(f"relative position tables are resampled between square windows only, got {src} -> {dst}")
    if mode not in ("geometric", "bicubic"):
        raise ValueError(f"mode: expected 'geometric' or 'bicubic', got {mode!r}")
    extra = _EXTRA_ROWS if with_cls else 0
    s, d = 2 * src[0] - 1, 2 * dst[0] - 1
    body = table[: table.shape[0] - extra] if extra else table
    tail = table[table.shape[0] - extra:] if extra else table[:0]
    heads = table.shape[1]
    if mode == "bicubic":
        grid = body.float().T.reshape(1, heads, s, s)
        grid = F.interpolate(grid, size=(d, d), mode="bicubic", align_corners=False)
        new = grid.reshape(heads, d * d).T
    else:
        src_pos = geometric_positions(s // 2, d // 2)
        t = d // 2
        dst_pos = np.arange(-t, t + 0.1, 1.0)
        cols = []
        for h in range(heads):
            z = body[:, h].detach().double().reshape(s, s).cpu().numpy()
            cols.append(torch.from_numpy(_spline_resample(z, src_pos, dst_pos).reshape(-1)))
        new = torch.stack(cols, dim=1)
    return torch.cat([new.to(table.dtype).to(table.device), tail], dim=0).contiguous()


def resize_pos_embed(pos_embed: torch.Tensor, dst_grid, num_extra: int = 1) -> torch.Tensor:
    """``[1, extra + h*w, D]`` absolute table resized (bicubic) to ``dst_grid``; the extra rows are kept. The
    source grid must be square (as the official scripts assume); the target may be any ``(h, w)``."""
    if pos_embed.ndim != 3:
        raise ValueError(f"pos_embed: expected [1, tokens, dim], got {tuple(pos_embed.shape)}")
    n = pos_embed.shape[1] - num_extra
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"pos_embed: {n} patch rows are not a square grid")
    h, w = (int(dst_grid), int(dst_grid)) if isinstance(dst_grid, int) else (int(dst_grid[0]), int(dst_grid[1]))
    if (h, w) == (side, side):
        return pos_embed
    extra, patches = pos_embed[:, :num_extra], pos_embed[:, num_extra:]
    dim = patches.shape[-1]
    grid = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)
    return torch.cat([extra, grid], dim=1)


_TABLE_KEY = re.compile(r"(^|\.)relative_position_bias_table$")


def adapt_position_tables(state_dict: dict, target: dict, mode: str = "geometric") -> tuple[dict, list[str]]:
    """Make the position tables of a ViT ``state_dict`` fit the model whose state dict is ``target``: the shared
    relative table is expanded when the target has per-layer tables, relative and absolute tables are resampled
    when their grids differ. Returns the new state dict and a list of what was done (for the run's log)."""
    notes: list[str] = []
    out = dict(state_dict)
    per_layer = [k for k in target if k.startswith("blocks.") and _TABLE_KEY.search(k)]
    if SHARED_TABLE in out and SHARED_TABLE not in target and per_layer:
        depth = len(per_layer)
        out = expand_shared_rel_pos_bias(out, depth)
        notes.append(f"shared relative position bias copied into the {depth} layers' tables")
    for key in [k for k in out if _TABLE_KEY.search(k)]:
        if key not in target or out[key].shape == target[key].shape:
            continue
        src_w = window_of_table(out[key].shape[0])
        dst_w = window_of_table(target[key].shape[0])
        out[key] = resize_rel_pos_table(out[key], src_w, dst_w, mode=mode)
        if not notes or "resampled" not in notes[-1]:
            notes.append(f"relative position tables resampled ({mode}) from window {src_w} to {dst_w}")
    if "pos_embed" in out and "pos_embed" in target and out["pos_embed"].shape != target["pos_embed"].shape:
        extra = 1
        n_dst = target["pos_embed"].shape[1] - extra
        side = int(round(math.sqrt(n_dst)))
        before = out["pos_embed"].shape[1] - extra
        out["pos_embed"] = resize_pos_embed(out["pos_embed"], (side, side), extra)
        notes.append(f"absolute position embedding resized (bicubic) from {before} to {n_dst} patches")
    return out, notes
