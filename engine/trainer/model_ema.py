"""Weight EMA of a trained model (BEiT's ``--model_ema``; timm ``ModelEmaV2``/``V3`` semantics).

After every optimizer step (:meth:`ModelEma.update`), every floating tensor of the model's ``state_dict``
(parameters *and* buffers, e.g. batch-norm running statistics) moves towards the model's::

    ema = decay * ema + (1 - decay) * model          (torch._foreach_lerp_, weight 1 - decay, as timm V3)

and every other tensor (``num_batches_tracked``) is copied. The copy is kept in fp32 whatever the model's
dtypes or the run's autocast precision, never requires gradients, and is *not* a submodule of the trained
model: DDP never sees it (no gradient all-reduce, no unused-parameter error), the optimizer never sees it.
Under DDP every rank updates its own copy from its identical parameters; rank 0's is evaluated and saved, and
every rank restores it on resume.

``decay`` 0.9999 is BEiT's ImageNet value (~125k steps); a run of a few hundred steps needs a shorter horizon
(``1 / (1 - decay)`` steps), e.g. 0.99. ``warmup`` (timm V3's ``use_warmup``, off by default) caps the decay at
``(1 + n) / (10 + n)`` after ``n`` updates, so an EMA of a short run does not stay near the initial weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"model_ema_decay must be in [0, 1], got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.updates = 0
        self.module = copy.deepcopy(model)
        for t in list(self.module.parameters()) + list(self.module.buffers()):
            t.requires_grad_(False)
            if t.is_floating_point():
                t.data = t.data.float()
        self.module.eval()

    def current_decay(self) -> float:
        """The decay of the next update (after ``updates`` updates)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model`` (the unwrapped module, not its DDP wrapper)."""
        ema_sd = self.module.state_dict(keep_vars=True)
        model_sd = model.state_dict(keep_vars=True)
        if ema_sd.keys() != model_sd.keys():
            missing = sorted(set(ema_sd) ^ set(model_sd))[:3]
            raise ValueError(f"model EMA: the model's tensors changed since the EMA was made ({missing})")
        floats = [k for k, v in ema_sd.items() if v.is_floating_point()]
        others = [k for k, v in ema_sd.items() if not v.is_floating_point()]
        decay = self.current_decay()
        ema_f = [ema_sd[k].data for k in floats]
        model_f = [model_sd[k].detach().to(dtype=torch.float32, device=ema_sd[k].device) for k in floats]
        if ema_f:
            torch._foreach_lerp_(ema_f, model_f, 1.0 - decay)
        for k in others:
            ema_sd[k].data.copy_(model_sd[k].detach())
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "decay": self.decay, "warmup": self.warmup,
                "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved EMA exactly (ValueError when it is not of this model)."""
        try:
            self.module.load_state_dict(state["module"], strict=True)
            self.updates = int(state["updates"])
        except (KeyError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0][:200]
            raise ValueError(f"the checkpoint's model EMA does not fit this model ({first})") from None
