"""What a discrete tokenizer learned (``--method dvae`` / ``--method vqkd`` checkpoints).

Three pictures:

* ``token_map.png``: per validation image, the image and its token-id map on the tokenizer grid
  (``h = H / cell``), each id with a fixed colour (the same code has the same colour in every image; ids
  written in the cells up to 8 x 8 grids); for a dVAE also the decoder's image of the hard tokens,
  ``sigmoid(Dec(E^T onehot(ids)))``.
* ``codebook_usage.png``: token counts ``n_v`` over (up to ``stats_images``) validation images per code id and
  sorted by frequency (log scale), with :func:`kernels.codebook_usage`'s fraction of codes used
  ``|{v: n_v > 0}| / V`` and perplexity ``exp(-sum_v p_v log p_v)``, ``p_v = n_v / sum n``.
* ``codebook_patches.png`` (VQ-KD, the BEiT v2 paper's codebook figure): for a few codes spread over the
  frequency ranks, image patches (with one patch of context around, the patch outlined) that map to them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.viz.common import (
    VizError,
    all_images,
    imagenet_to_unit,
    load_run,
    panel_figure,
    plot_figure,
    resolve_data,
    save_figure,
    to_display,
    val_images,
)

METHODS = ("dvae", "vqkd")


def palette(vocab_size: int) -> np.ndarray:
    """A fixed colour per code ``[V, 3]`` (seeded; bright enough to read black text on)."""
    rng = np.random.default_rng(12345)
    return rng.uniform(0.25, 1.0, size=(vocab_size, 3))


def load(checkpoint, device="cpu"):
    """``(tokenizer, state, config)``; :class:`VizError` unless the checkpoint is a dvae/vqkd run."""
    state, cfg, file = load_run(checkpoint)
    name = cfg.get("method")
    if name not in METHODS:
        raise VizError(f"tokens: a --method {name} checkpoint has no tokenizer (only {', '.join(METHODS)} do)")
    from engine.tokenizers import load_tokenizer

    try:
        tok = load_tokenizer(file, kinds=METHODS)
    except (ValueError, FileNotFoundError) as exc:
        raise VizError(str(exc)) from None
    return tok.to(device), state, cfg


def tokenizer_input(tok, images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised images -> the tokenizer's input space (dVAE: pixels mapped 0.8 x + 0.1)."""
    if tok.input_space == "imagenet":
        return images
    from engine.models.dvae import map_pixels

    return map_pixels(imagenet_to_unit(images))


@torch.no_grad()
def token_ids(tok, images: torch.Tensor) -> torch.Tensor:
    return tok(tokenizer_input(tok, images)).long()


def choose_codes(counts: np.ndarray, num_codes: int) -> list[int]:
    """``num_codes`` used codes spread evenly over the frequency ranks (most frequent first)."""
    order = [int(v) for v in np.argsort(-counts, kind="stable") if counts[v] > 0]
    if len(order) <= num_codes:
        return order
    picks = np.linspace(0, len(order) - 1, num_codes).round().astype(int)
    return [order[i] for i in picks]


def patch_crop(image: np.ndarray, row: int, col: int, cell: int, context: int = 1) -> np.ndarray:
    """The ``cell`` px patch at grid ``(row, col)`` of ``image [H, W, 3]`` with ``context`` patches around
    (edge-padded) ``[(2c+1) cell, (2c+1) cell, 3]``."""
    pad = context * cell
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    top, left = row * cell, col * cell
    return padded[top:top + (2 * context + 1) * cell, left:left + (2 * context + 1) * cell]


def _token_map_picture(tok, images, ids, state, cfg, out_dir) -> Path:
    B, h, w = ids.shape
    V = tok.vocab_size
    colours = palette(V)
    pics = to_display(images)
    cols = ["image", "token ids"]
    decoded = None
    if tok.kind == "dvae":
        from engine.models.dvae import unmap_pixels

        with torch.no_grad():
            decoded = unmap_pixels(tok.net.decode_indices(ids)).permute(0, 2, 3, 1).cpu().numpy()
        cols.append("decoded tokens")
    fig, axes = panel_figure(B, len(cols), f"{cfg.get('method')} step {int(state.get('step', 0))}: token ids "
                                           f"({h}x{w} grid, vocabulary {V})")
    ids_np = ids.cpu().numpy()
    for i in range(B):
        axes[i, 0].imshow(pics[i], interpolation="nearest")
        axes[i, 1].imshow(colours[ids_np[i]], interpolation="nearest")
        if h <= 8 and w <= 8:
            for r in range(h):
                for c in range(w):
                    axes[i, 1].text(c, r, str(ids_np[i, r, c]), ha="center", va="center", fontsize=6, color="black")
        if decoded is not None:
            axes[i, 2].imshow(decoded[i].clip(0, 1), interpolation="nearest")
        if i == 0:
            for j, name in enumerate(cols):
                axes[i, j].set_title(name, fontsize=9)
    return save_figure(fig, Path(out_dir) / "token_map.png")


