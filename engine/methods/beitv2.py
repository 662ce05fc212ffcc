"""BEiT v2: masked image modelling on VQ-KD tokens with [CLS] aggregation.

Per batch: ``images`` (BEiT v2 view, ImageNet-normalised) and a blockwise ``mask`` (as BEiT: k = 75 of 196,
``round(mask_ratio * N)`` elsewhere). The frozen VQ-KD tokenizer sees the same, unmasked view::

    t        = VQKD(images)                                     token ids on the patch grid (no grad, eval)
    x, [e, l] = ViT(images, mask)                               x: final tokens after the norm,
                                                                e: raw output of block ``early_layer``,
                                                                l: raw output of the last block
    L_main   = CE(W x_i + b, t_i)                               masked i (kernels.masked_cross_entropy)
    y        = Blocks_2([l_cls ; e_patches], shared rel-pos bias)   two extra blocks, [CLS] aggregation
    L_cls    = CE(W norm(y)_i + b, t_i)                         same LM head W, b and final norm
    L        = L_main + L_cls

As the official ``VisionTransformerForMaskedImageModelingCLS``: the [CLS] fed to the aggregation blocks is the
last block's raw output ``x[:, [0]]`` (not the final-normed token), the two blocks are initialised like the
backbone's and rescaled as layers ``early_layer + 1`` and ``early_layer + 2`` (``fix_init_cls_pt_weight``),
and their drop-path rates are entries ``early_layer`` and ``early_layer + 1`` of the backbone's linear
schedule over ``max(depth, early_layer + 2)`` layers. Deviation: the official blocks are built after its
``apply(_init_weights)``, so they keep PyTorch's default Linear init (Kaiming-uniform, non-zero biases) before
the rescale; ours get the backbone's trunc-normal 0.02 and zero biases (the same scale at ViT-B width).

``early_layer``: 9 of 12 in the paper (the output after the 9th block); scaled as ``round(0.75 * depth)``
(at least 1, at most depth - 1) for other depths. The aggregation blocks exist only for pre-training; the
encoder evaluated and exported is the backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.methods import register
from engine.methods.beit import BEiT, MaskedTokenMethod
from engine.trainer.config import Option
from engine.models.vit import Block, _attn_proj


def default_early_layer(depth: int) -> int:
    return int(min(max(1, round(0.75 * depth)), max(1, depth - 1)))


@register("beitv2")
class BEiTv2(MaskedTokenMethod):
    # Paper (300-epoch recipe): batch 2048, lr 1.5e-3 absolute (blr 1.875e-4), 10 warm-up epochs, wd 0.05,
    # clip 3.0, drop path 0, AdamW beta2 0.98, layer scale 0.1, shared relative position bias: BEiT's recipe
    # with beta2 0.98 and no drop path.
    defaults = {**BEiT.defaults, "beta2": 0.98, "drop_path": 0.0}
    tokenizer_kinds = ("vqkd",)
    tokenizer_how = "--method vqkd"
    options = MaskedTokenMethod.options + (
        Option("early_layer", None, int, "beitv2 [CLS]-aggregation source layer (9 of 12; scaled by depth)",
               range=">=1"),
    )

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        depth = self.backbone.depth
        self.early_layer = int(self.c.get("early_layer") or default_early_layer(depth))
        if not 1 <= self.early_layer <= depth:
            raise ValueError(f"--early-layer must be in [1, {depth}], got {self.early_layer}")
        vc = self.backbone.config
        rate = float(self.c.get("drop_path") or 0.0)
        n = max(depth, self.early_layer + 2)
        dpr = [float(v) for v in torch.linspace(0, rate, n)][self.early_layer:self.early_layer + 2]
        self.cls_pt_layers = nn.ModuleList(
            [
                Block(
                    vc["embed_dim"],
                    vc["num_heads"],
                    vc["mlp_ratio"],
                    vc["qkv_bias"],
                    vc["qv_bias"],
                    drop_path=dpr[i],
                    init_values=vc["init_values"],
                    norm_eps=vc["norm_eps"],
                )
                for i in range(2)
            ]
        )
        self._init_cls_layers(float(vc["init_std"]))

    def _init_cls_layers(self, std: float) -> None:
        for m in self.cls_pt_layers.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std, a=-std, b=std)  # unilm's cut at +-1 std
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():  # official: rescaled as layers early_layers + 1, early_layers + 2
            for i, blk in enumerate(self.cls_pt_layers, start=self.early_layer + 1):
                _attn_proj(blk.attn).weight.div_((2.0 * i) ** 0.5)
                blk.mlp.fc2.weight.div_((2.0 * i) ** 0.5)

    def tokenizer_input(self, images: torch.Tensor) -> torch.Tensor:
        size = self.grid * self.tokenizer.cell
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
        return images

    def forward(self, batch: dict) -> dict:
        images, mask = batch["images"], batch["mask"]
        B = images.shape[0]
        mask = mask.reshape(B, -1)
        with torch.no_grad():
            ids = self.check_ids(self.tokenizer(self.tokenizer_input(images)), B)
        last = self.backbone.depth - 1
        x, layers = self.backbone.forward_features(images, mask=mask, return_layers=[self.early_layer - 1, last])
        early, final = (layers[0], layers[-1])  # one entry when early_layer == depth
        loss_main, acc = self.masked_ce(x[:, 1:], ids, mask)
        y = torch.cat([final[:, :1], early[:, 1:]], dim=1)  # raw last-block [CLS] (official x[:, [0]])
        rel = self.backbone.rel_pos_bias() if self.backbone.rel_pos_bias is not None else None
        for blk in self.cls_pt_layers:
            y = blk(y, rel_pos_bias=rel)
        y = self.backbone.norm(y)
        loss_cls, acc_cls = self.masked_ce(y[:, 1:], ids, mask)
        return {
            "loss": loss_main + loss_cls,
            "loss_main": loss_main.detach(),
            "loss_cls": loss_cls.detach(),
            "mlm_acc": acc,
            "mlm_acc_cls": acc_cls,
        }
