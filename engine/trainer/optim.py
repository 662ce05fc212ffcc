"""Optimisers (AdamW, LAMB, SGD) over parameter groups with weight decay only on weight matrices.

Biases, normalisation weights (every parameter with ndim <= 1), position tables, class/mask tokens and
relative-position tables get no weight decay. Groups carry ``apply_wd`` so the loop can write the scheduled
decay into the right groups each step.
"""

from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS = ("adamw", "lamb", "sgd")
NO_DECAY_NAMES = ("pos_embed", "absolute_pos_embed", "cls_token", "mask_token", "relative_position_bias_table",
                  "gamma", "ls1", "ls2")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    leaf = name.split(".")
    return param.ndim <= 1 or name.endswith(".bias") or any(n in leaf or any(p.startswith(n) for p in leaf)
                                                            for n in NO_DECAY_NAMES)


def param_groups(module: nn.Module) -> list[dict]:
    decay, no_decay, names_d, names_n = [], [], [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if no_weight_decay(name, p):
            no_decay.append(p)
            names_n.append(name)
        else:
            decay.append(p)
            names_d.append(name)
    groups = []
    if decay:
        groups.append({"params": decay, "apply_wd": True, "weight_decay": 0.0, "names": names_d})
    if no_decay:
        groups.append({"params": no_decay, "apply_wd": False, "weight_decay": 0.0, "names": names_n})
    return groups


def build_optimizer(module: nn.Module, name: str = "adamw", betas=(0.9, 0.999), lr: float = 1e-3,
                    groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """The optimizer over ``groups`` (default: :func:`param_groups` of ``module``); a group's ``lr_scale``
    multiplies the scheduled lr, ``apply_wd`` says whether the scheduled weight decay applies."""
    groups = param_groups(module) if groups is None else groups
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    if name == "lamb":
        from engine.trainer.lamb import Lamb

        return Lamb(groups, lr=lr, betas=tuple(betas))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    raise ValueError(f"optimizer: unknown {name!r}, expected one of {OPTIMIZERS}")