def _usage_picture(counts: np.ndarray, usage: dict, n_images: int, state, cfg, out_dir) -> Path:
    V = counts.shape[0]
    frac, ppl = float(usage["fraction_used"]), float(usage["perplexity"])
    fig, axes = plot_figure(2, f"{cfg.get('method')} step {int(state.get('step', 0))}: codebook usage over "
                               f"{n_images} images: {frac:.1%} of {V} codes used, perplexity {ppl:.1f}")
    axes[0].bar(np.arange(V), counts, width=1.0, color="#377eb8")
    axes[0].set_xlabel("code id", fontsize=8)
    axes[0].set_ylabel("tokens", fontsize=8)
    axes[0].set_xlim(-0.5, V - 0.5)
    ranked = np.sort(counts)[::-1]
    used = ranked[ranked > 0]
    axes[1].semilogy(np.arange(1, used.shape[0] + 1), used, color="#e41a1c", marker="." if used.shape[0] < 64 else None)
    axes[1].set_xlabel("code rank (used codes)", fontsize=8)
    axes[1].set_ylabel("tokens (log)", fontsize=8)
    for ax in axes:
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return save_figure(fig, Path(out_dir) / "codebook_usage.png")


def _patches_picture(tok, pics: np.ndarray, ids: np.ndarray, counts, state, cfg, out_dir, num_codes: int = 6,
                     per_code: int = 8) -> Path:
    codes = choose_codes(counts, num_codes)
    cell = tok.cell
    fig, axes = panel_figure(len(codes), per_code, f"{cfg.get('method')} step {int(state.get('step', 0))}: image "
                                                   f"patches (outlined) mapped to {len(codes)} codes",
                             row_labels=True)
    from matplotlib.patches import Rectangle

    for r, code in enumerate(codes):
        where = np.argwhere(ids == code)  # [k, 3] (image, row, col), image-major
        # one patch per image first (variety), then the rest
        _, first = np.unique(where[:, 0], return_index=True)
        firsts = set(first.tolist())
        order = list(first) + [k for k in range(where.shape[0]) if k not in firsts]
        for c in range(per_code):
            ax = axes[r, c]
            if c >= len(order):
                ax.axis("off")
                continue
            n, y, x = where[order[c]]
            ax.imshow(patch_crop(pics[n], int(y), int(x), cell), interpolation="nearest")
            ax.add_patch(Rectangle((cell - 0.5, cell - 0.5), cell, cell, fill=False, edgecolor="red", linewidth=1.2))
        axes[r, 0].set_ylabel(f"code {code}\n{int(counts[code])} tokens", fontsize=8)
    return save_figure(fig, Path(out_dir) / "codebook_patches.png")


def render(checkpoint, out_dir, data_dir=None, num_images: int = 4, device="cpu", seed: int = 0,
           stats_images: int = 512) -> list[Path]:
    """Write ``token_map.png``, ``codebook_usage.png`` and, for VQ-KD, ``codebook_patches.png``."""
    import kernels

    tok, state, cfg = load(checkpoint, device)
    data = resolve_data(data_dir, cfg)
    S = int(cfg["image_size"])
    images = val_images(data, S, num_images).to(device)
    paths = [_token_map_picture(tok, images, token_ids(tok, images), state, cfg, out_dir)]
    all_ids, pics = [], []
    for batch in all_images(data, S, stats_images):
        all_ids.append(token_ids(tok, batch.to(device)).cpu())
        if tok.kind == "vqkd":
            pics.append((to_display(batch) * 255).round().astype(np.uint8))
    ids = torch.cat(all_ids)
    usage = kernels.codebook_usage(ids, tok.vocab_size)
    counts = torch.bincount(ids.reshape(-1), minlength=tok.vocab_size).numpy()
    paths.append(_usage_picture(counts, usage, ids.shape[0], state, cfg, out_dir))
    if tok.kind == "vqkd":
        paths.append(_patches_picture(tok, np.concatenate(pics), ids.numpy(), counts, state, cfg, out_dir))
    return paths
