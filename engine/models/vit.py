"""Vision Transformer backbones (ViT / BEiT-style) built on the kernels' attention and masked-token ops.

Tokens: ``[cls, p_1 .. p_N]`` with N = (S/p)^2 patches of a ``p x p`` convolutional patch embedding.
Block (pre-norm, optional layer scale ``gamma``, stochastic depth ``DropPath``)::

    x = x + DropPath(gamma_1 * Attn(LN(x), rel_pos_bias))
    x = x + DropPath(gamma_2 * MLP(LN(x)))          MLP = fc2(GELU(fc1(.))), hidden = mlp_ratio * D

Masked image modelling: ``forward_features(x, mask)`` replaces the embeddings of masked patches by a
learned ``mask_token`` through :func:`kernels.masked_token_scatter` (which also prepends cls and adds the
absolute position embedding in the same pass). Position information is an absolute table (ViT, DINO),
a relative position bias shared by all layers (BEiT pre-training) or one per layer (BEiT fine-tuning),
built by :class:`kernels.RelativePositionBias` and passed to :class:`kernels.MultiheadSelfAttention`.

Init (``init_mode``, chosen per method as its original code base does): normal std 0.02 for linear weights
and tokens, zero biases, unit LayerNorm, and

=========  ====================================  ==================  ==========================================
mode       trunc-normal cut-off                  patch-embed conv    ``attn.proj`` / ``mlp.fc2`` of block l
=========  ====================================  ==================  ==========================================
``beit``   +-1 std (unilm beit/beit2 pre-train)  trunc-normal 0.02   divided by ``sqrt(2 l)`` (BEiT's rescale)
``timm``   +-2 absolute (timm's default: none    trunc-normal 0.02   divided by ``sqrt(2 l)``
           in practice; SimMIM, VQ-KD encoder)
``dino``   +-2 absolute (DINO's utils)           PyTorch default     not rescaled (DINO has no such rescale)
=========  ====================================  ==================  ==========================================
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import kernels

VIT_CONFIGS: dict[str, dict] = {
    # tiny CPU variants (patch 4 for 32-px images)
    "vit_femto": dict(embed_dim=48, depth=2, num_heads=2, patch_size=4, img_size=32),
    "vit_pico": dict(embed_dim=96, depth=4, num_heads=3, patch_size=4, img_size=32),
    "vit_nano": dict(embed_dim=128, depth=6, num_heads=4, patch_size=4, img_size=32),
    # standard sizes (patch 16 at 224 px)
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}


INIT_MODES = ("beit", "timm", "dino")


class DropPath(nn.Module):
    """Stochastic depth: zero a whole sample's residual branch with probability p, scale survivors 1/(1-p)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be divisible by patch_size ({patch_size})")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[2] % self.patch_size or x.shape[3] % self.patch_size:
            raise ValueError(f"images: expected [B, C, H, W] with H, W divisible by {self.patch_size}, "
                             f"got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, qv_bias=False, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, init_values=None, window_size=None, norm_eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = kernels.MultiheadSelfAttention(dim, num_heads, qkv_bias=qkv_bias, qv_bias=qv_bias,
                                                   attn_drop=attn_drop, proj_drop=drop)
        # per-layer relative position bias (BEiT fine-tuning layout)
        self.rel_pos_bias = kernels.RelativePositionBias(window_size, num_heads) if window_size else None
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        if init_values is not None and init_values > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor, rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.rel_pos_bias is not None:
            rel_pos_bias = self.rel_pos_bias()
        a = self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias)
        if self.gamma_1 is not None:
            a = self.gamma_1 * a
        x = x + self.drop_path(a)
        m = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            m = self.gamma_2 * m
        return x + self.drop_path(m)


