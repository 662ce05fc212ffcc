"""Projection heads.

DINO head: 3-layer MLP (GELU, no BN) ``D -> hidden -> hidden -> bottleneck``, l2-normalisation, then a
weight-normalised linear layer without bias to ``out_dim`` prototypes::

    z = MLP(x);  z = z / ||z||;  logits_k = g_k * <v_k / ||v_k||, z>

With ``norm_last_layer`` the gains ``g`` are fixed to 1 (not trained), so the logits are cosines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """``y = x (g * v / ||v||_row)^T`` without bias; ``g`` frozen at 1 when ``fixed_gain``."""

    def __init__(self, in_features: int, out_features: int, fixed_gain: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight_v, std=0.02, a=-0.04, b=0.04)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fixed_gain)

    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype))


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_gain=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-6)
        return self.last_layer(z)
