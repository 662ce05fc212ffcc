"""DINO: self-distillation with no labels.

Student ``g_s`` (ViT + DINO head, drop path) and teacher ``g_t`` (a deep copy, no gradients, no drop path).
The teacher sees the 2 global crops, the student all crops (one backbone pass per resolution, head once).
With ``P_t = softmax((g_t(x) - c) / tau_t)`` and ``log P_s = log_softmax(g_s(x') / tau_s)``::

    L = 1/|pairs| * sum_{t in globals} sum_{s in crops, s != t} mean_batch( -<P_t, log P_s> )

Center ``c <- m_c c + (1 - m_c) mean_batch(g_t(x))`` (all-reduced over ranks, m_c = 0.9). Teacher
``theta_t <- m theta_t + (1 - m) theta_s`` with ``m`` cosine 0.996 -> 1 per step, in one fused pass
(``torch._foreach_mul_`` / ``torch._foreach_add_``). ``tau_t`` warms up linearly 0.04 -> 0.07; tau_s = 0.1.
The last head layer gets no update during the first ``freeze_last_layer`` epochs.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.methods import register
from engine.methods.base import PretrainMethod, backbone_from_cfg
from engine.models.heads import DINOHead
from engine.models.vit import DropPath
from engine.trainer.distributed import all_reduce_, world_size
from engine.trainer.schedules import cosine_schedule, warmup_constant_schedule


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


@register("dino")
class DINO(PretrainMethod):
    defaults = dict(blr=5e-4, weight_decay=0.04, weight_decay_end=0.4, min_lr=1e-6, clip_grad=3.0, warmup_epochs=10,
                    drop_path=0.1, use_abs_pos_emb=True, pool="cls", out_dim=65536, head_hidden_dim=2048,
                    bottleneck_dim=256, norm_last_layer=True, local_crops=8, momentum_teacher=0.996,
                    center_momentum=0.9, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30,
                    student_temp=0.1, freeze_last_layer=1)

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        c = {**self.defaults, **{k: v for k, v in cfg.items() if v is not None}}
        self.c = c
        backbone = backbone_from_cfg(cfg)
        head = DINOHead(backbone.embed_dim, int(c["out_dim"]), int(c["head_hidden_dim"]), int(c["bottleneck_dim"]),
                        norm_last_layer=bool(c["norm_last_layer"]))
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

    # ------------------------------------------------------------------------------ trainer hooks
    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        c = self.c
        warm = int(round(float(c["warmup_teacher_temp_epochs"]) * steps_per_epoch))
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
    def after_step(self) -> None:
        m = self._values["momentum"]
        t = [p for p in self.teacher.parameters()]
        s = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(t, m)
        torch._foreach_add_(t, s, alpha=1.0 - m)

    def loader_kwargs(self) -> dict:
        kw = {"local_crops": int(self.c["local_crops"])}
        if self.c.get("local_size"):
            kw["local_size"] = int(self.c["local_size"])
        return kw

    def encoder(self) -> nn.Module:
        return self.teacher.backbone

    # ------------------------------------------------------------------------------ loss
    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.float().sum(dim=0, keepdim=True)
        all_reduce_(batch_center)
        batch_center = batch_center / (teacher_out.shape[0] * world_size())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)

    def forward(self, batch: dict) -> dict:
        crops = list(batch["crops"])
        n_global = 2
        with torch.no_grad():
            teacher_out = self.teacher(crops[:n_global])
        student_out = self.student(crops)
        temp = self._values["teacher_temp"]
        loss = dino_loss(student_out, teacher_out, self.center, len(crops), n_global, self.student_temp, temp)
        self.update_center(teacher_out)
        return {"loss": loss, "teacher_temp": torch.tensor(temp), "momentum": torch.tensor(self._values["momentum"])}
