"""LAMB (You et al., "Large Batch Optimization for Deep Learning", 2019): Adam with a layer-wise trust ratio.

SparK pre-trains with LAMB (batch 4096, beta2 0.95 for ResNets, 0.999 for ConvNeXts). Per parameter tensor
``p`` with gradient ``g`` at step ``t``::

    m = b1 m + (1 - b1) g                 v = b2 v + (1 - b2) g^2
    u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd p
    r = ||p|| / ||u||   if ||p|| > 0 and ||u|| > 0, else 1         (trust ratio, clipped to trust_clip if set)
    p = p - lr r u

As in the common reference implementations (timm ``Lamb``, NVIDIA apex ``FusedLAMB``) the trust ratio is applied
only where weight decay is (groups with ``weight_decay > 0``) unless ``always_adapt=True``: biases and
normalisation weights, which get no decay here, take plain Adam steps. Global gradient clipping is left to the
trainer (``--clip-grad``) rather than built in. The update runs as a handful of ``torch._foreach_*`` calls per
group (one fused pass per op over all tensors), state is per tensor (``exp_avg``, ``exp_avg_sq``, ``step``), so
checkpoints resume exactly.
"""

from __future__ import annotations

import math

import torch


class Lamb(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 always_adapt: bool = False, trust_clip: float | None = None):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {tuple(betas)}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if trust_clip is not None and trust_clip <= 0:
            raise ValueError(f"trust_clip must be > 0 or None, got {trust_clip}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, always_adapt=always_adapt,
                        trust_clip=trust_clip)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("Lamb does not support sparse gradients")
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            grads, m, v, bc1, bc2_sqrt = [], [], [], [], []
            for p in params:
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
                grads.append(p.grad)
                m.append(st["exp_avg"])
                v.append(st["exp_avg_sq"])
                bc1.append(1.0 - b1 ** st["step"])
                bc2_sqrt.append(math.sqrt(1.0 - b2 ** st["step"]))
            torch._foreach_mul_(m, b1)
            torch._foreach_add_(m, grads, alpha=1.0 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, value=1.0 - b2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, eps)
            update = torch._foreach_div(m, denom)
            torch._foreach_div_(update, bc1)
            if wd != 0:
                torch._foreach_add_(update, params, alpha=wd)
            if wd != 0 or group["always_adapt"]:
                # all trust ratios in a few vector ops (no per-tensor Python loop, no host sync)
                nd = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
                w_norm = torch.stack([n.to(nd) for n in torch._foreach_norm(params)])
                u_norm = torch.stack([n.to(nd) for n in torch._foreach_norm(update)])
                ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm.clamp_min(torch.finfo(nd).tiny),
                                    torch.ones_like(w_norm))
                if group["trust_clip"] is not None:
                    ratio = ratio.clamp(max=group["trust_clip"])
                torch._foreach_mul_(update, list(ratio.unbind(0)))
            torch._foreach_add_(params, update, alpha=-lr)
        return loss
