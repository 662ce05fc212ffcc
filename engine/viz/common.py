"""Shared parts of the pictures: loading a run, validation images, display conversion, figure output.

Every picture is a matplotlib figure rendered headless (Agg) at a fixed size: ``cols * PANEL_IN`` by
``rows * PANEL_IN + TITLE_IN`` inches at ``DPI`` (:func:`figure_size_px`), saved without tight cropping so
the PNG has exactly that size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

PANEL_IN = 1.6  # inches per image panel
TITLE_IN = 0.5  # inches above the grid for the figure title
DPI = 100
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VizError(ValueError):
    """A user error (bad checkpoint, wrong kind for the method, bad data folder): one line, exit status 2."""


# ------------------------------------------------------------------------------------------------ runs
def load_run(checkpoint) -> tuple[dict, dict, Path]:
    """``(state, config, checkpoint file)`` of a file or output folder written by ``engine.pretrain``."""
    from engine.eval import load_checkpoint
    from engine.trainer.checkpoint import LAST, CheckpointError

    path = Path(checkpoint)
    file = path / LAST if path.is_dir() else path
    try:
        state = load_checkpoint(path)
    except FileNotFoundError as exc:
        raise VizError(str(exc)) from None
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - not a torch file, a truncated file, ...
        raise VizError(f"--checkpoint {file}: cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise VizError(f"--checkpoint {file}: not a checkpoint of engine.pretrain (no 'config'/'model' entries)")
    return state, dict(state["config"]), file


def method_name(state: dict) -> str:
    return str(state.get("method") or state["config"].get("method"))


def build_method_from_state(state: dict, device="cpu") -> nn.Module:
    """The pre-training method of a checkpoint with its trained weights, in eval mode (global RNG untouched)."""
    from engine.methods import UnknownMethodError, build_method

    cfg = dict(state["config"])
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            method = build_method(cfg["method"], cfg)
    except (ValueError, UnknownMethodError) as exc:
        raise VizError(f"cannot rebuild --method {cfg.get('method')} from the checkpoint: {exc}") from None
    method.load_state_dict(state["model"])
    return method.to(device).eval()


# ------------------------------------------------------------------------------------------------ data
def resolve_data(data_dir, cfg: dict) -> Path:
    """``--data``, else the run's ``data``, else the built-in dataset at the run's image size."""
    data = data_dir or cfg.get("data")
    if data is None:
        from engine.data import builtin_dataset

        return Path(builtin_dataset(image_size=int(cfg["image_size"])))
    if not Path(data).is_dir():
        raise VizError(f"--data: no such folder {data}")
    return Path(data)


def _folder(data_dir, split: str):
    from engine.data import ImageFolder

    data_dir = Path(data_dir)
    root = data_dir / split if (data_dir / split).is_dir() else data_dir
    try:
        folder = ImageFolder.scan(root, num_threads=2)
    except (FileNotFoundError, ValueError) as exc:
        raise VizError(f"--data {data_dir}: {exc}") from None
    if len(folder) == 0:
        raise VizError(f"--data {data_dir}: no images found in {root}")
    return folder


def _load(folder, indices, image_size: int) -> torch.Tensor:
    """The evaluation view (resize, centre crop, ImageNet normalisation) of the folder's images ``indices``."""
    from engine.data.torch_transforms import decode, eval_transform

    return torch.stack([eval_transform(decode(folder.files[int(i)]), int(image_size)) for i in indices]).float()


def val_images(data_dir, image_size: int, num_images: int, split: str = "val") -> torch.Tensor:
    """``num_images`` ImageNet-normalised evaluation-view images ``[n, 3, S, S]`` of ``data_dir/split`` (or of
    ``data_dir`` itself when it has no such split), picked evenly over the sorted folder so that several
    classes appear (deterministic)."""
    if num_images < 1:
        raise VizError(f"--num-images must be >= 1, got {num_images}")
    folder = _folder(data_dir, split)
    idx = np.unique(np.linspace(0, len(folder) - 1, min(num_images, len(folder))).round().astype(int))
    return _load(folder, idx, image_size)


