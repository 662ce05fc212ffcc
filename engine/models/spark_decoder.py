"""SparK's densifier and light UNet decoder.

Densify (one per encoder scale, smallest first; ``a_i`` the activity map at that scale)::

    d_i = Proj_i( where(a_i, Norm_i(f_i), m_i) )       Norm_i: sparse BN (ResNet) / sparse LN (ConvNeXt),
                                                      m_i: learned mask token [C_i], Proj_i: 1x1 conv at the
                                                      smallest scale, 3x3 elsewhere, to width / 2^i channels

Decoder with ``n = log2(downsample_ratio)`` UNet blocks, widths ``w_i = width / 2^i``::

    x = 0;  for i in 0..n:  x = x + d_i (if scale i exists);  x = Block_i(x) (if i < n)
    Block_i = ConvTranspose2d(w_i, w_i, k4, s2) -> conv3x3(w_i -> w_i) -> BN -> ReLU6
              -> conv3x3(w_i -> w_{i+1}) -> BN                      (no activation after the last BN)
    out = conv1x1(w_n -> 3)

At ratio 32 with 4 scales this is SparK's decoder (5 blocks, densified features added at the first 4 levels).
The block ends with a BatchNorm, as the official ``UNetBlock``: the sum with the next densified feature and
the 1x1 projection see signed, unclipped values. (An earlier version of this file ended each block with a
second ReLU6, clipping every level to [0, 6].) At ratio 8 (the CPU variants, 4 scales, 3 blocks) the feature
of the finest scale is added after the last block, before the projection; the official decoder has no such
level.

Init as the official ``LightDecoder.initialize`` / ``SparK.__init__``: Conv2d weights trunc-normal std 0.02
cut at +-2 (timm's absolute default, i.e. practically untruncated), ConvTranspose2d weights Kaiming-normal
(fan_out, ReLU), zero biases, unit BN; mask tokens trunc-normal std 0.02 cut at +-0.02.

Batch norms are plain ``nn.BatchNorm2d`` / :class:`kernels.SparseBatchNorm2d`; under DDP the SparK method
converts them (and the encoder's) to synchronised ones (the official ``sbn=True``; see
:mod:`engine.methods.sync_bn`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels.sparse_conv import SparseBatchNorm2d, SparseLayerNorm


class UNetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cin, 3, padding=1, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return self.conv(self.up(x))


class LightDecoder(nn.Module):
    def __init__(self, downsample_ratio: int, width: int = 768, out_chans: int = 3):
        super().__init__()
        n = int(round(math.log2(downsample_ratio)))
        if 2**n != downsample_ratio:
            raise ValueError(f"downsample_ratio must be a power of 2, got {downsample_ratio}")
        if width % (2**n):
            raise ValueError(f"decoder width {width} must be divisible by 2^{n} (the number of halvings)")
        self.widths = [width // 2**i for i in range(n + 1)]
        self.dec = nn.ModuleList([UNetBlock(self.widths[i], self.widths[i + 1]) for i in range(n)])
        self.proj = nn.Conv2d(self.widths[-1], out_chans, kernel_size=1)
        _init(self)

    def forward(self, to_dec: list[torch.Tensor | None]) -> torch.Tensor:
        x = 0
        for i in range(len(self.dec) + 1):
            if i < len(to_dec) and to_dec[i] is not None:
                x = x + to_dec[i]
            if i < len(self.dec):
                x = self.dec[i](x)
        return self.proj(x)


class Densifier(nn.Module):
    """Per-scale sparse norm + mask-token fill + projection to the decoder widths (smallest scale first)."""

    def __init__(self, channels: list[int], widths: list[int], norm: str):
        super().__init__()
        if norm not in ("bn", "ln"):
            raise ValueError(f"norm must be 'bn' or 'ln', got {norm!r}")
        if len(channels) > len(widths):
            raise ValueError(f"{len(channels)} encoder scales but only {len(widths)} decoder levels")
        self.norms = nn.ModuleList(
            [
                SparseBatchNorm2d(c)
                if norm == "bn"
                else SparseLayerNorm(c, eps=1e-6, data_format="channels_first")
                for c in channels
            ]
        )
        self.mask_tokens = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1)) for c in channels])
        self.projs = nn.ModuleList(
            [
                nn.Conv2d(c, widths[i], kernel_size=1 if i == 0 else 3, padding=0 if i == 0 else 1, bias=True)
                for i, c in enumerate(channels)
            ]
        )
        for t in self.mask_tokens:
            nn.init.trunc_normal_(t, std=0.02, a=-0.02, b=0.02)
        _init(self)

    def normalise(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The sparse norms (call inside the encoder's ``sparse_context``)."""
        return [norm(f) for norm, f in zip(self.norms, feats)]

    def fill(self, feats: list[torch.Tensor], actives: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for f, a, tok, proj in zip(feats, actives, self.mask_tokens, self.projs):
            f = torch.where(a.unsqueeze(1), f, tok.to(f.dtype).expand_as(f))
            out.append(proj(f))
        return out


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
