"""Projection heads.

DINO head (facebookresearch/dino ``DINOHead``): an MLP ``D -> hidden -> ... -> bottleneck`` (``nlayers``
linear layers, GELU between them, optionally BatchNorm1d after each hidden linear layer: the original's
``--use_bn_in_head``), l2-normalisation, then a weight-normalised linear layer without bias to ``out_dim``
prototypes::

    z = MLP(x);  z = z / ||z||;  logits_k = g_k * <v_k / ||v_k||, z>

With ``norm_last_layer`` the gains ``g`` are fixed to 1 (not trained), so the logits are cosines.

Init as the original: MLP weights normal std 0.02 (DINO's ``trunc_normal_`` cuts at +-2 absolute, i.e. not
at all in practice), zero biases, unit BN; the prototypes ``v`` keep ``nn.Linear``'s default init
(Kaiming-uniform, a = sqrt(5): U(-1/sqrt(bottleneck), 1/sqrt(bottleneck)), row norm ~ 1/sqrt(3) = 0.58) --
DINO builds the last layer after applying its trunc-normal init. (A std-0.02 init gives rows of norm
0.02 sqrt(bottleneck) = 0.32 at 256, which Adam, whose steps do not scale with the weights, rotates
about 2-4 times faster.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """``y = x (g * v / ||v||_row)^T`` without bias; ``g`` frozen at 1 when ``fixed_gain``. ``v`` starts as
    ``nn.Linear(in_features, out_features).weight`` does (``torch.nn.utils.weight_norm`` keeps it)."""

    def __init__(self, in_features: int, out_features: int, fixed_gain: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear.reset_parameters
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fixed_gain)

    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype))


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True, use_bn: bool = False):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                if use_bn:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_gain=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-6)
        return self.last_layer(z)
