"""ConvNeXt backbones (Liu et al. 2022) from plain torch modules, the official parameter names.

Stem ``conv k4/s4 - LN2d``; before stages 2-4 ``LN2d - conv k2/s2``. Block (``gamma``: layer scale 1e-6)::

    y = x + DropPath(gamma * pw2(GELU(pw1(LN(dwconv7x7(x))))))     LN, pw1, pw2 on channels-last features

``LayerNorm2d`` normalises over channels of an NCHW map (it is the module :func:`kernels.to_sparse`
recognises and makes sparse; the block's channels-last LayerNorm/Linear layers are per-site ops: inside a
``kernels.sparse_context`` they run on the gathered active rows only, inactive sites get zeros). ``forward``
returns globally average pooled features after a final LayerNorm ``[B, C]``; ``forward_features`` the four
stage outputs (strides 4, 8, 16, 32). The CPU variant ``convnext_femto`` has a 1x1 stem (stride 1), so its
stages sit at strides 1, 2, 4, 8 (``downsample_ratio`` 8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.vit import DropPath
from kernels.sparse_conv.context import current_maps
from kernels.sparse_conv.modules import rows_linear

CONVNEXT_CONFIGS: dict[str, dict] = {
    "convnext_femto": dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), stem_stride=1),
    "convnext_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), stem_stride=4),
    "convnext_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), stem_stride=4),
    "convnext_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), stem_stride=4),
}


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale > 0 else None
        self.drop_path = DropPath(drop_path)

    def _mlp(self, y, rows: bool = False):
        if rows:  # 2-D gathered rows: the two Linear layers' GEMMs in oneDNN (kernels' rows_linear)
            y = rows_linear(self.act(rows_linear(self.norm(y), self.pwconv1)), self.pwconv2)
        else:
            y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return self.gamma * y if self.gamma is not None else y

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        maps = current_maps()
        if maps is not None and maps.gather_rows:
            # sparse (SparK): LN, pw1, GELU, pw2 and gamma are per-site, so they run on the active rows only
            # (gathered once, scattered back with zeros at inactive sites, where x is zero too)
            B, H, W, C = y.shape
            idx = maps.sites((H, W), B)
            rows = self._mlp(y.reshape(B * H * W, C).index_select(0, idx), rows=True)
            y = y.new_zeros(B * H * W, C).index_copy(0, idx, rows).view(B, H, W, C)
        else:
            y = self._mlp(y)
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXt(nn.Module):
    def __init__(
        self,
        depths=(3, 3, 9, 3),
        dims=(96, 192, 384, 768),
        stem_stride: int = 4,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        layer_scale: float = 1e-6,
        name: str = "",
    ):
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"depths and dims need 4 entries, got {depths!r}, {dims!r}")
        self.config = dict(
            arch="convnext",
            name=name,
            depths=tuple(depths),
            dims=tuple(dims),
            stem_stride=stem_stride,
            in_chans=in_chans,
            drop_path_rate=drop_path_rate,
            layer_scale=layer_scale,
        )
        self.downsample_layers = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(in_chans, dims[0], stem_stride, stride=stem_stride),
                    LayerNorm2d(dims[0], eps=1e-6),
                )
            ]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2))
            )
        n = sum(depths)
        dpr = [
            float(drop_path_rate) * i / max(1, n - 1) for i in range(n)
        ]  # linear 0 -> rate over all blocks
        self.stages = nn.ModuleList()
        k = 0
        for i in range(4):
            self.stages.append(
                nn.Sequential(*[ConvNeXtBlock(dims[i], dpr[k + j], layer_scale) for j in range(depths[i])])
            )
            k += depths[i]
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # over active sites only once made sparse
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.feature_channels = list(dims)
        self.num_features = self.embed_dim = dims[-1]
        self.feature_strides = [stem_stride * 2**i for i in range(4)]
        self.downsample_ratio = self.feature_strides[-1]
        for m in self.modules():  # the official _init_weights: timm's trunc_normal_ (cut at +-2 absolute)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4:
            raise ValueError(f"images: expected [B, C, H, W], got {tuple(x.shape)}")
        feats = []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """``LN(mean_{h,w} x)`` of the last stage ``[B, C]`` (``pool`` accepted for the ViT interface)."""
        return self.norm(self.avgpool(self.forward_features(x)[-1]).flatten(1))


def build_convnext(name: str, **overrides) -> ConvNeXt:
    if name not in CONVNEXT_CONFIGS:
        raise ValueError(
            f"model: unknown ConvNeXt {name!r}; available: {', '.join(sorted(CONVNEXT_CONFIGS))}"
        )
    cfg = dict(CONVNEXT_CONFIGS[name])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return ConvNeXt(name=name, **cfg)
