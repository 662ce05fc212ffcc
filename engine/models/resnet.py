"""ResNet backbones (He et al.) from plain torch modules, torchvision's parameter names and layout (v1.5:
the stride sits on the 3x3 conv of a bottleneck).

Stem ``conv7x7/2 - BN - ReLU - maxpool3x3/2`` then four stages of residual blocks at strides 1, 2, 2, 2::

    basic:       y = ReLU(x' + BN(conv3x3(ReLU(BN(conv3x3(x))))))
    bottleneck:  y = ReLU(x' + BN(conv1x1(ReLU(BN(conv3x3(ReLU(BN(conv1x1(x)))))))))     (expansion 4)

``x'`` is ``x`` or ``BN(conv1x1/s(x))`` when the shape changes. ``drop_path_rate`` (timm's ResNet option, which
SparK's ResNet-50 recipe sets to 0.05) drops the residual branch per sample before the sum, the rate growing
linearly from 0 at the first block to ``drop_path_rate`` at the last (timm's ``block_dpr``). ``forward(x)`` returns globally average
pooled features ``[B, C]`` (no classifier); ``forward_features(x)`` the four stage outputs (strides 4, 8, 16,
32 of the input). The CPU variant ``resnet_femto`` uses a CIFAR stem (``conv3x3/1 - BN - ReLU``, no
max-pool), so its stages sit at strides 1, 2, 4, 8 (``downsample_ratio`` 8: a 4 x 4 SparK grid at 32 px).

Every layer is a standard ``nn.Conv2d`` / ``nn.BatchNorm2d`` / pooling module, so
:func:`kernels.to_sparse` converts the network in place for SparK and its weights load into the dense model;
each ``ReLU(BN(.) (+ shortcut))`` goes through the batch norm's fused ``forward_relu`` when it has one (the
sparse batch norm's single pass over active sites).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.models.vit import DropPath

RESNET_CONFIGS: dict[str, dict] = {
    "resnet_femto": dict(block="basic", layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem="cifar"),
    "resnet18": dict(block="basic", layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem="imagenet"),
    "resnet34": dict(block="basic", layers=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem="imagenet"),
    "resnet50": dict(block="bottleneck", layers=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem="imagenet"),
    "resnet101": dict(block="bottleneck", layers=(3, 4, 23, 3), widths=(64, 128, 256, 512), stem="imagenet"),
}


def _bn_relu(bn: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``ReLU(bn(x) (+ residual))``. Sparse batch norms (:func:`kernels.to_sparse`) fuse the three into one
    pass over the active sites (their ``forward_relu``); dense ones run them one after another."""
    fused = getattr(bn, "forward_relu", None)
    if fused is not None:
        return fused(x, residual)
    y = bn(x)
    return torch.relu(y if residual is None else y + residual)


def _conv(cin, cout, k, stride=1):
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv(cin, width, 3, stride), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv(width, cout, 3), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = (
            nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = _bn_relu(self.bn1, self.conv1(x))
        if isinstance(self.drop_path, nn.Identity):
            return _bn_relu(self.bn2, self.conv2(out), idt)
        return self.relu(self.drop_path(self.bn2(self.conv2(out))) + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv(cin, width, 1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv(width, width, 3, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = _conv(width, cout, 1), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = (
            nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = _bn_relu(self.bn1, self.conv1(x))
        out = _bn_relu(self.bn2, self.conv2(out))
        if isinstance(self.drop_path, nn.Identity):
            return _bn_relu(self.bn3, self.conv3(out), idt)
        return self.relu(self.drop_path(self.bn3(self.conv3(out))) + idt)


class ResNet(nn.Module):
    def __init__(
        self,
        block: str = "bottleneck",
        layers=(3, 4, 6, 3),
        widths=(64, 128, 256, 512),
        stem: str = "imagenet",
        in_chans: int = 3,
        zero_init_residual: bool = False,
        drop_path_rate: float = 0.0,
        name: str = "",
    ):
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"layers and widths need 4 entries, got {layers!r}, {widths!r}")
        self.config = dict(
            arch="resnet",
            name=name,
            block=block,
            layers=tuple(layers),
            widths=tuple(widths),
            stem=stem,
            in_chans=in_chans,
            zero_init_residual=zero_init_residual,
            drop_path_rate=float(drop_path_rate),
        )
        B = BasicBlock if block == "basic" else Bottleneck
        w0 = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, w0, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_chans, w0, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU(inplace=False)
        cin = w0
        self.feature_channels: list[int] = []
        total, k = sum(layers), 0
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                dpr = float(drop_path_rate) * k / max(total - 1, 1)
                k += 1
                blocks.append(B(cin, w, stride=(1 if i == 0 else 2) if j == 0 else 1, drop_path=dpr))
                cin = w * B.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_channels.append(cin)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = self.embed_dim = cin
        stem_stride = 4 if stem == "imagenet" else 1
        self.feature_strides = [stem_stride * 2**i for i in range(4)]
        self.downsample_ratio = self.feature_strides[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of the four stages (strides ``feature_strides``)."""
        if x.ndim != 4:
            raise ValueError(f"images: expected [B, C, H, W], got {tuple(x.shape)}")
        x = self.maxpool(_bn_relu(self.bn1, self.conv1(x)))
        feats = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """Global-average-pooled features ``[B, C]`` (``pool``: accepted for the ViT interface)."""
        return self.avgpool(self.forward_features(x)[-1]).flatten(1)


def build_resnet(name: str, **overrides) -> ResNet:
    if name not in RESNET_CONFIGS:
        raise ValueError(f"model: unknown ResNet {name!r}; available: {', '.join(sorted(RESNET_CONFIGS))}")
    cfg = dict(RESNET_CONFIGS[name])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return ResNet(name=name, **cfg)
