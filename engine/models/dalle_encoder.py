"""The DALL-E dVAE encoder (BEiT's original tokenizer) with the public weight layout, for local weight files.

Layout (``n_hid`` = 256, 2 blocks per group, vocabulary 8192 in the released model; all inferred from the
state dict)::

    blocks.input                       conv 7x7, 3 -> n_hid
    blocks.group_g.block_b             g = 1..4, width w_g = n_hid * 2^(g-1); max-pool 2 after groups 1-3
        id_path  (conv 1x1 when the width changes, else identity)
        res_path: relu, conv_1 3x3 (-> w_g/4), relu, conv_2 3x3, relu, conv_3 3x3, relu, conv_4 1x1 (-> w_g)
        y = id_path(x) + (1 / n_layers^2) * res_path(x),   n_layers = 4 * blocks per group
    blocks.output: relu, conv 1x1 -> vocab logits

Every conv is stored as ``<name>.w`` ``[out, in, k, k]`` and ``<name>.b`` ``[out]`` with padding ``(k-1)//2``.
Input: pixels mapped ``0.8 x + 0.1`` (as BEiT's tokenizer view); tokens ``argmax`` over the logits on the
``H/8 x W/8`` grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DalleConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.w = nn.Parameter(torch.empty(cout, cin, k, k))
        self.b = nn.Parameter(torch.zeros(cout))
        nn.init.normal_(self.w, std=1 / (cin * k * k) ** 0.5)

    def forward(self, x):
        return F.conv2d(x, self.w.to(x.dtype), self.b.to(x.dtype), padding=(self.w.shape[-1] - 1) // 2)


class DalleEncoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n_layers: int):
        super().__init__()
        hid = cout // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = DalleConv(cin, cout, 1) if cin != cout else nn.Identity()
        self.res_path = nn.ModuleDict(
            {
                "conv_1": DalleConv(cin, hid, 3),
                "conv_2": DalleConv(hid, hid, 3),
                "conv_3": DalleConv(hid, hid, 3),
                "conv_4": DalleConv(hid, cout, 1),
            }
        )

    def forward(self, x):
        h = x
        for name in ("conv_1", "conv_2", "conv_3", "conv_4"):
            h = self.res_path[name](F.relu(h))
        return self.id_path(x) + self.post_gain * h


class DalleEncoder(nn.Module):
    cell = 8

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192, in_chans: int = 3):
        super().__init__()
        self.vocab_size = int(vocab_size)
        self.config = dict(
            n_hid=n_hid, n_blk_per_group=n_blk_per_group, vocab_size=vocab_size, in_chans=in_chans
        )
        n_layers = 4 * n_blk_per_group
        blocks = nn.ModuleDict({"input": DalleConv(in_chans, n_hid, 7)})
        cin = n_hid
        for g in range(1, 5):
            w = n_hid * 2 ** (g - 1)
            group = nn.ModuleDict()
            for b in range(1, n_blk_per_group + 1):
                group[f"block_{b}"] = DalleEncoderBlock(cin, w, n_layers)
                cin = w
            blocks[f"group_{g}"] = group
        blocks["output"] = nn.ModuleDict({"conv": DalleConv(cin, vocab_size, 1)})
        self.blocks = blocks

    @classmethod
    def from_state_dict(cls, state: dict) -> DalleEncoder:
        try:
            n_hid = int(state["blocks.input.w"].shape[0])
            vocab = int(state["blocks.output.conv.w"].shape[0])
            in_chans = int(state["blocks.input.w"].shape[1])
        except KeyError as exc:
            raise ValueError(f"DALL-E encoder state dict: missing {exc}") from None
        n_blk = len({k.split(".")[2] for k in state if k.startswith("blocks.group_1.block_")})
        enc = cls(n_hid, n_blk, vocab, in_chans)
        enc.load_state_dict(state)
        return enc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks["input"](x)
        for g in range(1, 5):
            for blk in self.blocks[f"group_{g}"].values():
                x = blk(x)
            if g < 4:
                x = F.max_pool2d(x, 2)
        return self.blocks["output"]["conv"](F.relu(x))

    @torch.no_grad()
    def get_codebook_indices(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).argmax(dim=1)
