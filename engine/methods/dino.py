"""DINO: self-distillation with no labels (facebookresearch/dino, ``main_dino.py``).

Student ``g_s`` (backbone + DINO head, drop path) and teacher ``g_t`` (a deep copy, no gradients, no drop
path). The teacher sees the 2 global crops, the student all crops (one backbone pass per resolution, head
once). With ``P_t = softmax((g_t(x) - c) / tau_t)`` and ``log P_s = log_softmax(g_s(x') / tau_s)``::

    L = 1/|pairs| * sum_{t in globals} sum_{s in crops, s != t} mean_batch( -<P_t, log P_s> )

Center ``c <- m_c c + (1 - m_c) mean_batch(g_t(x))`` (all-reduced over ranks, m_c = 0.9). Teacher
``theta_t <- m theta_t + (1 - m) theta_s`` with ``m`` cosine ``momentum_teacher`` -> 1 per step, in one fused
pass (``torch._foreach_mul_`` / ``torch._foreach_add_``). ``tau_t`` warms up linearly ``warmup_teacher_temp``
-> ``teacher_temp`` over ``warmup_teacher_temp_epochs``; tau_s = 0.1. The last head layer gets no update
during the first ``freeze_last_layer`` epochs.

Backbones: every one the engine has -- a ViT (``--model vit_*``, [CLS] features) or a convnet (``resnet*``,
``convnext*``: global-average-pooled features), as the original takes its ViTs or any torchvision model
(ResNet-50 in its README). Faithful to the original code, per method:

* ViT init: normal std 0.02 (DINO's ``trunc_normal_`` cuts at +-2 absolute), PyTorch's default patch-embed
  conv init and *no* BEiT-style ``1/sqrt(2 l)`` rescale (``init_mode="dino"``, :mod:`engine.models.vit`);
  head init and ``use_bn_in_head`` as :class:`engine.models.heads.DINOHead`;
* gradient clipping per parameter: every parameter's gradient is scaled to norm <= ``clip_grad`` on its own
  (``utils.clip_gradients``), not the global norm (:meth:`clip_gradients`);
* batch norms (ResNet backbones, head BN) are synchronised across ranks under DDP, student and teacher
  (``sync_batchnorm``); the teacher runs in training mode (batch statistics), as the original.

Defaults are the original's argparse defaults (its vanilla 100-epoch ViT-S/16 run): lr 5e-4 per 256, wd
0.04 -> 0.4, clip 3.0, 10 warm-up epochs, drop path 0.1, 65536 prototypes, teacher temperature 0.04 (no
warm-up), momentum 0.996, 8 local crops, global crop scale (0.4, 1) and local (0.05, 0.4) at 224 px -- below
224 px the crop scales follow the image size (:mod:`engine.data.augment`).

Collapse monitor, returned with the loss every step (so ``log.jsonl`` has it) from the teacher's output on the
global crops, ``K`` = ``out_dim``:

* ``teacher_mi`` = H(mean_batch P_t) - mean_batch H(P_t): the information the teacher's assignment carries
  about the image; ~0 when collapsed (uniform *or* one dominant prototype), a few nats when it works;
* ``teacher_entropy`` = mean_batch H(P_t) and ``teacher_entropy_rel`` = that / ln K (1 = uniform collapse);
* ``teacher_std`` = per-dimension standard deviation over the batch of the raw teacher output, averaged
  over dimensions (~0: every image gets the same output; compare with tau_t).

After 20% of the run (at least 20 steps) a run whose MI stays below
``COLLAPSE_MI`` prints one warning naming the kind of collapse and the known remedies.
"""

from __future__ import annotations

import copy
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.methods import register
from engine.methods.base import PretrainMethod, backbone_from_cfg
from engine.models.heads import DINOHead
from engine.models.vit import DropPath
from engine.trainer.config import Option
from engine.trainer.distributed import all_reduce_, is_dist, world_size
from engine.trainer.schedules import cosine_schedule, warmup_constant_schedule

COLLAPSE_MI = 0.1  # nats; collapsed runs measured ~0, working CPU-preset runs 1-3

REMEDIES = (
    "known remedies: batch norm in the head (--use-bn-in-head; the images then start apart), milder global "
    "crops (--crop-scale 0.6,1) and fewer or no local crops (--local-crops 0) on small or low-detail images, "
    "a teacher momentum that fits the run length (--momentum-teacher 0.95-0.99 for a few hundred steps; 0.996 "
    "leaves the teacher at its random init), a larger batch (centering needs >= 64), a lower teacher "
    "temperature (--teacher-temp 0.02-0.04)")


