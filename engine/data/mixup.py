"""Mixup / CutMix with label smoothing, and the soft-target losses of fine-tuning.

The recipe of BEiT, SimMIM and SparK fine-tuning (timm ``Mixup`` in ``mode="batch"``, ``correct_lam=True``)::

    with probability prob (else lam = 1: no mixing, labels only smoothed):
        cutmix with probability switch_prob when both are on (mixup_alpha > 0 and cutmix_alpha > 0)
        mixup:  lam ~ Beta(mixup_alpha, mixup_alpha);   x = lam x + (1 - lam) x.flip(0)
        cutmix: lam ~ Beta(cutmix_alpha, cutmix_alpha); a box of side sqrt(1 - lam) * (H, W) around a uniform centre,
                clipped to the image, is pasted from x.flip(0); lam = 1 - box area / image area
    targets = lam * smooth(y) + (1 - lam) * smooth(y.flip(0)),  smooth(y) = (1 - s) onehot(y) + s / K

so one value of ``lam`` (and one box) per batch, the batch mixed with itself reversed. Label smoothing without
mixing is the same soft target with ``lam = 1``: the soft-target cross-entropy of it equals timm's
``LabelSmoothingCrossEntropy``.

Randomness: :func:`sample_mix` draws the parameters from a numpy generator the loader keys on (seed, epoch,
rank, step) -- as every other augmentation parameter of this engine (:mod:`engine.data.augment`) -- instead of
the global ``np.random`` timm uses, so a resumed run mixes exactly as the uninterrupted one and the parameters
travel with the batch (``batch["mix"]``: ``[lam, cutmix, y0, y1, x0, x1]``); :func:`mix_batch` applies them
on the device. timm's other modes (``"pair"``, ``"elem"``) and ``cutmix_minmax`` are not provided (none of the
official fine-tuning recipes uses them).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class MixSpec:
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    def __post_init__(self):
        for name in ("mixup_alpha", "cutmix_alpha"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("prob", "switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")

    @property
    def active(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


NO_MIX = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=np.float64)


def rand_bbox(rng: np.random.Generator, height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """CutMix box ``(y0, y1, x0, x1)``: side ``int(size * sqrt(1 - lam))`` around a uniform centre, clipped."""
    ratio = float(np.sqrt(1.0 - lam))
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    x0, x1 = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return y0, y1, x0, x1


def sample_mix(rng: np.random.Generator, spec: MixSpec, height: int, width: int) -> np.ndarray:
    """One batch's parameters ``[lam, cutmix (0/1), y0, y1, x0, x1]`` (float64); ``NO_MIX`` when not drawn.

    The draws follow timm's ``_params_per_batch`` order: the apply draw, the switch draw (both on), lam."""
    if not spec.active or not rng.random() < spec.prob:
        return NO_MIX.copy()
    if spec.mixup_alpha > 0 and spec.cutmix_alpha > 0:
        cutmix = bool(rng.random() < spec.switch_prob)
    else:
        cutmix = spec.cutmix_alpha > 0
    alpha = spec.cutmix_alpha if cutmix else spec.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    if not cutmix:
        return np.array([lam, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=np.float64)
    y0, y1, x0, x1 = rand_bbox(rng, height, width, lam)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)  # correct_lam
    return np.array([lam, 1.0, y0, y1, x0, x1], dtype=np.float64)


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B, K]``: ``1 - s + s/K`` at the label, ``s/K`` elsewhere."""
    if labels.ndim != 1:
        raise ValueError(f"labels: expected [B], got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}] "
                         "(unlabelled images cannot be fine-tuned on)")
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, dtype=dtype, device=labels.device)
    return out.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def mix_batch(images: torch.Tensor, labels: torch.Tensor, params, num_classes: int,
              smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mixed images, soft targets [B, K])`` for one batch and its :func:`sample_mix` parameters (``None``:
    no mixing). ``images`` is not modified in place."""
    if params is None:
        lam, cutmix = 1.0, False
    else:
        p = params.detach().to("cpu", torch.float64).reshape(-1).tolist() if torch.is_tensor(params) else list(params)
        lam, cutmix = float(p[0]), bool(p[1])
    targets = smooth_one_hot(labels, num_classes, smoothing)
    if lam == 1.0:
        return images, targets
    other = images.flip(0)
    if cutmix:
        y0, y1, x0, x1 = (int(v) for v in p[2:6])
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = other[:, :, y0:y1, x0:x1]
    else:
        images = images * lam + other * (1.0 - lam)
    return images, targets * lam + targets.flip(0) * (1.0 - lam)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean_b sum_k -t_bk log softmax(z_b)_k`` (timm ``SoftTargetCrossEntropy``), in float32."""
    return torch.sum(-targets.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def binary_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the ``B x K`` sigmoid cross-entropies (timm ``BinaryCrossEntropy``, SparK's loss with LAMB)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


LOSSES = {"ce": soft_target_cross_entropy, "bce": binary_cross_entropy}
