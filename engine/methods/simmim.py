"""SimMIM: masked image modelling by direct pixel regression.

The encoder sees every patch, masked ones replaced by a learned mask token (kernels.masked_token_scatter).
The patch tokens form a ``[B, D, S/p, S/p]`` map; a 1x1 convolution to ``p^2 * 3`` channels followed by
``PixelShuffle(p)`` predicts the image. Loss, L1 on masked pixels only::

    L = sum_{c,i,j} |x - x_hat|_{c,i,j} * M_{i,j} / (sum_{i,j} M_{i,j} + 1e-5) / 3

Masks come from :func:`kernels.simmim_masks` through the loader's ``mask_fn``: ``ceil(ratio * U)`` of the
``U = (S / mask_patch)^2`` mask units, repeated onto the model's patch grid. The official mask unit is 32 px
at 224 px (7x7 units); for small images it is scaled down (``default_mask_patch``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.methods import register
from engine.methods.base import MASK_RATIO, PretrainMethod, backbone_from_cfg
from engine.trainer.config import Option
from engine.methods.simmim_swin import build_swin_simmim, is_swin_cfg, swin_reconstruct


def default_mask_patch(image_size: int, patch_size: int) -> int:
    """32 px for images >= 192 px; otherwise the largest multiple of the patch size <= image_size / 4 that
    divides the image (a 4x4 unit grid at 32 px with patch 4 -> 8 px units)."""
    if image_size >= 192 and image_size % 32 == 0 and 32 % patch_size == 0:
        return 32
    best = patch_size
    for cand in range(patch_size, image_size // 4 + 1, patch_size):
        if image_size % cand == 0:
            best = cand
    return best


def local_stats(images: torch.Tensor, window: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel, per-channel mean and ``sqrt(unbiased variance + eps)`` over the ``window x window`` neighbourhood
    (only the pixels inside the image count at the borders), in float32 or wider: SimMIM's ``norm_targets``."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"norm_target_window: expected an odd window >= 1, got {window}")
    x = images.to(torch.promote_types(images.dtype, torch.float32))
    pad = window // 2
    mean = F.avg_pool2d(x, window, 1, pad, count_include_pad=False)
    mean_sq = F.avg_pool2d(x * x, window, 1, pad, count_include_pad=False)
    count = F.avg_pool2d(torch.ones_like(x[:, :1]), window, 1, pad, count_include_pad=True) * window * window
    var = ((mean_sq - mean * mean) * count / (count - 1).clamp_min(1)).clamp_min(0)
    return mean, torch.sqrt(var + eps)


def local_normalize(images: torch.Tensor, window: int, eps: float = 1e-6) -> torch.Tensor:
    """SimMIM's normalised targets (``NORM_TARGET``): ``(x - mean) / std`` with :func:`local_stats` (``window``
    odd; the official SwinV2 configs use 47 at 192 px)."""
    mean, std = local_stats(images, window, eps)
    return ((images.to(mean.dtype) - mean) / std).to(images.dtype)


def _simmim_mask_fn(batch_size: int, seed: int, *, image_size: int, mask_patch: int, patch: int, ratio: float):
    return {"mask": kernels.simmim_masks(batch_size, image_size, mask_patch, patch, ratio, seed=seed)}


@register("simmim")
class SimMIM(PretrainMethod):
    defaults = dict(blr=5e-5, weight_decay=0.05, clip_grad=5.0, warmup_epochs=10, min_lr=5e-7, drop_path=0.1,
                    init_values=0.1, use_abs_pos_emb=False, use_shared_rel_pos_bias=True, qv_bias=True,
                    mask_ratio=0.6, pool="mean")
    options = (MASK_RATIO, Option("mask_patch_size", None, int, "SimMIM mask unit in pixels (default 32 at >=192 px, "
                                  "scaled down below)", range=">=1"),
               Option("norm_target_window", None, int, "simmim: regress locally normalised pixels (SimMIM's NORM_TARGET; "
                      "odd window in pixels, 47 in its SwinV2 configs); default: raw pixels", range=">=1"))

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        cfg = self.c
        self.swin = is_swin_cfg(cfg)
        if self.swin:  # Swin: mask token at the patch embedding, stride-32 decoder (engine/methods/simmim_swin.py)
            self.backbone, self.decoder = build_swin_simmim(cfg)
        else:
            self.backbone = backbone_from_cfg(cfg, use_mask_token=True, init_mode="timm")
        self.patch = self.backbone.patch_size
        self.image_size = int(cfg["image_size"])
        self.mask_patch = int(cfg.get("mask_patch_size") or default_mask_patch(self.image_size, self.patch))
        self.ratio = float(cfg["mask_ratio"])
        self.in_chans = 3
        self.norm_window = cfg.get("norm_target_window")
        if self.norm_window is not None and int(self.norm_window) % 2 == 0:
            raise ValueError(f"--norm-target-window: expected an odd number of pixels, got {self.norm_window}")
        if not self.swin:
            self.decoder = nn.Sequential(
                nn.Conv2d(self.backbone.embed_dim, self.patch ** 2 * self.in_chans, kernel_size=1),
                nn.PixelShuffle(self.patch),
            )

    def mask_fn(self):
        return functools.partial(_simmim_mask_fn, image_size=self.image_size, mask_patch=self.mask_patch,
                                 patch=self.patch, ratio=self.ratio)

    def encoder(self) -> nn.Module:
        return self.backbone

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.swin:
            return swin_reconstruct(self.backbone, self.decoder, images, mask)
        z = self.backbone.forward_features(images, mask=mask)[:, 1:]
        B, N, D = z.shape
        h, w = images.shape[2] // self.patch, images.shape[3] // self.patch
        z = z.transpose(1, 2).reshape(B, D, h, w)
        return self.decoder(z)

    def forward(self, batch: dict) -> dict:
        images, mask = batch["images"], batch["mask"]
        B = images.shape[0]
        h, w = images.shape[2] // self.patch, images.shape[3] // self.patch
        mask = mask.reshape(B, h, w)
        rec = self.reconstruct(images, mask)
        pix_mask = mask.repeat_interleave(self.patch, 1).repeat_interleave(self.patch, 2).unsqueeze(1)
        pix_mask = pix_mask.to(rec.dtype)
        target = images if self.norm_window is None else local_normalize(images, int(self.norm_window))
        l1 = F.l1_loss(target.to(rec.dtype), rec, reduction="none")
        loss = (l1 * pix_mask).sum() / (pix_mask.sum() + 1e-5) / self.in_chans
        return {"loss": loss.float()}