def all_images(data_dir, image_size: int, limit: int, split: str = "val", batch_size: int = 128):
    """Batches of up to ``limit`` images of the split spread evenly over it (statistics over many images)."""
    folder = _folder(data_dir, split)
    idx = np.unique(np.linspace(0, len(folder) - 1, min(limit, len(folder))).round().astype(int))
    for start in range(0, len(idx), batch_size):
        yield _load(folder, idx[start:start + batch_size], image_size)


# ------------------------------------------------------------------------------------------------ display
def imagenet_to_unit(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised ``[B, 3, H, W]`` -> [0, 1] pixels (clamped)."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def to_display(images: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised ``[B, 3, H, W]`` -> ``[B, H, W, 3]`` float array in [0, 1] for imshow."""
    return imagenet_to_unit(images.detach().float().cpu()).permute(0, 2, 3, 1).numpy()


def upsample_grid(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest upsampling of a ``[..., h, w]`` map to ``size`` pixels (block repeat)."""
    h, w = values.shape[-2:]
    return values.repeat_interleave(size[0] // h, -2).repeat_interleave(size[1] // w, -1)


# ------------------------------------------------------------------------------------------------ figures
def pyplot():
    """matplotlib.pyplot on the headless Agg backend (imported lazily)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


ROW_LABEL_IN = 0.6  # inches left of the grid for row labels (when asked for)


def figure_size_px(rows: int, cols: int, row_labels: bool = False) -> tuple[int, int]:
    """``(width, height)`` in pixels of a picture with ``rows x cols`` image panels."""
    extra = ROW_LABEL_IN if row_labels else 0.0
    return round((cols * PANEL_IN + extra) * DPI), round((rows * PANEL_IN + TITLE_IN) * DPI)


def panel_figure(rows: int, cols: int, title: str, row_labels: bool = False):
    """A figure of ``rows x cols`` axes (2-D array) without ticks, exactly :func:`figure_size_px` big
    (``row_labels``: room on the left for ``set_ylabel`` of the first column)."""
    plt = pyplot()
    w, h = figure_size_px(rows, cols, row_labels)
    fig, axes = plt.subplots(rows, cols, figsize=(w / DPI, h / DPI), dpi=DPI, squeeze=False)
    top = 1.0 - TITLE_IN / (h / DPI)
    left = (ROW_LABEL_IN * DPI / w if row_labels else 0.0) + 0.01
    fig.subplots_adjust(left=left, right=0.99, bottom=0.01, top=top - 0.02, wspace=0.05, hspace=0.22)
    fig.suptitle(title, fontsize=10, y=1.0 - 0.25 * TITLE_IN / (h / DPI), va="center")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def save_figure(fig, path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders created), close it, return the path."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)
    return path


PLOT_W_IN, PLOT_H_IN = 4.0, 3.0  # inches per chart panel


def plot_size_px(cols: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of a picture with ``cols`` chart panels side by side."""
    return round(cols * PLOT_W_IN * DPI), round((PLOT_H_IN + TITLE_IN) * DPI)


def plot_figure(cols: int, title: str):
    """A row of ``cols`` chart axes (1-D array), exactly :func:`plot_size_px` big."""
    plt = pyplot()
    w, h = plot_size_px(cols)
    fig, axes = plt.subplots(1, cols, figsize=(w / DPI, h / DPI), dpi=DPI, squeeze=False)
    top = 1.0 - TITLE_IN / (h / DPI)
    fig.subplots_adjust(left=0.07 if cols > 1 else 0.14, right=0.98, bottom=0.14, top=top - 0.04, wspace=0.3)
    fig.suptitle(title, fontsize=10, y=1.0 - 0.3 * TITLE_IN / (h / DPI), va="center")
    return fig, axes[0]