class VisionTransformer(nn.Module):
    """ViT backbone. ``forward(x)`` gives pooled features; ``forward_features`` the normalised tokens."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qv_bias: bool = False, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, init_values: float | None = None, use_abs_pos_emb: bool = True,
                 use_shared_rel_pos_bias: bool = False, use_rel_pos_bias: bool = False, use_mask_token: bool = False,
                 global_pool: str = "cls", norm_eps: float = 1e-6, init_std: float = 0.02, init_mode: str = "beit"):
        super().__init__()
        if init_mode not in INIT_MODES:
            raise ValueError(f"init_mode: expected one of {', '.join(INIT_MODES)}, got {init_mode!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if global_pool not in ("cls", "mean"):
            raise ValueError(f"global_pool: expected 'cls' or 'mean', got {global_pool!r}")
        if qkv_bias and qv_bias:
            qkv_bias = False  # q/v bias replaces the full qkv bias (BEiT)
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qv_bias=qv_bias,
                           drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
                           init_values=init_values, use_abs_pos_emb=use_abs_pos_emb,
                           use_shared_rel_pos_bias=use_shared_rel_pos_bias, use_rel_pos_bias=use_rel_pos_bias,
                           use_mask_token=use_mask_token, global_pool=global_pool, norm_eps=norm_eps,
                           init_std=init_std, init_mode=init_mode)
        self.embed_dim = self.num_features = embed_dim
        self.num_heads, self.depth, self.global_pool = num_heads, depth, global_pool
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.patch_size = patch_size
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_mask_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim)) if use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(drop_rate)
        window = self.patch_embed.grid_size
        self.rel_pos_bias = kernels.RelativePositionBias(window, num_heads) if use_shared_rel_pos_bias else None
        dpr = [float(v) for v in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qv_bias, drop_rate, attn_drop_rate, dpr[i],
                  init_values, window if use_rel_pos_bias else None, norm_eps)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self._init_weights(init_std, init_mode)

    # ------------------------------------------------------------------------------------------------ init
    def _init_weights(self, std: float, mode: str = "beit") -> None:
        cut = (-std, std) if mode == "beit" else (-2.0, 2.0)

        def tn(t):
            nn.init.trunc_normal_(t, std=std, a=cut[0], b=cut[1])

        for t in (self.cls_token, self.mask_token, self.pos_embed):
            if t is not None:
                tn(t)
        for m in self.modules():
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and mode != "dino"):
                tn(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if mode == "dino":
            return
        with torch.no_grad():
            for layer_id, blk in enumerate(self.blocks, start=1):
                scale = math.sqrt(2.0 * layer_id)
                _attn_proj(blk.attn).weight.div_(scale)
                blk.mlp.fc2.weight.div_(scale)

    # ------------------------------------------------------------------------------------------------ embed
    def interpolate_pos_embed(self, h: int, w: int) -> torch.Tensor | None:
        """The absolute table resized (bicubic) to an ``h x w`` patch grid, cls row kept: [1, 1+h*w, D]."""
        if self.pos_embed is None:
            return None
        gh, gw = self.patch_embed.grid_size
        if (h, w) == (gh, gw):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        D = patch_pos.shape[-1]
        grid = patch_pos.reshape(1, gh, gw, D).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(patch_pos.dtype)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, h * w, D)], dim=1)

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        h, w = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        tokens = self.patch_embed(x)
        pos = self.interpolate_pos_embed(h, w)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("mask given but the model was built without a mask token (use_mask_token=True)")
            mask = mask.reshape(B, -1)
            if mask.shape[1] != tokens.shape[1] or mask.dtype != torch.bool:
                raise ValueError(f"mask: expected bool [B, {tokens.shape[1]}] (or [B, {h}, {w}]), "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
            out = kernels.masked_token_scatter(tokens, mask, self.mask_token.reshape(-1),
                                               pos_embed=pos, cls_token=self.cls_token)
        else:
            out = torch.cat([self.cls_token.to(tokens.dtype).expand(B, -1, -1), tokens], dim=1)
            if pos is not None:
                out = out + pos.to(out.dtype)
        return self.pos_drop(out)

    # ------------------------------------------------------------------------------------------------ forward
    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                         return_layers: Sequence[int] | None = None):
        """Tokens after the final norm ``[B, 1+N, D]``.

        ``mask`` bool ``[B, N]`` or ``[B, h, w]`` (True = masked) swaps masked patch embeddings for the mask
        token. ``return_layers`` (block indices, negative allowed) also returns the raw outputs of those
        blocks (before the final norm) as a list: ``(tokens, [layer outputs])``.
        """
        x = self.embed(x, mask)
        shared = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        wanted = None
        if return_layers is not None:
            wanted = {i % self.depth for i in _as_list(return_layers)}
        layers = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, rel_pos_bias=shared)
            if wanted is not None and i in wanted:
                layers.append(x)
        x = self.norm(x)
        return (x, layers) if wanted is not None else x

    def pool(self, tokens: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        pool = pool or self.global_pool
        if pool == "cls":
            return tokens[:, 0]
        if pool == "mean":
            return tokens[:, 1:].mean(dim=1)
        raise ValueError(f"pool: expected 'cls' or 'mean', got {pool!r}")

    def forward(self, x: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        return self.pool(self.forward_features(x), pool)


def _as_list(v: Iterable[int] | int) -> list[int]:
    return [v] if isinstance(v, int) else list(v)


def _attn_proj(attn: nn.Module) -> nn.Linear:
    for name in ("proj", "out_proj", "o_proj"):
        m = getattr(attn, name, None)
        if isinstance(m, nn.Linear):
            return m
    raise AttributeError(f"{type(attn).__name__} has no output projection (expected a Linear named 'proj')")


def model_names() -> list[str]:
    return sorted(VIT_CONFIGS)


def build_vit(name: str, **overrides) -> VisionTransformer:
    """``build_vit("vit_pico", img_size=32, drop_path_rate=0.1, ...)``; ``None`` overrides are ignored."""
    if name not in VIT_CONFIGS:
        raise ValueError(f"model: unknown {name!r}; available: {', '.join(model_names())}")
    cfg = dict(VIT_CONFIGS[name])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return VisionTransformer(**cfg)
