"""Self-attention maps of a ViT encoder (the DINO paper's figure; any ViT checkpoint: dino, simmim, beit, ...).

For an image with patch tokens on an ``h x w`` grid, the last block's attention probabilities
``A = softmax(q k^T * scale + bias)`` ``[H, 1+N, 1+N]`` are taken from
:class:`kernels.MultiheadSelfAttention` (``return_attention=True``); the picture shows, per head ``k``, the
[CLS] row over the patches ``a_k = A[k, 0, 1:]`` as a heat map over the image, and the thresholded mask that
keeps 60% of the attention mass: with ``a_k`` sorted in decreasing order and normalised to sum 1, the
smallest set of patches whose mass reaches 0.6 (a patch is kept when the mass of the patches strictly
before it is below 0.6).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.viz.common import (
    VizError,
    load_run,
    panel_figure,
    resolve_data,
    save_figure,
    to_display,
    val_images,
)

KEEP_MASS = 0.6
HEAD_COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#ffff33", "#a65628", "#f781bf",
                "#999999", "#66c2a5", "#fc8d62", "#8da0cb")


def is_vit(encoder) -> bool:
    from engine.models.vit import VisionTransformer

    return isinstance(encoder, VisionTransformer)


@torch.no_grad()
def cls_attention(vit, images: torch.Tensor) -> torch.Tensor:
    """The last block's [CLS] attention over the patches ``[B, H, h, w]``: the [CLS] row of each head without
    its [CLS] column, renormalised to sum 1 over the patches."""
    if not is_vit(vit):
        raise VizError(f"attention maps need a ViT encoder, got {type(vit).__name__}")
    B = images.shape[0]
    h, w = images.shape[2] // vit.patch_size, images.shape[3] // vit.patch_size
    x = vit.embed(images)
    shared = vit.rel_pos_bias() if vit.rel_pos_bias is not None else None
    for blk in vit.blocks[:-1]:
        x = blk(x, rel_pos_bias=shared)
    last = vit.blocks[-1]
    bias = last.rel_pos_bias() if last.rel_pos_bias is not None else shared
    _, attn = last.attn(last.norm1(x), rel_pos_bias=bias, return_attention=True)  # [B, H, 1+N, 1+N]
    a = attn[:, :, 0, 1:].float()
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
    return a.reshape(B, -1, h, w)


def mass_mask(attn: torch.Tensor, keep: float = KEEP_MASS) -> torch.Tensor:
    """Bool mask of the same shape as ``attn`` ``[..., h, w]``: per map, the fewest largest entries holding at
    least ``keep`` of its mass (ties broken by position)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    flat = attn.reshape(-1, attn.shape[-2] * attn.shape[-1]).float()
    flat = flat / flat.sum(-1, keepdim=True).clamp_min(1e-12)
    val, idx = flat.sort(dim=-1, descending=True, stable=True)
    before = val.cumsum(-1) - val
    kept_sorted = before < keep - 1e-7
    out = torch.zeros_like(kept_sorted)
    out.scatter_(-1, idx, kept_sorted)
    return out.reshape(attn.shape)


# where the evaluated ViT's weights live in a method's state dict (default "backbone.")
ENCODER_PREFIX = {"dino": "teacher.backbone.", "vqkd": "tokenizer.encoder."}


def vit_from_encoder_config(state: dict):
    """The encoder ViT rebuilt from the checkpoint's ``encoder_config`` and its weights alone (no method:
    no tokenizer or teacher files needed), or None when the checkpoint's encoder is not a ViT."""
    from engine.models.vit import VisionTransformer

    ec = dict(state.get("encoder_config") or {})
    if "embed_dim" not in ec or "patch_size" not in ec:
        return None
    method = state.get("method") or state["config"].get("method")
    prefix = ENCODER_PREFIX.get(method, "backbone.")
    weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    with torch.random.fork_rng(devices=[]):
        vit = VisionTransformer(**ec)
    try:
        vit.load_state_dict(weights)
    except RuntimeError as exc:
        raise VizError(f"the checkpoint's {prefix}* weights do not fit its encoder_config: "
                       f"{str(exc).splitlines()[0]}") from None
    return vit


def _upsample(maps: torch.Tensor, size) -> np.ndarray:
    import torch.nn.functional as F

    return F.interpolate(maps.float(), size=size, mode="nearest").cpu().numpy()


def render(checkpoint, out_dir, data_dir=None, num_images: int = 4, device="cpu", seed: int = 0) -> list[Path]:
    """Write ``attention.png``: per image, the image, one heat map per head and the 60%-mass masks."""
    from engine.eval import encoder_from_checkpoint

    state, cfg, _ = load_run(checkpoint)
    name = cfg.get("method")
    try:
        encoder, _ = encoder_from_checkpoint(state)
    except ValueError as exc:  # e.g. a beit run whose --tokenizer file is gone: the ViT alone is enough
        encoder = vit_from_encoder_config(state)
        if encoder is None:
            raise VizError(f"cannot rebuild --method {name} from the checkpoint: {exc}") from None
    if not is_vit(encoder):
        raise VizError(f"attention: the encoder of a --method {name} checkpoint is a {type(encoder).__name__} "
                       f"({cfg.get('model')}), not a ViT: no attention to show")
    encoder = encoder.to(device).eval()
    images = val_images(resolve_data(data_dir, cfg), int(cfg["image_size"]), num_images).to(device)
    attn = cls_attention(encoder, images)  # [B, H, h, w]
    masks = mass_mask(attn)
    size = tuple(images.shape[-2:])
    heat = _upsample(attn, size)
    keep = _upsample(masks.float(), size) > 0.5
    pics = to_display(images)
    B, H = attn.shape[:2]
    fig, axes = panel_figure(B, H + 2, f"{name} {cfg.get('model')} step {int(state.get('step', 0))}: last-layer "
                                       f"[CLS] attention per head, {KEEP_MASS:.0%}-mass masks")
    from matplotlib.colors import to_rgb

    for i in range(B):
        axes[i, 0].imshow(pics[i], interpolation="nearest")
        for k in range(H):
            ax = axes[i, k + 1]
            ax.imshow(pics[i].mean(-1), cmap="gray", interpolation="nearest")
            ax.imshow(heat[i, k], cmap="inferno", alpha=0.75, interpolation="nearest")
            if keep[i, k].any() and not keep[i, k].all():
                ax.contour(keep[i, k].astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
            if i == 0:
                ax.set_title(f"head {k}", fontsize=9)
        # the masks of all heads, each in its colour, over the dimmed image
        over = 0.5 * pics[i].copy()
        for k in range(H):
            colour = np.array(to_rgb(HEAD_COLOURS[k % len(HEAD_COLOURS)]))
            m = keep[i, k]
            over[m] = 0.4 * over[m] + 0.6 * colour * pics[i][m].mean(-1, keepdims=True).clip(0.5, 1.0)
        axes[i, H + 1].imshow(over.clip(0, 1), interpolation="nearest")
        if i == 0:
            axes[i, 0].set_title("image", fontsize=9)
            axes[i, H + 1].set_title(f"{KEEP_MASS:.0%} mass", fontsize=9)
    return [save_figure(fig, Path(out_dir) / "attention.png")]
