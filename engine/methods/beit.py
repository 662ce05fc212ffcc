"""BEiT: masked image modelling by predicting the discrete tokens of a frozen dVAE tokenizer.

Per batch: ``images`` (ImageNet-normalised, S px) and ``tokenizer_images`` (the same crop resampled to the
tokenizer size, pixels mapped 0.8 x + 0.1) from the loader's BEiT recipe, and a blockwise ``mask`` from
:func:`kernels.blockwise_masks` (``mask_fn``: exactly k masked patches per image; k = 75 on the 14x14 grid,
``round(mask_ratio * N)`` elsewhere; block area >= 16 patches at 14x14, scaled by N / 196 below)::

    t     = argmax_v dVAE(tokenizer_images)                  (frozen, eval mode, no grad)  [B, h, w]
    h     = ViT(images, mask)[:, 1:]                 masked patches -> mask token (masked_token_scatter)
    L     = CE(W h_i + b, t_i) averaged over masked i    (kernels.masked_cross_entropy, k per row)

The ViT uses one relative position bias shared by all layers (no absolute position embedding), q/v biases,
layer scale 0.1. The tokenizer grid must equal the patch grid: the tokenizer view is ``h * cell`` px.
Without ``--tokenizer`` the method refuses to build (train one with ``--method dvae``).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

import kernels
from engine.methods import register
from engine.methods.base import MASK_RATIO, PretrainMethod, backbone_from_cfg
from engine.trainer.config import Option


def default_num_masked(num_patches: int, ratio: float = 0.4) -> int:
    """75 on BEiT's 14x14 grid; ``round(ratio * N)`` on other grids."""
    return 75 if num_patches == 196 and abs(ratio - 0.4) < 1e-9 else max(1, int(round(ratio * num_patches)))


def default_min_block(num_patches: int) -> int:
    """BEiT's minimum block of 16 patches at 14x14, scaled by N / 196 (at least 1)."""
    return max(1, int(round(16 * num_patches / 196)))


def _blockwise_mask_fn(batch_size: int, seed: int, *, grid: int, num_masked: int, min_block: int):
    return {
        "mask": kernels.blockwise_masks(batch_size, grid, grid, num_masked, min_block=min_block, seed=seed)
    }


def require_tokenizer(cfg: dict, method: str, kinds: tuple[str, ...], how: str):
    path = cfg.get("tokenizer")
    if not path:
        raise ValueError(
            f"--method {method} needs --tokenizer PATH: train one first with {how} "
            f"(its output folder or checkpoint is the PATH)"
        )
    from engine.tokenizers import load_tokenizer

    try:
        return load_tokenizer(path, kinds=kinds)
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from None


def lm_head(dim: int, vocab: int) -> nn.Linear:
    head = nn.Linear(dim, vocab)
    nn.init.trunc_normal_(head.weight, std=0.02, a=-0.04, b=0.04)
    nn.init.zeros_(head.bias)
    return head


