"""Multi-head self-attention (BEiT / DINO ViT block) on top of :func:`kernels.attention`.

``y = proj(attention(q, k, v, bias=rel_pos_bias))`` with ``q, k, v`` split from one ``qkv`` Linear.
The q/k/v views of the qkv output are passed to the kernel without copies (it takes any strides) and
the kernel's output layout makes the head merge a free view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attn.attention import attention
from kernels.attn.reference import attention_probabilities, attention_reference


class MultiheadSelfAttention(nn.Module):
    """Self-attention over tokens ``x`` [B, N, C] with an optional additive bias.

    Args:
        dim: embedding width C.
        num_heads: H; head dim d = C // H.
        qkv_bias: biases on q, k and v (timm / DINO ViT).
        qv_bias: learnable q and v biases with a fixed zero k bias (BEiT); exclusive with ``qkv_bias``.
        attn_drop: dropout on the attention probabilities. The fused kernel has no dropout, so while
            training with ``attn_drop > 0`` the reference math path runs (BEiT and DINO use 0).
        proj_drop: dropout after the output projection.
        scale: multiplier of q k^T, default d ** -0.5.

    ``forward(x, rel_pos_bias=None, return_attention=False)``: ``rel_pos_bias`` is [H, N, N] or
    [B, H, N, N]; returns [B, N, C], or ``(y, attn)`` with ``attn`` [B, H, N, N] the probabilities
    computed by the reference math (for attention maps, e.g. DINO's last-layer self-attention).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, scale: float | None = None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if qkv_bias and qv_bias:
            raise ValueError("qkv_bias and qv_bias are exclusive: choose all three biases or BEiT's q/v biases")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5 if scale is None else float(scale)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if qv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.attn_drop = float(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor):
        bias = self.qkv.bias
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        B, N, _ = x.shape
        # [B, N, 3, H, d] -> 3 x [B, H, N, d] strided views (no copy)
        return qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, rel_pos_bias: torch.Tensor | None = None, return_attention: bool = False):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, N, {self.dim}], got {tuple(x.shape)}")
        w = self.qkv.weight
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.device != w.device:
            raise ValueError(f"x is on {x.device} but the module's parameters are on {w.device}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x has dtype {x.dtype} but the module's parameters are {w.dtype}: cast one to the other "
                "(module.to(dtype)) or run under torch.autocast"
            )
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        if rel_pos_bias is not None and rel_pos_bias.dtype != q.dtype and rel_pos_bias.dtype != torch.float32:
            rel_pos_bias = rel_pos_bias.to(q.dtype)
        attn = None
        if return_attention:
            attn = attention_probabilities(q, k, rel_pos_bias, self.scale)
            p = F.dropout(attn, self.attn_drop, self.training) if self.attn_drop > 0 else attn
            out = torch.matmul(p.to(v.dtype), v)
        elif self.attn_drop > 0 and self.training:
            out = attention_reference(q, k, v, rel_pos_bias, self.scale, dropout_p=self.attn_drop, training=True)
        else:
            out = attention(q, k, v, bias=rel_pos_bias, scale=self.scale)
        y = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
        return (y, attn) if return_attention else y

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, qv_bias={self.q_bias is not None}, "
                f"attn_drop={self.attn_drop}")