class MultiCropNet(nn.Module):
    """Backbone + head; crops of equal resolution go through the backbone together, the head runs once."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        feats, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(crops[start:end]), pool="cls"))
            start = end
        return self.head(torch.cat(feats))


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, n_crops: int,
              n_global: int, student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Cross-entropy over all (teacher view, student view) pairs of different views, averaged.

    ``student_out`` [n_crops * B, K], ``teacher_out`` [n_global * B, K] (crop-major). Each student
    log-softmax is computed once: sum_{s != t} log P_s = (sum_s log P_s) - log P_t.
    """
    if n_crops < 2:
        raise ValueError(f"DINO needs at least 2 crops, got {n_crops}")
    logp = F.log_softmax(student_out.float() / student_temp, dim=-1).chunk(n_crops)
    targets = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1).detach().chunk(n_global)
    total_logp = torch.stack(logp).sum(0)
    loss = student_out.new_zeros((), dtype=torch.float32)
    n_pairs = 0
    for iq, q in enumerate(targets):
        others = total_logp - logp[iq] if iq < n_crops else total_logp
        loss = loss - (q * others).sum(-1).mean()
        n_pairs += n_crops - (1 if iq < n_crops else 0)
    return loss / n_pairs


@torch.no_grad()
def collapse_stats(teacher_out: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> dict[str, torch.Tensor]:
    """The collapse monitor of the module doc from the raw teacher output ``[N, K]`` (0-d float32 tensors)."""
    t = teacher_out.float()
    logp = F.log_softmax((t - center) / teacher_temp, dim=-1)
    p = logp.exp()
    h_each = -(p * logp).sum(-1).mean()
    mean_p = p.mean(0)
    h_mean = -(mean_p * mean_p.clamp_min(1e-30).log()).sum()
    k = t.shape[-1]
    return {
        "teacher_mi": h_mean - h_each,
        "teacher_entropy": h_each,
        "teacher_entropy_rel": h_each / math.log(k),
        "teacher_std": t.std(dim=0).mean() if t.shape[0] > 1 else t.new_zeros(()),
    }


def _pair(value, name: str):
    if value is None or isinstance(value, (list, tuple)):
        return value
    try:
        lo, hi = (float(v) for v in str(value).split(","))
    except ValueError:
        raise ValueError(f"--{name.replace('_', '-')}: expected 'lo,hi', got {value!r}") from None
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"--{name.replace('_', '-')}: expected 0 < lo <= hi <= 1, got {value!r}")
    return (lo, hi)


def is_convnet(name: str) -> bool:
    from engine.methods.spark import convnet_names

    return name in convnet_names()


def dino_backbone(cfg: dict) -> nn.Module:
    """The backbone named by ``cfg["model"]``: a ViT with DINO's init, or a ResNet / ConvNeXt."""
    name = str(cfg["model"])
    if is_convnet(name):
        from engine.methods.spark import build_convnet

        return build_convnet(name, drop_path=float(cfg.get("drop_path") or 0.0))
    return backbone_from_cfg(cfg, init_mode="dino")


