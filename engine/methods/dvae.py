"""dVAE: trains BEiT's discrete image tokenizer (``--method dvae``), usable as ``--tokenizer`` of beit.

Input: the single-view SimMIM recipe (RandomResizedCrop + flip, ImageNet-normalised); the view is brought
back to [0, 1] and mapped ``x' = 0.8 x + 0.1`` -- the pixel mapping of the tokenizer view BEiT's loader
produces. Loss (see :mod:`engine.models.dvae`)::

    L = mean (sigmoid(Dec(E^T softmax((logits + g) / tau))) - x')^2 + beta(t) * KL(q || U)

``tau`` follows a cosine from ``gumbel_temp`` to ``gumbel_temp_end`` over the run (DALL-E: 1 -> 1/16). The KL
term to the uniform prior (per cell, averaged) has DALL-E's ramp: ``beta`` rises linearly from 0 to
``kl_weight`` over the first ``kl_warmup_steps`` updates (DALL-E: 0 -> 6.6 over 5000), then stays. Both are
owned by :meth:`schedules`. Without it nothing keeps the encoder from sending every cell to a few codes
(codebook collapse: BEiT then predicts a handful of classes). DALL-E's loss is an ELB in nats -- a logit-
Laplace likelihood summed over 256 x 256 x 3 pixel values plus the KL summed over 32 x 32 cells -- so its 6.6 is
not a weight for this mean-squared error; this engine's ``kl_weight`` 1e-3 was chosen on the CPU preset
(256 codes, 220 steps, seed 0): without the term 12% of the codes were in use at the end (token perplexity 8,
reconstruction MSE 0.0022), with it 56% (perplexity 69, MSE 0.0028).

Logged every step: the reconstruction MSE, the KL and its weight, the fraction of the vocabulary used by the
argmax tokens of the batch and their perplexity (``kernels.codebook_usage``: exp of the entropy of the
token histogram; = vocab size when all codes are used equally).

The encoder evaluated by k-NN is the tokenizer's conv trunk (the features before the logit layer), mean
pooled, on ImageNet-normalised images.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import kernels
from engine.methods import register
from engine.methods.base import TOKENIZER_WIDTH, VOCAB_SIZE, PretrainMethod
from engine.models.dvae import DVAE, kl_to_uniform, map_pixels
from engine.trainer.config import Option
from engine.trainer.schedules import cosine_schedule, warmup_constant_schedule

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_to_unit(images: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation: [0, 1] pixels (clamped)."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def dvae_from_cfg(c: dict) -> DVAE:
    """The dVAE of a method config with its defaults filled in (``DVAEMethod.c``)."""
    return DVAE(
        vocab_size=int(c["vocab_size"]), hidden=int(c["tokenizer_width"]), cell=int(c["tokenizer_cell"])
    )


class DVAEFeatures(nn.Module):
    """k-NN view of a dVAE: mean-pooled trunk features of ImageNet-normalised images."""

    def __init__(self, dvae: DVAE):
        super().__init__()
        self.dvae = dvae
        self.config = dict(dvae.config, kind="dvae")
        self.num_features = dvae.config["hidden"]

    def forward(self, x: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        h = self.dvae.encoder[:-1](map_pixels(imagenet_to_unit(x)))  # up to the logit layer
        return h.mean(dim=(2, 3))


@register("dvae")
class DVAEMethod(PretrainMethod):
    recipe = "simmim"  # one RandomResizedCrop view is all the tokenizer needs
    defaults = dict(
        blr=1e-3,
        weight_decay=1e-4,
        clip_grad=3.0,
        warmup_epochs=1,
        min_lr=1e-5,
        pool="mean",
        vocab_size=8192,
        tokenizer_width=256,
        tokenizer_cell=8,
        gumbel_temp=1.0,
        gumbel_temp_end=1 / 16,
        kl_weight=1e-3,
        kl_warmup_steps=5000,
    )
    options = (
        VOCAB_SIZE,
        TOKENIZER_WIDTH,
        Option("tokenizer_cell", None, int, "dvae pixels per token side (8 = DALL-E; a power of 2)", range=">=1"),
        Option("gumbel_temp", None, float, "dvae Gumbel-softmax temperature at step 0", range="(0,inf)"),
        Option("gumbel_temp_end", None, float, "dvae Gumbel-softmax temperature at the end (cosine anneal)",
               range="(0,inf)"),
        Option("kl_weight", None, float, "dvae weight of KL(q || uniform)", range="[0,inf)"),
        Option("kl_warmup_steps", None, int, "dvae: the KL weight ramps linearly from 0 over this many updates "
                                             "(DALL-E: 5000)", range=">=0"),
    )

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        c = self.c
        self.tokenizer = dvae_from_cfg(c)
        if int(c["image_size"]) % self.tokenizer.cell:
            raise ValueError(
                f"--image-size {c['image_size']} must be divisible by --tokenizer-cell {self.tokenizer.cell}"
            )
        self.kl_weight = float(c["kl_weight"])
        self._beta = 0.0 if int(c["kl_warmup_steps"]) > 0 else self.kl_weight
        self._tau = float(c["gumbel_temp"])

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return {
            "gumbel_temp": cosine_schedule(
                float(self.c["gumbel_temp"]), float(self.c["gumbel_temp_end"]), total_steps
            ),
            "kl_weight": warmup_constant_schedule(0.0, self.kl_weight, total_steps, int(self.c["kl_warmup_steps"])),
        }

    def set_progress(self, step: int, epoch: int, values: dict[str, float]) -> None:
        super().set_progress(step, epoch, values)
        if "gumbel_temp" in values:
            self._tau = float(values["gumbel_temp"])
        if "kl_weight" in values:
            self._beta = float(values["kl_weight"])

    def encoder(self) -> nn.Module:
        return DVAEFeatures(self.tokenizer)

    def forward(self, batch: dict) -> dict:
        x = map_pixels(imagenet_to_unit(batch["images"]))
        rec, logits = self.tokenizer.reconstruct(x, tau=self._tau)
        mse = (rec.float() - x.float()).pow(2).mean()
        loss = mse
        kl = kl_to_uniform(logits)
        if self._beta > 0:
            loss = loss + self._beta * kl
        out = {"rec_mse": mse.detach(), "gumbel_temp": torch.tensor(self._tau), "kl": kl.detach(),
               "kl_weight": torch.tensor(self._beta)}
        with torch.no_grad():
            usage = kernels.codebook_usage(logits.argmax(dim=1), self.tokenizer.vocab_size, check_range=False)
        out["token_usage"] = usage["fraction_used"].float()
        out["perplexity"] = usage["perplexity"].float()
        return {"loss": loss, **out}
