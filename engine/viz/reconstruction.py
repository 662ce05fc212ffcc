"""Masked-image-modelling reconstructions (SimMIM, SparK).

For each validation image ``x`` (ImageNet-normalised), a mask ``M`` drawn by the method's own mask generator
(the loader's ``mask_fn``, True = masked) and the method's prediction ``x^`` (``method.reconstruct``), one row::

    original x  |  masked input x * (1 - M) (masked patches grey)  |  M * x^ + (1 - M) * x  |  x^

SimMIM regresses ImageNet-normalised pixels, shown as they are. SparK regresses per-patch normalised targets
``T_p = (P(x)_p - mu_p) / sqrt(var_p + 1e-6)`` (r x r patches), so its prediction is de-normalised with each
patch's own statistics of the original image, ``P(x^)_p * sqrt(var_p + 1e-6) + mu_p`` (the SparK paper's
pictures), before display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.viz.common import (
    VizError,
    build_method_from_state,
    load_run,
    panel_figure,
    resolve_data,
    save_figure,
    to_display,
    upsample_grid,
    val_images,
)

METHODS = ("simmim", "spark")
COLUMNS = ("original", "masked input", "prediction pasted", "full prediction")
SPARK_EPS = 1e-6  # engine.methods.spark.spark_loss's variance epsilon


def composite(images: torch.Tensor, pred: torch.Tensor, pix_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The picture's columns from images, a prediction (same space) and a pixel mask ``[B, 1, H, W]`` bool
    (True = masked): ``masked`` (masked pixels set to 0, i.e. the mean colour after ImageNet normalisation),
    ``pasted`` (prediction at masked pixels, the input elsewhere) and ``full`` (the prediction)."""
    if images.shape != pred.shape:
        raise ValueError(f"pred: expected the images' shape {tuple(images.shape)}, got {tuple(pred.shape)}")
    if pix_mask.dtype != torch.bool or pix_mask.shape != (images.shape[0], 1, *images.shape[2:]):
        raise ValueError(f"pix_mask: expected bool [B, 1, H, W] = {(images.shape[0], 1, *images.shape[2:])}, got "
                         f"{pix_mask.dtype} {tuple(pix_mask.shape)}")
    return {"original": images, "masked": images.masked_fill(pix_mask, 0.0),
            "pasted": torch.where(pix_mask, pred, images), "full": pred}


def patch_denormalise(pred: torch.Tensor, images: torch.Tensor, p: int, eps: float = SPARK_EPS) -> torch.Tensor:
    """Undo SparK's per-patch target normalisation: each ``p x p`` patch (all channels) of ``pred`` is mapped
    ``t * sqrt(var + eps) + mu`` with ``mu``/``var`` (unbiased) of the same patch of ``images``."""
    B, C, H, W = images.shape
    if H % p or W % p:
        raise ValueError(f"images: H, W must be divisible by the patch size {p}, got {tuple(images.shape)}")
    if pred.shape != images.shape:
        raise ValueError(f"pred: expected {tuple(images.shape)}, got {tuple(pred.shape)}")

    def blocks(x):  # [B, C, H, W] -> [B, h, w, C*p*p] per-patch vectors
        return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, H // p, W // p, -1)

    dtype = torch.promote_types(torch.promote_types(pred.dtype, images.dtype), torch.float32)
    ref = blocks(images.to(dtype))
    mean = ref.mean(-1, keepdim=True)
    std = (ref.var(-1, keepdim=True) + eps).sqrt()
    out = blocks(pred.to(dtype)) * std + mean
    return out.reshape(B, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W).to(pred.dtype)


@torch.no_grad()
def predict(method, images: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{"pred": [B, 3, H, W] in the images' space, "mask": [B, 1, H, W] bool}`` for a SimMIM or SparK
    method, masks drawn by the method's own ``mask_fn`` with ``seed``."""
    name = getattr(method, "name", "")
    if name not in METHODS:
        raise VizError(f"reconstruction needs a --method {' or '.join(METHODS)} checkpoint, got --method {name}")
    B = images.shape[0]
    mask = method.mask_fn()(B, seed)["mask"].to(images.device)  # [B, g, g], True = masked
    if name == "simmim":
        pred = method.reconstruct(images, mask)
        if getattr(method, "norm_window", None) is not None:  # undo the local target normalisation
            from engine.methods.simmim import local_stats

            mean, std = local_stats(images, int(method.norm_window))
            pred = (pred.float() * std + mean).to(pred.dtype)
    else:
        pred = patch_denormalise(method.reconstruct(images, ~mask), images, method.ratio)
    pix = upsample_grid(mask, tuple(images.shape[-2:])).unsqueeze(1)
    return {"pred": pred.float(), "mask": pix}


def render(checkpoint, out_dir, data_dir=None, num_images: int = 4, device="cpu", seed: int = 0) -> list[Path]:
    """Write ``reconstruction.png`` (one row per image, :data:`COLUMNS`) and return its path."""
    state, cfg, _ = load_run(checkpoint)
    name = cfg.get("method")
    if name not in METHODS:
        raise VizError(f"reconstruction: a --method {name} checkpoint predicts no pixels (only "
                       f"{', '.join(METHODS)} do)")
    method = build_method_from_state(state, device)
    images = val_images(resolve_data(data_dir, cfg), int(cfg["image_size"]), num_images).to(device)
    out = predict(method, images, seed=seed)
    cols = composite(images, out["pred"], out["mask"])
    pictures = {k: to_display(v) for k, v in cols.items()}
    masked = pictures["masked"]
    grey = np.array([0.5, 0.5, 0.5])
    pix = out["mask"][:, 0].cpu().numpy()
    masked[pix] = grey  # masked patches shown as flat grey
    n = images.shape[0]
    step = int(state.get("step", 0))
    fig, axes = panel_figure(n, len(COLUMNS), f"{name} {cfg.get('model')} step {step}: reconstructions "
                                             f"({pix.mean() * 100:.0f}% masked)")
    for i in range(n):
        for j, key in enumerate(("original", "masked", "pasted", "full")):
            ax = axes[i, j]
            ax.imshow(pictures[key][i], interpolation="nearest")
            if i == 0:
                ax.set_title(COLUMNS[j], fontsize=9)
    return [save_figure(fig, Path(out_dir) / "reconstruction.png")]
