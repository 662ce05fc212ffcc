"""Discrete VAE image tokenizer (BEiT's tokenizer, DALL-E style) trained with the Gumbel-softmax relaxation.

Pixels are first mapped to the tokenizer range ``x' = 0.8 x + 0.1`` (x in [0, 1]). With ``c = 2^n`` the cell
size (8 in DALL-E), the encoder maps ``[B, 3, H, W]`` to logits ``[B, V, H/c, W/c]`` over a vocabulary of V
codes; a token is ``argmax_v logits``. Training relaxes the one-hot choice::

    y   = softmax((logits + g) / tau),  g ~ Gumbel(0, 1)          (soft one-hot per cell)
    x^  = sigmoid(Dec(E^T y))                                      (E: [V, d] code embedding, a 1x1 conv)
    L   = mean (x^ - x')^2  +  beta * KL(q || U_V),   KL = sum_v q_v log(V q_v),  q = softmax(logits)

``tau`` is annealed by the method (cosine ``tau_0 -> tau_end``). The encoder/decoder are residual conv stacks:
stem 3x3 conv, then per level ``ResBlock`` + stride-2 4x4 conv (decoder: ``ResBlock`` + stride-2 4x4
transposed conv), ResBlock ``x + conv3x3(relu(conv3x3(relu(x))))``.

``config`` rebuilds the network (``DVAE(**config)``) and travels with the weights as extra state, so a
checkpoint is self-describing (see :mod:`engine.tokenizers`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_EPS = 0.1  # the DALL-E pixel mapping x' = (1 - 2 eps) x + eps


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> the tokenizer range [0.1, 0.9]."""
    return (1 - 2 * LOGIT_EPS) * x + LOGIT_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    return ((x - LOGIT_EPS) / (1 - 2 * LOGIT_EPS)).clamp(0, 1)


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class DVAE(nn.Module):
    """``forward(x') -> logits [B, V, H/c, W/c]``; ``get_codebook_indices(x') -> int64 [B, H/c, W/c]``;
    ``decode(y) -> x^``; ``reconstruct(x', tau, hard)``."""

    def __init__(
        self,
        vocab_size: int = 8192,
        hidden: int = 256,
        cell: int = 8,
        embed_dim: int | None = None,
        in_chans: int = 3,
    ):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        if cell < 1 or cell & (cell - 1):
            raise ValueError(f"cell must be a power of 2 >= 1, got {cell}")
        embed_dim = int(embed_dim or hidden)
        self.config = dict(
            vocab_size=int(vocab_size),
            hidden=int(hidden),
            cell=int(cell),
            embed_dim=embed_dim,
            in_chans=int(in_chans),
        )
        self.vocab_size, self.cell = int(vocab_size), int(cell)
        levels = int(math.log2(cell))
        enc: list[nn.Module] = [nn.Conv2d(in_chans, hidden, 3, padding=1)]
        for _ in range(levels):
            enc += [ResBlock(hidden), nn.Conv2d(hidden, hidden, 4, stride=2, padding=1)]
        enc += [ResBlock(hidden), nn.ReLU(), nn.Conv2d(hidden, vocab_size, 1)]
        self.encoder = nn.Sequential(*enc)
        self.embed = nn.Conv2d(vocab_size, embed_dim, 1, bias=False)  # the code embedding E^T y
        dec: list[nn.Module] = [nn.Conv2d(embed_dim, hidden, 3, padding=1)]
        for _ in range(levels):
            dec += [ResBlock(hidden), nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1)]
        dec += [ResBlock(hidden), nn.ReLU(), nn.Conv2d(hidden, in_chans, 1)]
        self.decoder = nn.Sequential(*dec)

    # the config travels inside state_dict() so a checkpoint rebuilds its own network
    def get_extra_state(self):
        return dict(self.config)

    def set_extra_state(self, state):
        if state and dict(state) != self.config:
            raise ValueError(
                f"dVAE checkpoint config {dict(state)} does not match this network {self.config}"
            )

    def _check(self, x: torch.Tensor) -> None:
        if (
            x.ndim != 4
            or x.shape[1] != self.config["in_chans"]
            or x.shape[2] % self.cell
            or x.shape[3] % self.cell
        ):
            raise ValueError(
                f"images: expected [B, {self.config['in_chans']}, H, W] with H, W divisible by "
                f"{self.cell}, got {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V, H/c, W/c]`` of mapped pixels ``x'``."""
        self._check(x)
        return self.encoder(x)

    @torch.no_grad()
    def get_codebook_indices(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).argmax(dim=1)

    def decode(self, y: torch.Tensor) -> torch.Tensor:
        """Soft or hard one-hot ``y [B, V, h, w]`` -> reconstruction in (0, 1) (the mapped range)."""
        return torch.sigmoid(self.decoder(self.embed(y)))

    def decode_indices(self, ids: torch.Tensor) -> torch.Tensor:
        y = F.one_hot(ids, self.vocab_size).permute(0, 3, 1, 2).to(self.embed.weight.dtype)
        return self.decode(y)

    def reconstruct(self, x: torch.Tensor, tau: float = 1.0, hard: bool = False):
        """``(x^, logits)`` through the Gumbel-softmax relaxation (``hard``: straight-through one-hot)."""
        logits = self.forward(x)
        y = F.gumbel_softmax(logits.float(), tau=tau, hard=hard, dim=1).to(logits.dtype)
        return self.decode(y), logits


def kl_to_uniform(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Mean over cells of ``KL(softmax(logits) || uniform) = sum_v q_v log q_v + log V``."""
    logq = F.log_softmax(logits.float(), dim=dim)
    return (logq.exp() * logq).sum(dim).mean() + math.log(logits.shape[dim])
