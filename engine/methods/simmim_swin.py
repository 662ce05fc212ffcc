"""SimMIM on a Swin encoder (the paper's main setting: Swin-B, 192 px, window 6, 84.0 top-1 after fine-tuning).

The pieces :mod:`engine.methods.simmim` needs when ``cfg["model"]`` names a Swin (``swin_pico``, ``swin_tiny``,
``swin_small``, ``swin_base``, ``swin_large``):

* :func:`build_swin_simmim` -> ``(backbone, decoder)``: the Swin with a mask token (masked patches replaced at the
  patch-embedding level, as the official ``SwinTransformerForSimMIM``), and the decoder
  ``Conv2d(num_features, stride^2 * 3, 1) + PixelShuffle(stride)`` with the encoder stride
  ``patch_size * 2^(stages-1)`` (32 for patch 4 and 4 stages, as the official ``encoder_stride``).
* :func:`swin_reconstruct` -> the image predicted from the last-stage map [B, C, S/32, S/32].
* :func:`masked_l1_loss`: L1 on masked pixels only, ``sum |x - x_hat| M / (sum M + 1e-5) / 3`` with the patch-level
  mask upsampled to pixels (the same formula as the ViT path).

Masks are those of the ViT path: ``ceil(ratio * U)`` of the ``U = (S / mask_patch)^2`` mask units on the patch grid
(32-px units at 192 px with patch 4: 36 units, 22 masked, repeated 8x8 onto the 48x48 patch grid).

:class:`SwinSimMIM` is the whole method on its own (the contract of :class:`engine.methods.base.PretrainMethod`),
used by the tests and equal to what ``SimMIM`` does once it routes Swin models here.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.methods.base import PretrainMethod
from engine.models.swin import SwinTransformer, is_swin, swin_from_cfg

IN_CHANS = 3


def is_swin_cfg(cfg: dict) -> bool:
    """True when ``cfg["model"]`` names a Swin backbone."""
    return is_swin(cfg.get("model"))


def simmim_decoder(encoder: SwinTransformer) -> nn.Sequential:
    """1x1 conv from the last stage to ``stride^2 * 3`` channels, then PixelShuffle(stride) back to pixels."""
    stride = encoder.stride
    return nn.Sequential(nn.Conv2d(encoder.num_features, stride ** 2 * IN_CHANS, kernel_size=1),
                         nn.PixelShuffle(stride))


def build_swin_simmim(cfg: dict) -> tuple[SwinTransformer, nn.Sequential]:
    """``(backbone, decoder)`` for SimMIM on the Swin named by ``cfg["model"]`` (image size, patch size, window size,
    drop path and ``use_abs_pos_emb`` from the config; the ViT-only options are ignored)."""
    backbone = swin_from_cfg(cfg, use_mask_token=True)
    return backbone, simmim_decoder(backbone)


def swin_reconstruct(backbone: SwinTransformer, decoder: nn.Module, images: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] prediction from the masked encoding: the last-stage map (NHWC) -> NCHW -> decoder."""
    z = backbone.forward_features(images, mask=mask)  # [B, S/stride, S/stride, C]
    return decoder(z.permute(0, 3, 1, 2))


def masked_l1_loss(images: torch.Tensor, rec: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """L1 on the masked pixels, averaged over them and the channels; ``mask`` is bool [B, h, w] on the patch grid."""
    pix = mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1).to(rec.dtype)
    l1 = F.l1_loss(images.to(rec.dtype), rec, reduction="none")
    return ((l1 * pix).sum() / (pix.sum() + 1e-5) / images.shape[1]).float()


def _mask_fn(batch_size: int, seed: int, *, image_size: int, mask_patch: int, patch: int, ratio: float) -> dict:
    return {"mask": kernels.simmim_masks(batch_size, image_size, mask_patch, patch, ratio, seed=seed)}


class SwinSimMIM(PretrainMethod):
    """SimMIM with a Swin encoder, stand-alone (not registered: ``--method simmim`` builds it once simmim.py routes
    Swin models to :func:`build_swin_simmim` / :func:`swin_reconstruct`)."""

    defaults = dict(blr=1e-4, weight_decay=0.05, clip_grad=5.0, warmup_epochs=10, min_lr=5e-6, drop_path=0.0,
                    use_abs_pos_emb=False, mask_ratio=0.6, pool="mean")
    recipe = "simmim"

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        if not is_swin_cfg(cfg):
            raise ValueError(f"model: SwinSimMIM needs a Swin model, got {cfg.get('model')!r}")
        from engine.methods.simmim import default_mask_patch

        self.backbone, self.decoder = build_swin_simmim(cfg)
        self.patch = self.backbone.patch_size
        self.image_size = int(cfg["image_size"])
        self.mask_patch = int(cfg.get("mask_patch_size") or default_mask_patch(self.image_size, self.patch))
        self.ratio = float(self.c["mask_ratio"])

    def mask_fn(self):
        return functools.partial(_mask_fn, image_size=self.image_size, mask_patch=self.mask_patch,
                                 patch=self.patch, ratio=self.ratio)

    def encoder(self) -> nn.Module:
        return self.backbone

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return swin_reconstruct(self.backbone, self.decoder, images, mask)

    def forward(self, batch: dict) -> dict:
        images, mask = batch["images"], batch["mask"]
        B = images.shape[0]
        mask = mask.reshape(B, images.shape[2] // self.patch, images.shape[3] // self.patch)
        return {"loss": masked_l1_loss(images, self.reconstruct(images, mask), mask, self.patch)}


__all__ = ["SwinSimMIM", "build_swin_simmim", "is_swin_cfg", "masked_l1_loss", "simmim_decoder", "swin_reconstruct"]
