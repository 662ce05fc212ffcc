"""Swin Transformer backbones (Swin-T/S/B/L and a CPU-sized ``swin_pico``) on :func:`kernels.window_attention`.

Layout (timm's current ``SwinTransformer``, NHWC between stages)::

    patch_embed   conv p x p (stride p) + LayerNorm                    [B, S/p, S/p, C]
    layers.0      blocks                                               C,  S/p
    layers.i>0    downsample (PatchMerging: 2x2 concat, LN, Linear 4C -> 2C) + blocks   2^i C, S/(p 2^i)
    norm          LayerNorm of the last stage; ``pool`` = mean over positions -> [B, 8C]

Block (pre-norm, stochastic depth), in windows of ``w x w`` tokens, every second block shifted by ``w // 2``::

    x = x + DropPath(proj(WindowAttention(roll(LN(x), -s))))     rolled back by +s after the windows merge
    x = x + DropPath(MLP(LN(x)))                                  MLP = fc2(GELU(fc1(.))), hidden 4C

Window attention runs as one fused op per block (:func:`kernels.window_attention`): the learnable relative
position bias ``relative_position_bias_table[(2w-1)^2, H]`` gathered to [H, N, N] and, in shifted blocks, the
constant mask ``attn_mask`` [nW, N, N] (0 within a region, -100 across the wrap-around) are added inside the
kernel instead of to a materialised [B*nW, H, N, N] score tensor. A stage whose map is not larger than the
window uses one window of the map's size and no shift (as Swin and timm do).

SimMIM: ``forward_features(x, mask)`` replaces the embeddings of masked patches by ``mask_token`` after the
patch embedding (and its norm), before the optional absolute position embedding, through
:func:`kernels.masked_token_scatter` (the official ``SwinTransformerForSimMIM`` does ``x (1 - w) + t w``).

Parameter names are timm's (``layers.1.downsample.reduction.weight``,
``layers.0.blocks.1.attn.relative_position_bias_table``, ``norm.weight``, ``head.fc.weight``): the state dict
without ``mask_token`` loads into ``timm.create_model(**self.timm_spec())`` with ``strict=True``; the index and
mask buffers are non-persistent, as in timm. Init: truncated normal std 0.02 for linear weights, the
relative position tables, the mask token and the absolute table; zero biases; unit LayerNorms; PyTorch's
default for the patch convolution (as the official code and timm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.attn.relative_position import relative_position_index
from kernels.attn.reference import window_attention_reference
from engine.models.vit import DropPath, Mlp
from engine.models.vit import PatchEmbed as ViTPatchEmbed

SWIN_CONFIGS: dict[str, dict] = {
    # CPU variant: 32-px images, patch 2, 4x4 windows, 3 stages (grid 16 -> 8 -> 4), head dim 16, stride 8. Three
    # stages, not four, so that the pooled map keeps Swin's geometry: Swin-B's last stage is 6x6 at 192 px (7x7
    # at 224) and SimMIM's mask unit equals its stride (32 px); here 4x4 and 8 px. Four stages at 32 px end on a
    # 2x2 map whose mean is nearly a flattened image: that random init reached k-NN 88.3 (raw pixels 96.9),
    # which no MIM run on these digits approached (docs/measured_presets.md).
    "swin_pico": dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8)),
    # the paper's sizes (patch 4, window 7 at 224 px; SimMIM pre-trains at 192 px with window 6)
    "swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swin_large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}
# timm's entry points for the sizes above; timm_spec passes every architecture argument, so any image size
# and window load (the entry point only names the family)
_TIMM_NAMES = {
    (96, (2, 2, 6, 2)): "swin_tiny_patch4_window7_224",
    (96, (2, 2, 18, 2)): "swin_small_patch4_window7_224",
    (128, (2, 2, 18, 2)): "swin_base_patch4_window7_224",
    (192, (2, 2, 18, 2)): "swin_large_patch4_window7_224",
}
NORM_EPS = 1e-5  # nn.LayerNorm's default, used by the official code and timm


def is_swin(name) -> bool:
    return str(name) in SWIN_CONFIGS


def swin_model_names() -> list[str]:
    return sorted(SWIN_CONFIGS)


def _trunc_normal(t: torch.Tensor, std: float = 0.02) -> None:
    nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)


# ----------------------------------------------------------------------------------------------------------
# windows


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, wh * ww, C], windows row-major inside each image (row b is window b mod nW)."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.reshape(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: [B * nW, wh * ww, C] -> [B, H, W, C]."""
    wh, ww = window
    C = windows.shape[-1]
    x = windows.reshape(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def shifted_window_mask(resolution: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """Swin's SW-MSA mask [nW, N, N]: after the cyclic shift by ``-shift`` the map splits into 3 x 3 regions;
    tokens of different regions in one window get -100 (0 otherwise)."""
    H, W = resolution
    regions = torch.zeros(1, H, W, 1)
    cnt = 0
    for hs in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for ws in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            regions[:, hs[0]:hs[1], ws[0]:ws[1], :] = cnt
            cnt += 1
    win = window_partition(regions, window).squeeze(-1)  # [nW, N]
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class WindowAttention(nn.Module):
    """W-MSA with a learnable relative position bias (timm's ``WindowAttention`` parameter layout).

    ``forward(x [B*nW, N, C], mask [nW, N, N] or None) -> [B*nW, N, C]`` through
    :func:`kernels.window_attention`. ``attn_drop > 0`` while training runs the reference math path (the
    fused kernel has no dropout; Swin and SimMIM use 0).
    """

    def __init__(self, dim: int, num_heads: int, window_size: tuple[int, int], qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads = dim, num_heads
        self.window_size = tuple(window_size)
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        wh, ww = self.window_size
        self.window_area = wh * ww
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window_size, with_cls_token=False),
                             persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = float(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_position_bias(self) -> torch.Tensor:
        """[H, N, N] gathered from the table (a permuted view; the kernel takes any strides)."""
        n = self.window_area
        return self.relative_position_bias_table[self.relative_position_index.reshape(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        BW, N, C = x.shape
        if N != self.window_area or C != self.dim:
            raise ValueError(f"x must be [B*nW, {self.window_area}, {self.dim}], got {tuple(x.shape)}")
        # [BW, N, 3, H, d] -> 3 x [BW, H, N, d] strided views (no copy)
        q, k, v = self.qkv(x).reshape(BW, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias()
        if self.attn_drop > 0 and self.training:
            out = window_attention_reference(q, k, v, bias, mask, self.scale, dropout_p=self.attn_drop, training=True)
        else:
            out = kernels.window_attention(q, k, v, bias, mask, self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(BW, N, C)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"


class SwinTransformerBlock(nn.Module):
    """One (shifted-)window block on [B, H, W, C]."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        # a map not larger than the window: one window of the map's size, no shift (Swin, timm)
        self.window_size = tuple(min(r, window_size) for r in self.input_resolution)
        self.shift_size = tuple(0 if r <= window_size else shift_size for r in self.input_resolution)
        for r, w in zip(self.input_resolution, self.window_size):
            if r % w:
                raise ValueError(f"feature map {self.input_resolution} is not divisible into {window_size}x"
                                 f"{window_size} windows; choose an image size that is patch_size * 2^stage * window")
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = WindowAttention(dim, num_heads, self.window_size, qkv_bias, attn_drop, drop)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path2 = DropPath(drop_path)
        mask = shifted_window_mask(self.input_resolution, self.window_size, self.shift_size) if any(self.shift_size) \
            else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        shifted = any(self.shift_size)
        if shifted:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        windows = self.attn(window_partition(x, self.window_size), mask=self.attn_mask)
        x = window_reverse(windows, self.window_size, H, W)
        if shifted:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if (H, W) != self.input_resolution or C != self.dim:
            raise ValueError(f"block input must be [B, {self.input_resolution[0]}, {self.input_resolution[1]}, "
                             f"{self.dim}], got {tuple(x.shape)}")
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}"


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat (order (0,0), (1,0), (0,1), (1,1) in (row, col)), LayerNorm, Linear 4C -> 2C."""

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.norm = nn.LayerNorm(4 * dim, eps=NORM_EPS)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"patch merging needs an even feature map, got {H}x{W}")
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinTransformerStage(nn.Module):
    """Optional PatchMerging (every stage but the first), then ``depth`` blocks alternating W-MSA / SW-MSA."""

    def __init__(self, dim: int, out_dim: int, input_resolution: tuple[int, int], depth: int, downsample: bool,
                 num_heads: int, window_size: int, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_path: list[float]):
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim) if downsample else nn.Identity()
        res = tuple(r // 2 for r in input_resolution) if downsample else tuple(input_resolution)
        self.output_resolution = res
        self.blocks = nn.Sequential(*[
            SwinTransformerBlock(out_dim, res, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2,
                                 mlp_ratio, qkv_bias, drop, attn_drop, drop_path[i])
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class PatchEmbed(ViTPatchEmbed):
    """ViT's patch convolution, then LayerNorm (``patch_norm``), channels last: [B, 3, S, S] -> [B, S/p, S/p, C]."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, patch_norm: bool = True):
        super().__init__(img_size, patch_size, in_chans, embed_dim)
        self.norm = nn.LayerNorm(embed_dim, eps=NORM_EPS) if patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[2:]) != (self.img_size, self.img_size) or x.shape[1] != self.proj.in_channels:
            raise ValueError(f"images: expected [B, {self.proj.in_channels}, {self.img_size}, {self.img_size}] "
                             f"(Swin's windows and masks are built for one image size), got {tuple(x.shape)}")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class Head(nn.Module):
    """timm's ClassifierHead parameter layout: ``fc`` (a Linear, or Identity with ``num_classes=0``)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x):
        return self.fc(x)


class SwinTransformer(nn.Module):
    """Swin backbone. ``forward(x)`` gives pooled features [B, num_features] (through ``head``, an identity
    unless ``num_classes > 0``); ``forward_features(x, mask)`` the normalised last-stage map [B, h, w, C]."""

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, ape: bool = False, patch_norm: bool = True,
                 use_mask_token: bool = False, num_classes: int = 0, global_pool: str = "mean"):
        super().__init__()
        depths, num_heads = [int(d) for d in depths], [int(h) for h in num_heads]
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths {depths} and num_heads {num_heads} must name the same (>= 1) stages")
        if global_pool not in ("mean", "avg"):
            raise ValueError(f"global_pool: Swin has no cls token; expected 'mean', got {global_pool!r}")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.config = dict(arch="swin", img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                           embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
                           mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                           drop_path_rate=drop_path_rate, ape=ape, patch_norm=patch_norm,
                           use_mask_token=use_mask_token, num_classes=num_classes, global_pool="mean")
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.global_pool = "mean"
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, patch_norm)
        grid = self.patch_embed.grid_size
        if any(g % 2 ** (self.num_layers - 1) for g in grid):
            raise ValueError(f"img_size {img_size} / patch_size {patch_size} = {grid[0]} patches per side must be "
                             f"divisible by 2^{self.num_layers - 1} for the patch merging of {self.num_layers} stages")
        self.stride = patch_size * 2 ** (self.num_layers - 1)  # pixels per position of the last stage
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_mask_token else None
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim)) if ape else None
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [float(x) for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        layers, dim, res, start = [], embed_dim, grid, 0
        for i in range(self.num_layers):
            out_dim = int(embed_dim * 2 ** i)
            stage = SwinTransformerStage(dim, out_dim, res, depths[i], i > 0, num_heads[i], window_size, mlp_ratio,
                                         qkv_bias, drop_rate, attn_drop_rate, dpr[start:start + depths[i]])
            layers.append(stage)
            dim, res, start = out_dim, stage.output_resolution, start + depths[i]
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(self.num_features, eps=NORM_EPS)
        self.head = Head(self.num_features, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _trunc_normal(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention):
                _trunc_normal(m.relative_position_bias_table)
        for t in (self.mask_token, self.absolute_pos_embed):
            if t is not None:
                _trunc_normal(t)

    # ------------------------------------------------------------------------------------------------ forward
    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding [B, h, w, C], masked patches replaced by the mask token, + the absolute table."""
        tokens = self.patch_embed(x)
        B, h, w, C = tokens.shape
        pos = self.absolute_pos_embed
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("mask given but the model was built without a mask token (use_mask_token=True)")
            mask = mask.reshape(B, -1)
            if mask.shape[1] != h * w or mask.dtype != torch.bool:
                raise ValueError(f"mask: expected bool [B, {h * w}] (or [B, {h}, {w}]), got {mask.dtype} "
                                 f"{tuple(mask.shape)}")
            flat = kernels.masked_token_scatter(tokens.reshape(B, h * w, C), mask, self.mask_token.reshape(-1),
                                                pos_embed=None if pos is None else pos.reshape(h * w, C))
            tokens = flat.reshape(B, h, w, C)
        elif pos is not None:
            tokens = tokens + pos.reshape(1, h, w, C).to(tokens.dtype)
        return self.pos_drop(tokens)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                         return_layers: bool = False):
        """The normalised last-stage map [B, S/stride, S/stride, num_features] (NHWC, like timm).

        ``mask`` bool [B, N] or [B, h, w] on the patch grid (True = masked) swaps masked patch embeddings for the
        mask token (SimMIM). ``return_layers`` also returns every stage's raw output (NHWC) as a list.
        """
        x = self.embed(x, mask)
        outs = []
        for stage in self.layers:
            x = stage(x)
            outs.append(x)
        x = self.norm(x)
        return (x, outs) if return_layers else x

    def pool(self, features: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        if pool not in (None, "mean", "avg"):
            raise ValueError(f"pool: Swin has no cls token; expected 'mean', got {pool!r}")
        return features.mean(dim=(1, 2))

    def forward(self, x: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        return self.head(self.pool(self.forward_features(x), pool))

    # ------------------------------------------------------------------------------------------------ export
    def timm_spec(self) -> dict:
        """``{"name", "kwargs", "drop"}``: ``timm.create_model(name, **kwargs)`` builds a SwinTransformer whose
        ``load_state_dict(strict=True)`` takes this model's state dict without the keys in ``drop`` (the
        pre-training mask token). Raises ValueError for options timm's SwinTransformer lacks."""
        c = self.config
        if c["ape"]:
            raise ValueError("timm's SwinTransformer has no absolute position embedding: an ape=True encoder does "
                             "not load into it")
        if not c["patch_norm"]:
            raise ValueError("timm's SwinTransformer always normalises the patch embedding: a patch_norm=False "
                             "encoder does not load into it")
        name = _TIMM_NAMES.get((c["embed_dim"], tuple(c["depths"])), "swin_tiny_patch4_window7_224")
        kwargs = dict(img_size=c["img_size"], patch_size=c["patch_size"], in_chans=c["in_chans"],
                      window_size=c["window_size"], embed_dim=c["embed_dim"], depths=tuple(c["depths"]),
                      num_heads=tuple(c["num_heads"]), mlp_ratio=c["mlp_ratio"], qkv_bias=c["qkv_bias"],
                      num_classes=c["num_classes"])
        return {"name": name, "kwargs": kwargs, "drop": ["mask_token"] if self.mask_token is not None else []}


def build_swin(name: str, **overrides) -> SwinTransformer:
    """``build_swin("swin_base", img_size=192, window_size=6, drop_path_rate=0.0)``; ``None`` overrides are ignored."""
    if name not in SWIN_CONFIGS:
        raise ValueError(f"model: unknown Swin {name!r}; available: {', '.join(swin_model_names())}")
    cfg = dict(SWIN_CONFIGS[name])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return SwinTransformer(**cfg)


def swin_from_cfg(cfg: dict, **overrides) -> SwinTransformer:
    """The Swin named by ``cfg["model"]`` with the run's image size, patch size, window size, drop path and
    absolute-position option (``use_abs_pos_emb``); the ViT-only options (qv_bias, init_values, relative
    position bias sharing) do not apply to Swin and are ignored."""
    kw = dict(img_size=cfg.get("image_size"), patch_size=cfg.get("patch_size"), window_size=cfg.get("window_size"),
              drop_path_rate=cfg.get("drop_path"), ape=cfg.get("use_abs_pos_emb"))
    kw.update(overrides)
    return build_swin(str(cfg["model"]), **kw)


__all__ = ["SWIN_CONFIGS", "PatchMerging", "SwinTransformer", "SwinTransformerBlock", "WindowAttention", "build_swin",
           "is_swin", "shifted_window_mask", "swin_from_cfg", "swin_model_names", "window_partition",
           "window_reverse"]
