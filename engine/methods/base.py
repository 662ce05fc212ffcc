"""The contract between the generic training loop and a pre-training method.

A method is an ``nn.Module`` that owns its networks and its loss::

    out = method(batch)          # {"loss": scalar tensor, other scalar metrics...}

and everything else about it is declared by its class, so that a new method is one file (``@register`` it,
:mod:`engine.methods`) and nothing else is edited:

* ``defaults`` (class attribute): its hyper-parameter defaults (above the engine-wide ones, below the YAML
  preset and the command line); ``config.resolve`` merges them, and :attr:`c` is the method's config with
  them filled in (also when a method is built from a partial dict, as tests do);
* ``options`` (class attribute): its own configuration keys, :class:`engine.trainer.config.Option` values
  ``(name, default, type, help, range, choices)``: each is a flag (``--name``) and a YAML key, shown in
  ``--help`` and checked by ``config.resolve``; an option several methods share is declared identically
  (the shared ones are below: :data:`MASK_RATIO`, ...);
* ``data_recipe()``: the :class:`engine.data.DataRecipe` the pre-training loader builds -- the augmentation
  recipe (``recipe``, class attribute: a name of :data:`engine.data.augment.RECIPES`, default the method's
  own name), its options, and ``mask_fn()``, the per-batch mask function (None: no masks).

Hooks into the loop: ``set_progress`` (before the forward: step, epoch, schedule values), ``schedules`` (the
method's per-step schedules), ``after_backward`` (e.g. cancel gradients of a frozen layer), ``after_step``
(e.g. EMA of a teacher). ``encoder()`` returns the backbone evaluated by k-NN / linear probing and exported.

Two hooks follow what each original code base does rather than one engine-wide choice:

* ``clip_gradients(params, max_norm, total_norm)``: gradient clipping (``--clip-grad``). The default clips the
  global norm of all gradients (``torch.nn.utils.clip_grad_norm_``, as BEiT, BEiT v2, SimMIM and SparK do);
  DINO overrides it to clip each parameter's gradient to ``max_norm`` on its own (its ``utils.clip_gradients``).
* ``sync_batchnorm`` (class flag) and ``convert_sync_batchnorm()``: under DDP the trainer converts the
  method's batch norms to synchronised ones before wrapping it (SparK's ``sbn=True``, DINO's
  ``convert_sync_batchnorm`` of student and teacher); see :mod:`engine.methods.sync_bn`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from engine.trainer.config import Option

# options several methods share (declared by each of them, identically)
MASK_RATIO = Option("mask_ratio", None, float, "fraction of masked units", range="(0,1)")
VOCAB_SIZE = Option("vocab_size", None, int, "dvae/vqkd codebook size (8192 in the papers)", range=">=2")
TOKENIZER_WIDTH = Option("tokenizer_width", None, int, "dvae conv width / vqkd decoder width", range=">=1")


class PretrainMethod(nn.Module):
    name: str = ""
    defaults: dict = {}
    options: tuple[Option, ...] = ()
    recipe: str | None = None  # the augmentation recipe of data_recipe() (None: the method's name)
    sync_batchnorm: bool = False  # convert BatchNorm to synchronised batch norm under DDP

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = dict(cfg)
        self.c = {**self.defaults, **{k: v for k, v in cfg.items() if v is not None}}
        self.step = 0
        self.epoch = 0

    # ---------------------------------------------------------------- what the loader builds
    def mask_fn(self) -> Callable[[int, int], dict] | None:
        """The mask function ``(batch_size, seed) -> {key: tensor}`` of the method's batches (None: none); the
        loader calls it per batch with a seed keyed on (seed, epoch, rank, step)."""
        return None

    def data_recipe(self):
        """The :class:`engine.data.DataRecipe` of the method's pre-training loader."""
        from engine.data import DataRecipe

        return DataRecipe(self.recipe or self.name, mask_fn=self.mask_fn())

    def loader_kwargs(self) -> dict:
        """``data_recipe()`` as keywords of ``engine.data.build_pretrain_loader(recipe name, root, **kw)``."""
        return self.data_recipe().loader_kwargs()

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
