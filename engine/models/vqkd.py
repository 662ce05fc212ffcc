"""VQ-KD: BEiT v2's vector-quantised knowledge-distillation tokenizer.

For ImageNet-normalised images ``x`` with patch tokens ``h = ViT_enc(x)[:, 1:]`` (``[B, N, D]``)::

    z     = W_2 tanh(W_1 h)                        Linear(D, D) - Tanh - Linear(D, d)      (d = 32)
    i, z_q = nearest_code(l2n(z), l2n(C))          cosine lookup in the K x d codebook, straight-through
    r     = V_2 tanh(V_1 Dec(z_q))                 Dec: a ViT with patch size 1 on the h x w token grid,
                                                   then Linear(Dd, Dd) - Tanh - Linear(Dd, teacher_dim)
    L     = mean_n (1 - cos(r_n, t_n)) + mean (l2n(z) - sg(z_q))^2          (t: the teacher's patch features)

The codebook moves only by the EMA of :class:`kernels.VectorQuantizer` (k-means initialised on the first
batch); it gets no gradient. Token ids are ``i`` on the patch grid (``get_codebook_indices``).

``config`` (including the encoder/decoder ViT configs) travels as extra state of ``state_dict()``, so a
checkpoint rebuilds its own network (:mod:`engine.tokenizers`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.models.vit import VisionTransformer


def _task_layer(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    layer = nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))
    for m in layer:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
            nn.init.zeros_(m.bias)
    return layer


class VQKD(nn.Module):
    def __init__(
        self,
        encoder: dict,
        vocab_size: int = 8192,
        codebook_dim: int = 32,
        teacher_dim: int = 768,
        decoder_depth: int = 3,
        decoder_width: int | None = None,
        decay: float = 0.99,
        kmeans_init: bool = True,
    ):
        super().__init__()
        enc = VisionTransformer(**encoder)
        D = enc.embed_dim
        width = int(decoder_width or D)
        grid = enc.patch_embed.grid_size[0]
        heads = enc.num_heads if width % enc.num_heads == 0 else 1
        dec_cfg = dict(
            img_size=grid,
            patch_size=1,
            in_chans=int(codebook_dim),
            embed_dim=width,
            depth=int(decoder_depth),
            num_heads=heads,
            use_abs_pos_emb=True,
        )
        self.config = dict(
            encoder=dict(enc.config),
            vocab_size=int(vocab_size),
            codebook_dim=int(codebook_dim),
            teacher_dim=int(teacher_dim),
            decoder_depth=int(decoder_depth),
            decoder_width=width,
            decay=float(decay),
            kmeans_init=bool(kmeans_init),
        )
        self.vocab_size, self.patch_size = int(vocab_size), enc.patch_size
        self.encoder = enc
        self.encode_task_layer = _task_layer(D, D, int(codebook_dim))
        self.quantizer = kernels.VectorQuantizer(
            int(vocab_size), int(codebook_dim), decay=float(decay), kmeans_init=bool(kmeans_init)
        )
        self.decoder = VisionTransformer(**dec_cfg)
        self.decode_task_layer = _task_layer(width, width, int(teacher_dim))

    def get_extra_state(self):
        return dict(self.config)

    def set_extra_state(self, state):
        if state and _arch(dict(state)) != _arch(self.config):
            raise ValueError(
                f"VQ-KD checkpoint config {dict(state)} does not match this network {self.config}"
            )

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        return x.shape[2] // self.patch_size, x.shape[3] // self.patch_size

    def encode(self, x: torch.Tensor):
        """``(z_q [B, N, d] straight-through, ids [B, h, w] int64, commitment loss)``."""
        h, w = self.grid(x)
        tokens = self.encoder.forward_features(x)[:, 1:]
        z = self.encode_task_layer(tokens.to(self.encode_task_layer[0].weight.dtype))
        z_q, ids, commit = self.quantizer(z.float())
        return z_q, ids.reshape(x.shape[0], h, w), commit

    def decode(self, z_q: torch.Tensor, h: int, w: int) -> torch.Tensor:
        B, _, d = z_q.shape
        grid = z_q.transpose(1, 2).reshape(B, d, h, w)
        return self.decode_task_layer(self.decoder.forward_features(grid)[:, 1:])

    def forward(self, x: torch.Tensor) -> dict:
        h, w = self.grid(x)
        z_q, ids, commit = self.encode(x)
        return {"rec": self.decode(z_q, h, w), "ids": ids, "commit": commit}

    @torch.no_grad()
    def get_codebook_indices(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[1]


def _arch(config: dict) -> dict:
    """The config without its init-only keys (weights written before ``init_mode`` existed still load)."""
    out = dict(config)
    if isinstance(out.get("encoder"), dict):
        out["encoder"] = {k: v for k, v in out["encoder"].items() if k != "init_mode"}
    return out


def cosine_distill_loss(rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_n (1 - cos(rec_n, target_n))`` over the last dim (fp32)."""
    return (1 - F.cosine_similarity(rec.float(), target.float(), dim=-1, eps=1e-6)).mean()