@register("dino")
class DINO(PretrainMethod):
    sync_batchnorm = True  # the original converts student and teacher to SyncBatchNorm when they hold a BN
    # the original's argparse defaults (vanilla ViT-S/16, 100 epochs)
    defaults = dict(blr=5e-4, weight_decay=0.04, weight_decay_end=0.4, min_lr=1e-6, clip_grad=3.0, warmup_epochs=10,
                    drop_path=0.1, use_abs_pos_emb=True, pool="cls", out_dim=65536, head_hidden_dim=2048,
                    bottleneck_dim=256, norm_last_layer=True, use_bn_in_head=False, local_crops=8,
                    momentum_teacher=0.996, center_momentum=0.9, warmup_teacher_temp=0.04, teacher_temp=0.04,
                    warmup_teacher_temp_epochs=0, student_temp=0.1, freeze_last_layer=1)
    options = (
        Option("out_dim", None, int, "DINO prototypes (65536 in the paper)", range=">=1"),
        Option("head_hidden_dim", None, int, "DINO head MLP width (2048)", range=">=1"),
        Option("bottleneck_dim", None, int, "DINO head bottleneck (256)", range=">=1"),
        Option("norm_last_layer", None, bool, "DINO: weight-norm gain fixed to 1"),
        Option("local_crops", None, int, "DINO local crops", range=">=0"),
        Option("local_size", None, int, "DINO local crop size", range=">=1"),
        Option("momentum_teacher", None, float, "DINO teacher EMA momentum start (cosine to 1)", range="[0,1]"),
        Option("center_momentum", None, float, "DINO centering momentum", range="[0,1]"),
        Option("warmup_teacher_temp", None, float, "DINO teacher temperature at step 0", range="(0,inf)"),
        Option("teacher_temp", None, float, "DINO teacher temperature after warm-up", range="(0,inf)"),
        Option("warmup_teacher_temp_epochs", None, float, "DINO teacher temperature warm-up epochs", range="[0,inf)"),
        Option("student_temp", None, float, "DINO student temperature", range="(0,inf)"),
        Option("freeze_last_layer", None, int, "DINO: epochs with the last head layer frozen", range=">=0"),
        Option("use_bn_in_head", None, bool, "DINO: BatchNorm1d after each hidden layer of the head (the original's "
                                             "--use_bn_in_head; images start apart at init)"),
        Option("local_crops_scale", None, str, "DINO local crop scale range 'lo,hi' (default (0.05, 0.4) at >= 192 "
                                               "px, following the image size below)"),
        Option("color_jitter", None, float, "colour-jitter strength factor of the recipe (1 = published; 0 = none)",
               range="[0,inf)"),
    )

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        c = self.c
        backbone = dino_backbone(c)
        head = DINOHead(int(backbone.embed_dim), int(c["out_dim"]), int(c["head_hidden_dim"]),
                        int(c["bottleneck_dim"]), norm_last_layer=bool(c["norm_last_layer"]),
                        use_bn=bool(c["use_bn_in_head"]))
        self.student = MultiCropNet(backbone, head)
        self.teacher = copy.deepcopy(self.student)
        for m in self.teacher.modules():
            if isinstance(m, DropPath):
                m.drop_prob = 0.0
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, int(c["out_dim"])))
        self.student_temp = float(c["student_temp"])
        self.center_momentum = float(c["center_momentum"])
        self.freeze_last_layer = int(c["freeze_last_layer"])
        self._values: dict[str, float] = {"teacher_temp": float(c["warmup_teacher_temp"]),
                                          "momentum": float(c["momentum_teacher"])}
        _pair(c.get("local_crops_scale"), "local_crops_scale")  # a bad value fails at build time
        self.monitor_after = 0  # set by schedules(): 20% of the run, at least 20 steps
        self._warned = False

    # ------------------------------------------------------------------------------ trainer hooks
    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        c = self.c
        warm = int(round(float(c["warmup_teacher_temp_epochs"]) * steps_per_epoch))
        self.monitor_after = max(20, total_steps // 5)
        return {
            "momentum": cosine_schedule(float(c["momentum_teacher"]), 1.0, total_steps),
            "teacher_temp": warmup_constant_schedule(float(c["warmup_teacher_temp"]), float(c["teacher_temp"]),
                                                     total_steps, warm),
        }

    def set_progress(self, step: int, epoch: int, values: dict[str, float]) -> None:
        super().set_progress(step, epoch, values)
        self._values.update({k: float(values[k]) for k in ("momentum", "teacher_temp") if k in values})

    def after_backward(self) -> None:
        if self.epoch < self.freeze_last_layer:
            for p in self.student.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def clip_gradients(self, params: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
        """DINO's ``utils.clip_gradients``: each gradient scaled by ``min(1, max_norm / (||g|| + 1e-6))``."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        norms = torch._foreach_norm(grads)
        scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(grads, scales)

    @torch.no_grad()
    def after_step(self) -> None:
        m = self._values["momentum"]
        t = [p for p in self.teacher.parameters()]
        s = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(t, m)
        torch._foreach_add_(t, s, alpha=1.0 - m)

    def data_recipe(self):
        """DINO's multi-crop recipe with its crop count/size, ``local_crops_scale`` and ``color_jitter``."""
        from engine.data import DataRecipe

        c = self.c
        return DataRecipe("dino", local_crops=int(c["local_crops"]), local_size=int(c["local_size"]) if c.get("local_size") else None,
                          local_crops_scale=_pair(c.get("local_crops_scale"), "local_crops_scale"),
                          color_jitter=c.get("color_jitter"))

    def encoder(self) -> nn.Module:
        return self.teacher.backbone

    # ------------------------------------------------------------------------------ loss
    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.float().sum(dim=0, keepdim=True)
        all_reduce_(batch_center)
        batch_center = batch_center / (teacher_out.shape[0] * world_size())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)

    def _check_collapse(self, stats: dict[str, torch.Tensor]) -> None:
        if self._warned or not self.training or self.step < self.monitor_after or not self.monitor_after:
            return
        mi = float(stats["teacher_mi"])
        if mi >= COLLAPSE_MI:
            return
        self._warned = True
        rel = float(stats["teacher_entropy_rel"])
        kind = ("uniform: every image gets a near-uniform assignment" if rel > 0.5 else
                "one prototype dominates every image")
        if not is_dist() or torch.distributed.get_rank() == 0:
            print(f"dino: WARNING the teacher has collapsed at step {self.step} (teacher_mi {mi:.3f} nats < "
                  f"{COLLAPSE_MI}; teacher entropy {rel:.2f} of ln K; {kind}); {REMEDIES}", file=sys.stderr,
                  flush=True)

    def forward(self, batch: dict) -> dict:
        crops = list(batch["crops"])
        n_global = 2
        with torch.no_grad():
            teacher_out = self.teacher(crops[:n_global])
        student_out = self.student(crops)
        temp = self._values["teacher_temp"]
        loss = dino_loss(student_out, teacher_out, self.center, len(crops), n_global, self.student_temp, temp)
        stats = collapse_stats(teacher_out, self.center, temp)
        self._check_collapse(stats)
        self.update_center(teacher_out)
        return {"loss": loss, "teacher_temp": torch.tensor(temp), "momentum": torch.tensor(self._values["momentum"]),
                **stats}
