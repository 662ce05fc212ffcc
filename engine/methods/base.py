"""The contract between the generic training loop and a pre-training method.

A method is an ``nn.Module`` that owns its networks and its loss::

    out = method(batch)          # {"loss": scalar tensor, other scalar metrics...}

and optionally hooks into the loop: ``set_progress`` (before the forward: step, epoch, schedule values),
``after_backward`` (e.g. cancel gradients of a frozen layer), ``after_step`` (e.g. EMA of a teacher).
``encoder()`` returns the backbone evaluated by k-NN / linear probing and exported.
``loader_kwargs()`` are the method-specific arguments of :func:`engine.data.build_pretrain_loader`.
``defaults`` are the method's hyper-parameter defaults (below the YAML preset and the CLI).

Two hooks follow what each original code base does rather than one engine-wide choice:

* ``clip_gradients(params, max_norm, total_norm)``: gradient clipping (``--clip-grad``). The default clips the
  global norm of all gradients (``torch.nn.utils.clip_grad_norm_``, as BEiT, BEiT v2, SimMIM and SparK do);
  DINO overrides it to clip each parameter's gradient to ``max_norm`` on its own (its ``utils.clip_gradients``).
* ``sync_batchnorm`` (class flag) and ``convert_sync_batchnorm()``: under DDP the trainer converts the
  method's batch norms to synchronised ones before wrapping it (SparK's ``sbn=True``, DINO's
  ``convert_sync_batchnorm`` of student and teacher); see :mod:`engine.methods.sync_bn`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class PretrainMethod(nn.Module):
    name: str = ""
    defaults: dict = {}
    sync_batchnorm: bool = False  # convert BatchNorm to synchronised batch norm under DDP

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = dict(cfg)
        self.step = 0
        self.epoch = 0

    # ---------------------------------------------------------------- hooks used by the trainer
    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """Extra per-step schedules owned by the method (e.g. EMA momentum); indexed by step."""
        return {}

    def set_progress(self, step: int, epoch: int, values: dict[str, float]) -> None:
        self.step, self.epoch = step, epoch

    def after_backward(self) -> None:
        pass

    @torch.no_grad()
    def after_step(self) -> None:
        pass

    def loader_kwargs(self) -> dict:
        return {}

    @torch.no_grad()
    def clip_gradients(self, params: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
        """Clip the gradients of ``params`` (``--clip-grad``); ``total_norm`` is their global L2 norm, already
        computed (and checked finite) by the trainer. Default: scale all by ``max_norm / total_norm`` if > 1."""
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)

    def convert_sync_batchnorm(self) -> int:
        """Replace every batch norm of the method, in place and keeping its parameters and buffers, by its
        synchronised version (the trainer calls this under DDP when ``sync_batchnorm`` is set). Returns the
        number of modules converted."""
        from engine.methods.sync_bn import convert_sync_batchnorm

        return convert_sync_batchnorm(self)

    def encoder(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, batch: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


def backbone_from_cfg(cfg: dict, **overrides):
    """The ViT named by ``cfg["model"]`` with the image/patch size and BEiT options of the config."""
    from engine.models.vit import build_vit

    kw = dict(
        img_size=cfg.get("image_size"), patch_size=cfg.get("patch_size"), drop_path_rate=cfg.get("drop_path"),
        init_values=cfg.get("init_values"), qv_bias=cfg.get("qv_bias"), use_abs_pos_emb=cfg.get("use_abs_pos_emb"),
        use_shared_rel_pos_bias=cfg.get("use_shared_rel_pos_bias"), use_rel_pos_bias=cfg.get("use_rel_pos_bias"),
        global_pool=cfg.get("pool"),
    )
    kw.update(overrides)
    return build_vit(cfg["model"], **kw)
