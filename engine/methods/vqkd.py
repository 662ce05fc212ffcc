"""VQ-KD: trains BEiT v2's tokenizer (``--method vqkd``), usable as ``--tokenizer`` of beitv2.

Input: the BEiT v2 view (ColorJitter + flip + RandomResizedCrop(0.2, 1), ImageNet-normalised). The network
and its loss are in :mod:`engine.models.vqkd`::

    L = mean_n (1 - cos(r_n, t_n)) + mean (l2n(z) - sg(z_q))^2,    t = Teacher(x)[:, 1:]  (frozen, no grad)

Teacher: no weights can be downloaded here, so the teacher is a frozen ViT encoder from a local checkpoint
of this engine (``--teacher PATH``, e.g. a DINO run; its patch features after the final norm, resized to the
tokenizer's grid when the grids differ). Without ``--teacher`` the documented fallback is a frozen,
randomly initialised ViT of the run's ``--model`` built from a fixed seed (:data:`RANDOM_TEACHER_SEED`);
the log says so: it is NOT CLIP or DINO, and distilling it only exercises the machinery.

Logged: the distillation and commitment terms and the codebook usage of the batch's tokens
(``kernels.codebook_usage``: fraction of codes used, perplexity). The encoder evaluated by k-NN is the
tokenizer's ViT encoder. Optimiser per BEiT v2: AdamW (0.9, 0.99), wd 1e-4, 10 warm-up epochs.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.methods import register
from engine.methods.base import TOKENIZER_WIDTH, VOCAB_SIZE, PretrainMethod, backbone_from_cfg
from engine.models.vqkd import VQKD, cosine_distill_loss
from engine.trainer.config import Option

RANDOM_TEACHER_SEED = 1234
_ANNOUNCED: set = set()


def _announce(msg: str) -> None:
    if msg not in _ANNOUNCED:
        _ANNOUNCED.add(msg)
        print(msg, file=sys.stderr, flush=True)


def load_teacher(cfg: dict) -> tuple[nn.Module, str]:
    """``(frozen ViT, description)``: the encoder of ``cfg["teacher"]`` or the random fallback."""
    path = cfg.get("teacher")
    if path:
        from engine.eval import encoder_from_checkpoint, load_checkpoint

        try:
            state = load_checkpoint(path)
        except FileNotFoundError as exc:
            raise ValueError(f"--teacher: {exc}") from None
        enc, tcfg = encoder_from_checkpoint(state)
        if not hasattr(enc, "forward_features") or not hasattr(enc, "patch_size"):
            raise ValueError(
                f"--teacher {path}: the encoder of --method {tcfg.get('method')} is not a ViT "
                "(patch features are needed)"
            )
        desc = f"vqkd: teacher = frozen {tcfg.get('model')} encoder of {path} (--method {tcfg.get('method')})"
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_TEACHER_SEED)
            enc = backbone_from_cfg(
                cfg,
                drop_path_rate=0.0,
                use_abs_pos_emb=True,
                use_shared_rel_pos_bias=False,
                use_rel_pos_bias=False,
                init_values=0.0,
            )
        desc = (
            f"vqkd: WARNING no --teacher given: the distillation target is a frozen RANDOMLY INITIALISED "
            f"{cfg.get('model')} (seed {RANDOM_TEACHER_SEED}), NOT CLIP/DINO; pass --teacher PATH (e.g. a "
            "--method dino checkpoint) for meaningful tokens"
        )
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc.eval(), desc


def vqkd_from_cfg(c: dict, teacher_dim: int) -> VQKD:
    """The VQ-KD tokenizer of a method config with its defaults filled in (``VQKDMethod.c``)."""
    enc = backbone_from_cfg(  # the VQ-KD encoder is unilm's fine-tuning ViT: timm's trunc_normal_ cut-offs
        c,
        drop_path_rate=0.0,
        use_shared_rel_pos_bias=False,
        use_rel_pos_bias=False,
        init_values=0.0,
        use_abs_pos_emb=True,
        init_mode="timm",
    )
    return VQKD(
        dict(enc.config),
        vocab_size=int(c["vocab_size"]),
        codebook_dim=int(c["codebook_dim"]),
        teacher_dim=teacher_dim,
        decoder_depth=int(c["decoder_depth"]),
        decoder_width=c.get("tokenizer_width"),
    )


@register("vqkd")
class VQKDMethod(PretrainMethod):
    recipe = "beitv2"  # the tokenizer is trained on the view BEiT v2 later tokenizes
    defaults = dict(
        blr=1.5e-4,
        weight_decay=1e-4,
        clip_grad=3.0,
        warmup_epochs=10,
        min_lr=1e-5,
        beta2=0.99,
        drop_path=0.0,
        use_abs_pos_emb=True,
        pool="mean",
        vocab_size=8192,
        codebook_dim=32,
        decoder_depth=3,
    )
    options = (
        Option("teacher", None, str, "vqkd: frozen teacher checkpoint (default: a random ViT, not CLIP/DINO)"),
        VOCAB_SIZE,
        Option("codebook_dim", None, int, "vqkd code dimension (32)", range=">=1"),
        TOKENIZER_WIDTH,
        Option("decoder_depth", None, int, "vqkd decoder blocks (3)", range=">=1"),
    )

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        c = self.c
        teacher, desc = load_teacher(c)
        _announce(desc)
        self.teacher_desc = desc
        self.teacher = teacher
        self.tokenizer = vqkd_from_cfg(c, teacher_dim=int(teacher.embed_dim))

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def encoder(self) -> nn.Module:
        return self.tokenizer.encoder

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Teacher patch features on the tokenizer grid ``[B, h*w, C]``.

        A teacher with a relative position bias only runs on its own grid: its input is resized to its
        ``img_size`` when the grids differ. Features on another grid are resized bilinearly."""
        T = self.teacher
        p = T.patch_size
        if (images.shape[2] // p, images.shape[3] // p) != tuple(T.patch_embed.grid_size) and (
            T.rel_pos_bias is not None or any(b.rel_pos_bias is not None for b in T.blocks)
        ):
            images = F.interpolate(
                images.float(), size=(T.patch_embed.img_size,) * 2, mode="bicubic", align_corners=False
            )
        t = T.forward_features(images)[:, 1:]
        th, tw = images.shape[2] // p, images.shape[3] // p
        if (th, tw) != tuple(grid):
            B, _, C = t.shape
            t = t.transpose(1, 2).reshape(B, C, th, tw)
            t = F.interpolate(t.float(), size=grid, mode="bilinear", align_corners=False)
            t = t.flatten(2).transpose(1, 2)
        return t

    def forward(self, batch: dict) -> dict:
        images = batch["images"]
        grid = self.tokenizer.grid(images)
        target = self.teacher_features(images, grid)
        out = self.tokenizer(images)
        distill = cosine_distill_loss(out["rec"], target)
        loss = distill + out["commit"].float()
        with torch.no_grad():
            usage = kernels.codebook_usage(out["ids"], self.tokenizer.vocab_size, check_range=False)
        return {
            "loss": loss,
            "distill": distill.detach(),
            "commit": out["commit"].detach().float(),
            "codebook_usage": usage["fraction_used"].float(),
            "perplexity": usage["perplexity"].float(),
        }
