"""SparK: masked image modelling for convnets with sparse convolution.

Masks: :func:`kernels.spark_masks` on the encoder's downsample grid (``S / r`` per side; r = 32 for
ResNet/ConvNeXt, 8 for the CPU variants ``resnet_femto`` / ``convnext_femto``), 60% of units masked. With
``a`` the visible-unit map (``~mask``) upsampled to each scale::

    x_in   = x * a                                            (input zeroed at masked units)
    f_1..4 = Enc(x_in)   inside kernels.sparse_context(a)     (the dense encoder converted in place by
                                                               kernels.to_sparse: only active sites computed,
                                                               BN/LN statistics over active sites)
    d_i    = Proj_i(where(a_i, Norm_i(f_i), m_i))      smallest scale first (engine.models.spark_decoder)
    x^     = LightDecoder(d)                           UNet: ConvTranspose k4 s2, conv3x3-BN-ReLU6-conv3x3-BN
    L      = sum_{masked p} mean_j (P(x^)_pj - T_pj)^2 / #masked,  T_p = (P(x)_p - mu_p) / sqrt(var_p + 1e-6)

``P`` patchifies at r px. ``encoder()`` is the converted encoder: outside a ``sparse_context`` it computes
exactly the dense model (global-average-pooled features for k-NN) and its ``state_dict`` has the dense
model's names, so the weights load into :func:`build_convnet` models unchanged.

Paper: batch 4096, blr 2e-4, LAMB (beta2 0.95 ResNet / 0.999 ConvNeXt), wd cosine 0.04 -> 0.2, 40 warm-up
epochs, clip 5 (global norm), RRC (0.67, 1) + flip; ``--optimizer lamb`` (the paper presets) runs it, the
CPU preset uses AdamW. Under DDP every batch norm (encoder, densify, decoder) is synchronised, as the
official ``sbn=True`` (``sync_batchnorm``; :mod:`engine.methods.sync_bn`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

import kernels
from engine.methods import register
from engine.methods.base import MASK_RATIO, PretrainMethod
from engine.trainer.config import Option
from engine.models.convnext import CONVNEXT_CONFIGS, build_convnext
from engine.models.resnet import RESNET_CONFIGS, build_resnet
from engine.models.spark_decoder import Densifier, LightDecoder
from kernels.sparse_conv import upsample_active


def convnet_names() -> list[str]:
    return sorted(RESNET_CONFIGS) + sorted(CONVNEXT_CONFIGS)


def build_convnet(name: str, drop_path: float | None = None) -> nn.Module:
    """A dense ResNet or ConvNeXt by name."""
    if name in RESNET_CONFIGS:
        return build_resnet(name, drop_path_rate=drop_path)
    if name in CONVNEXT_CONFIGS:
        return build_convnext(name, drop_path_rate=drop_path)
    raise ValueError(f"--method spark needs a convnet --model ({', '.join(convnet_names())}), got {name!r}")


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, (H/p)(W/p), p*p*C]`` (row-major patches)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def spark_loss(rec: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, p: int) -> torch.Tensor:
    """MSE to the per-patch normalised target over masked patches only.

    ``mask`` [B, H/p, W/p], True = masked."""
    target = patchify(images.float(), p)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
    target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (patchify(rec.float(), p) - target).pow(2).mean(dim=-1)  # [B, L]
    m = mask.reshape(mask.shape[0], -1).to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


def _spark_mask_fn(batch_size: int, seed: int, *, grid: int, ratio: float):
    return {"mask": kernels.spark_masks(batch_size, grid, grid, ratio, seed=seed)}


@register("spark")
class SparK(PretrainMethod):
    sync_batchnorm = True  # official sbn=True: encoder, densify and decoder batch norms synchronised
    defaults = dict(
        blr=2e-4,
        weight_decay=0.04,
        weight_decay_end=0.2,
        clip_grad=5.0,
        warmup_epochs=40,
        min_lr=1e-6,
        beta2=0.95,
        drop_path=0.0,
        mask_ratio=0.6,
        pool="mean",
        decoder_width=768,
    )
    options = (MASK_RATIO,
               Option("decoder_width", None, int, "spark decoder width at the smallest scale (768)", range=">=1"))

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        c = self.c
        net = build_convnet(str(c["model"]), drop_path=float(c.get("drop_path") or 0.0))
        self.ratio = int(net.downsample_ratio)
        self.image_size = int(c["image_size"])
        if self.image_size % self.ratio:
            raise ValueError(
                f"--image-size {self.image_size} must be divisible by {c['model']}'s downsample "
                f"ratio {self.ratio}"
            )
        self.grid = self.image_size // self.ratio
        self.mask_ratio = float(c["mask_ratio"])
        if round((1.0 - self.mask_ratio) * self.grid * self.grid) < 1:
            raise ValueError(
                f"--mask-ratio {self.mask_ratio} leaves no visible unit on the {self.grid}x{self.grid} "
                "grid; use larger images or a smaller ratio"
            )
        if net.config["arch"] == "convnext":
            # the LayerNorm after global pooling serves only k-NN/fine-tuning; SparK never reaches it, so
            # it is frozen (at its identity init) rather than left without gradients (DDP would fail on it)
            net.norm.requires_grad_(False)
        self.sparse_report = kernels.to_sparse(net)
        self.net = net
        width = int(c["decoder_width"])
        self.decoder = LightDecoder(self.ratio, width)
        n_scales = len(net.feature_channels)
        widths = self.decoder.widths[:n_scales]
        norm = "bn" if net.config["arch"] == "resnet" else "ln"
        self.densify = Densifier(list(reversed(net.feature_channels)), widths, norm)
        self.strides = list(reversed(net.feature_strides))  # smallest scale first

    def mask_fn(self):
        return functools.partial(_spark_mask_fn, grid=self.grid, ratio=self.mask_ratio)

    def encoder(self) -> nn.Module:
        return self.net

    def reconstruct(self, images: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """``active`` bool [B, g, g] (True = visible) -> reconstruction [B, 3, H, W]."""
        pix = upsample_active(active, self.ratio).unsqueeze(1)
        x = images * pix.to(images.dtype)
        with kernels.sparse_context(active):
            feats = list(reversed(self.net.forward_features(x)))  # smallest scale first
            feats = self.densify.normalise(feats)
        actives = [upsample_active(active, self.ratio // s) for s in self.strides]
        return self.decoder(self.densify.fill(feats, actives))

    def forward(self, batch: dict) -> dict:
        images, mask = batch["images"], batch["mask"]
        B = images.shape[0]
        mask = mask.reshape(B, self.grid, self.grid)
        rec = self.reconstruct(images, ~mask)
        return {"loss": spark_loss(rec, images, mask, self.ratio)}
