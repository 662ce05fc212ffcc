"""nn.Module wrappers: the masked input embedding and the masked LM head of BEiT-style pre-training."""

from __future__ import annotations

import torch
from torch import nn

from kernels.masked.masked_cross_entropy import masked_cross_entropy
from kernels.masked.masked_token_scatter import masked_token_scatter


class MaskedTokenEmbedding(nn.Module):
    """``mask_token`` [D], optional ``cls_token`` [D] and ``pos_embed`` [N(+1), D]; trunc-normal std .02.

    ``forward(x [B, N, D], mask [B, N] bool) -> [B, N(+1), D]`` via :func:`masked_token_scatter`.
    BEiT uses relative position bias, so ``pos_embed=False`` is its setting; SimMIM/ViT-style models with
    absolute positions use ``pos_embed=True`` (N+1 rows when there is a cls token).
    """

    def __init__(
        self,
        num_patches: int,
        dim: int,
        cls_token: bool = True,
        pos_embed: bool = False,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.num_patches, self.dim, self.init_std = num_patches, dim, init_std
        self.mask_token = nn.Parameter(torch.empty(dim))
        self.cls_token = nn.Parameter(torch.empty(dim)) if cls_token else None
        rows = num_patches + (1 if cls_token else 0)
        self.pos_embed = nn.Parameter(torch.empty(rows, dim)) if pos_embed else None
        self.reset_parameters()

    def reset_parameters(self):
        for p in (self.mask_token, self.cls_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=self.init_std, a=-2 * self.init_std, b=2 * self.init_std)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_token_scatter(x, mask, self.mask_token, self.pos_embed, self.cls_token)

    def extra_repr(self) -> str:
        return (
            f"num_patches={self.num_patches}, dim={self.dim}, cls_token={self.cls_token is not None}, "
            f"pos_embed={self.pos_embed is not None}"
        )


class MaskedLMHead(nn.Module):
    """Linear(dim -> vocab_size) + cross-entropy on the masked rows, via :func:`masked_cross_entropy`.

    ``forward(h, targets, mask=None, num_masked=None, return_accuracy=False)``; ``logits(h)`` gives plain
    logits for evaluation. Weight init trunc-normal std .02, bias 0.
    """

    def __init__(
        self, dim: int, vocab_size: int, bias: bool = True, ignore_index: int = -100, init_std: float = 0.02
    ):
        super().__init__()
        self.dim, self.vocab_size, self.ignore_index, self.init_std = dim, vocab_size, ignore_index, init_std
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        self.bias = nn.Parameter(torch.empty(vocab_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.trunc_normal_(self.weight, std=self.init_std, a=-2 * self.init_std, b=2 * self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h, self.weight, self.bias)

    def forward(self, h, targets, mask=None, num_masked=None, return_accuracy=False):
        return masked_cross_entropy(
            h,
            self.weight,
            self.bias,
            targets,
            mask=mask,
            ignore_index=self.ignore_index,
            return_accuracy=return_accuracy,
            num_masked=num_masked,
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, vocab_size={self.vocab_size}, bias={self.bias is not None}"