class MaskedTokenMethod(PretrainMethod):
    """Shared parts of BEiT and BEiT v2: backbone with mask token, frozen tokenizer, blockwise masks."""

    tokenizer_kinds: tuple[str, ...] = ()
    tokenizer_how = ""
    options = (
        MASK_RATIO,
        Option("tokenizer", None, str, "beit/beitv2: tokenizer (a --method dvae/vqkd run, or a DALL-E encoder)"),
        Option("num_mask_patches", None, int, "beit/beitv2 masked patches (75 at 14x14, else round(mask_ratio*N))",
               range=">=1"),
    )

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        c = self.c
        self.tokenizer = require_tokenizer(c, self.name, self.tokenizer_kinds, self.tokenizer_how)
        self.backbone = backbone_from_cfg(c, use_mask_token=True)
        self.patch = self.backbone.patch_size
        self.image_size = int(c["image_size"])
        self.grid = self.image_size // self.patch
        n = self.grid * self.grid
        self.num_masked = int(c.get("num_mask_patches") or default_num_masked(n, float(c["mask_ratio"])))
        if not 0 < self.num_masked <= n:
            raise ValueError(f"--num-mask-patches must be in [1, {n}], got {self.num_masked}")
        self.min_block = default_min_block(n)
        self.vocab_size = self.tokenizer.vocab_size
        self.lm_head = lm_head(self.backbone.embed_dim, self.vocab_size)

    def train(self, mode: bool = True):
        super().train(mode)
        self.tokenizer.train(False)
        return self

    def mask_fn(self):
        return functools.partial(
            _blockwise_mask_fn, grid=self.grid, num_masked=self.num_masked, min_block=self.min_block
        )

    def encoder(self) -> nn.Module:
        return self.backbone

    def check_ids(self, ids: torch.Tensor, B: int) -> torch.Tensor:
        if tuple(ids.shape) != (B, self.grid, self.grid):
            raise ValueError(
                f"tokenizer grid {tuple(ids.shape[1:])} != patch grid {(self.grid, self.grid)}: "
                f"the tokenizer input must be {self.grid * self.tokenizer.cell} px"
            )
        return ids.reshape(B, -1)

    def masked_ce(self, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
        return kernels.masked_cross_entropy(
            h,
            self.lm_head.weight,
            self.lm_head.bias,
            ids,
            mask,
            return_accuracy=True,
            num_masked=self.num_masked,
        )


@register("beit")
class BEiT(MaskedTokenMethod):
    # Paper: batch 2048, lr 1.5e-3 absolute (= blr 1.875e-4 with the linear rule lr = blr * batch / 256),
    # 10 warm-up epochs, cosine to 1e-5, AdamW (0.9, 0.999), wd 0.05, clip 3.0 (global norm), drop path 0.1,
    # layer scale 0.1. beta2 = 0.999 is both the paper's value and the official run_beit_pretraining.py
    # default (--opt_betas 0.9 0.999, not overridden by its README commands); 0.98 is BEiT v2's 300-epoch
    # setting (beitv2.py). Deviations: the lr warm-up starts at 0 (unilm: warmup_lr 1e-6).
    defaults = dict(
        blr=1.5e-3 * 256 / 2048,
        beta2=0.999,
        weight_decay=0.05,
        clip_grad=3.0,
        warmup_epochs=10,
        min_lr=1e-5,
        drop_path=0.1,
        init_values=0.1,
        use_abs_pos_emb=False,
        use_shared_rel_pos_bias=True,
        qv_bias=True,
        mask_ratio=0.4,
        pool="mean",
    )
    tokenizer_kinds = ("dvae", "dalle")
    tokenizer_how = "--method dvae"
    options = MaskedTokenMethod.options + (
        Option("tokenizer_size", None, int, "beit: tokenizer view size (default: patch grid x tokenizer cell)",
               range=">=1"),
    )

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        want = self.grid * self.tokenizer.cell
        if self.tokenizer_size != want:
            raise ValueError(
                f"--tokenizer-size {self.tokenizer_size} gives a {self.tokenizer_size // self.tokenizer.cell}"
                f"-token grid but the patch grid is {self.grid}x{self.grid}: use {want}"
            )

    def data_recipe(self):
        return dataclasses.replace(super().data_recipe(), tokenizer_size=self.tokenizer_size)

    @property
    def tokenizer_size(self) -> int:
        return int(self.c.get("tokenizer_size") or self.grid * self.tokenizer.cell)

    def forward(self, batch: dict) -> dict:
        images, mask = batch["images"], batch["mask"]
        B = images.shape[0]
        mask = mask.reshape(B, -1)
        with torch.no_grad():
            ids = self.check_ids(self.tokenizer(batch["tokenizer_images"].float()), B)
        h = self.backbone.forward_features(images, mask=mask)[:, 1:]
        loss, acc = self.masked_ce(h, ids, mask)
        return {"loss": loss, "mlm_acc": acc}
