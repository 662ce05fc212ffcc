"""kernels.patch_timm: timm ViT / DeiT / BEiT / EVA attention swapped for kernels.attention, weights kept.

timm cannot be installed next to the main environment's CPU torch 2.13 (it needs torchvision), so the main
tests use structural test doubles written here from the maths of timm's modules: same attribute names,
parameter/buffer layout (persistence included) and forward semantics, both of timm's attention paths
(``fused_attn``: SDPA; otherwise explicit softmax). The tests marked ``timm`` (the last section) run against
real timm models; ``.ci/compat.sh`` runs them in a venv with torch 2.14.1 + torchvision + timm.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import nn

import kernels
from kernels.patch import KernelAttention, KernelRelativePositionBias, patch_timm

# ----------------------------------------------------------------------------------------------------------
# test doubles (timm attribute layout, written from the maths)


def rel_index_with_cls(wh, ww):
    """[N+1, N+1] rows of a ((2wh-1)(2ww-1) + 3, H) table; cls->token, token->cls, cls->cls use the last 3."""
    coords = [(i, j) for i in range(wh) for j in range(ww)]
    n = len(coords)
    rows = (2 * wh - 1) * (2 * ww - 1) + 3
    index = torch.empty(n + 1, n + 1, dtype=torch.long)
    for a, (ya, xa) in enumerate(coords):
        for b, (yb, xb) in enumerate(coords):
            index[a + 1, b + 1] = (ya - yb + wh - 1) * (2 * ww - 1) + (xa - xb + ww - 1)
    index[0, :], index[:, 0], index[0, 0] = rows - 3, rows - 2, rows - 1
    return index


def softmax_attention(q, k, v, scale, bias=None, drop=None):
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    attn = attn.softmax(dim=-1)
    if drop is not None:
        attn = drop(attn)
    return attn @ v


def additive_mask(attn_mask, n, dtype, is_causal=False):
    """SDPA's mask semantics as an additive bias (bool: True = may attend; is_causal: lower triangle)."""
    if is_causal:
        above = torch.ones(n, n, dtype=torch.bool).triu(1)
        return torch.zeros(n, n, dtype=dtype).masked_fill(above, float("-inf"))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=dtype).masked_fill(~attn_mask, float("-inf"))
    return attn_mask


class VitAttention(nn.Module):
    """timm ``layers.attention.Attention`` layout (timm 1.0: ``is_causal``, the optional output ``gate``)."""

    def __init__(self, dim, num_heads, qkv_bias=False, qk_norm=False, scale_norm=False, attn_drop=0.0,
                 fused_attn=False, gated=False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.LayerNorm(dim) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, dim, bias=qkv_bias) if gated else None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            p = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal)
        else:
            bias = additive_mask(attn_mask, N, q.dtype, is_causal)
            x = softmax_attention(q, k, v, self.scale, bias, self.attn_drop)
        x = self.norm(x.transpose(1, 2).reshape(B, N, C))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class LegacyVitAttention(VitAttention):
    """timm < 1.0's signature ``forward(x, attn_mask=None)`` (no ``is_causal``)."""

    def forward(self, x, attn_mask=None):
        return super().forward(x, attn_mask=attn_mask)


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VitBlock(nn.Module):
    def __init__(self, dim, heads, **attn_kw):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), VitAttention(dim, heads, **attn_kw)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim)

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask)
        return x + self.mlp(self.norm2(x))


class TinyVit(nn.Module):
    """vit_tiny-like: conv patch embed, cls (+ optional DeiT distillation) token, abs pos embed, blocks, head."""

    def __init__(self, img=12, patch=4, dim=12, depth=2, heads=3, distilled=False, classes=5, **attn_kw):
        super().__init__()
        n = (img // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.dist_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if distilled else None
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1 + distilled, dim) * 0.02)
        self.blocks = nn.Sequential(*[VitBlock(dim, heads, **attn_kw) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        extra = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            extra.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat(extra + [x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class BeitAttention(nn.Module):
    """timm ``beit.Attention`` layout: q/v biases with a zero k bias buffer, optional per-block rel-pos table."""

    def __init__(self, dim, num_heads, qkv_bias=True, qkv_bias_separate=False, window_size=None,
                 attn_head_dim=None, fused_attn=False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = attn_head_dim or dim // num_heads
        all_dim = head_dim * num_heads
        self.scale = head_dim**-0.5
        self.fused_attn, self.qkv_bias_separate = fused_attn, qkv_bias_separate
        self.qkv = nn.Linear(dim, all_dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.randn(all_dim) * 0.1)
            self.register_buffer("k_bias", torch.zeros(all_dim), persistent=False)
            self.v_bias = nn.Parameter(torch.randn(all_dim) * 0.1)
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        if window_size:
            self.window_size = window_size
            rows = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3
            self.relative_position_bias_table = nn.Parameter(torch.randn(rows, num_heads) * 0.3)
            self.register_buffer("relative_position_index", rel_index_with_cls(*window_size), persistent=False)
        else:
            self.window_size = self.relative_position_bias_table = self.relative_position_index = None
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(all_dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def _get_rel_pos_bias(self):
        n = self.window_size[0] * self.window_size[1] + 1
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x, shared_rel_pos_bias=None):
        B, N, _ = x.shape
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            if self.qkv_bias_separate:
                qkv = self.qkv(x) + qkv_bias
            else:
                qkv = F.linear(x, self.qkv.weight, qkv_bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = None
        if self.relative_position_bias_table is not None:
            bias = self._get_rel_pos_bias()
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            x = softmax_attention(q, k, v, self.scale, bias, self.attn_drop)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


class BeitRelPosBias(nn.Module):
    """timm ``beit.RelativePositionBias`` (the shared variant): ``forward() -> [H, N, N]``."""

    def __init__(self, window_size, num_heads):
        super().__init__()
        self.window_size = window_size
        rows = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.randn(rows, num_heads) * 0.3)
        self.register_buffer("relative_position_index", rel_index_with_cls(*window_size), persistent=False)

    def forward(self):
        n = self.window_size[0] * self.window_size[1] + 1
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()


class BeitBlock(nn.Module):
    def __init__(self, dim, heads, **attn_kw):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), BeitAttention(dim, heads, **attn_kw)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim)
        self.gamma_1 = nn.Parameter(torch.full((dim,), 0.5))
        self.gamma_2 = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x, shared_rel_pos_bias=None):
        x = x + self.gamma_1 * self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class TinyBeit(nn.Module):
    def __init__(self, img=12, patch=4, dim=12, depth=2, heads=3, shared_rel_pos=False, **attn_kw):
        super().__init__()
        grid = (img // patch, img // patch)
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.rel_pos_bias = BeitRelPosBias(grid, heads) if shared_rel_pos else None
        window = None if shared_rel_pos else grid
        self.blocks = nn.ModuleList([BeitBlock(dim, heads, window_size=window, **attn_kw) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        rel = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            x = blk(x, shared_rel_pos_bias=rel)
        return self.head(self.norm(x).mean(1))


def rotate_pairs(x, sin, cos, half):
    """Rotary embedding as complex multiplication: pairs (x_2i, x_2i+1) (interleaved) or (x_i, x_i+d/2)
    (``half``) turned by the angle whose sine/cosine are given per pair [..., d/2]."""
    if half:
        a, b = x.chunk(2, dim=-1)
    else:
        a, b = x[..., 0::2], x[..., 1::2]
    z = torch.complex(a, b) * torch.complex(cos, sin)
    if half:
        return torch.cat([z.real, z.imag], dim=-1)
    return torch.stack([z.real, z.imag], dim=-1).flatten(-2)


def timm_rope(angles, half):
    """timm's ``cat(sin_emb, cos_emb)`` layout of per-pair angles [N, d/2]: interleaved or half-split."""
    rep = (lambda t: torch.cat([t, t], dim=-1)) if half else (lambda t: t.repeat_interleave(2, dim=-1))
    return torch.cat([rep(angles.sin()), rep(angles.cos())], dim=-1)


class RopeAttention(nn.Module):
    """timm ``eva.EvaAttention`` / ``layers.attention.AttentionRope`` layout: fused qkv with q/k/v biases or
    separate q/k/v projections (grouped-query: ``num_kv_heads``), rotary embedding after the prefix tokens."""

    def __init__(self, dim, num_heads, qkv_fused=True, qkv_bias=True, num_kv_heads=None, num_prefix_tokens=1,
                 rotate_half=False, qk_norm=False, scale_norm=False, gated=False, fused_attn=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.scale = self.head_dim**-0.5
        self.num_prefix_tokens, self.rotate_half, self.fused_attn = num_prefix_tokens, rotate_half, fused_attn
        kv_dim = self.head_dim * self.num_kv_heads
        if qkv_fused:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.q_proj = self.k_proj = self.v_proj = None
            if qkv_bias:
                self.q_bias = nn.Parameter(torch.randn(dim) * 0.1)
                self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
                self.v_bias = nn.Parameter(torch.randn(dim) * 0.1)
            else:
                self.q_bias = self.k_bias = self.v_bias = None
        else:
            self.qkv = None
            self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, kv_dim, bias=False)
            self.v_proj = nn.Linear(dim, kv_dim, bias=qkv_bias)
            self.q_bias = self.k_bias = self.v_bias = None
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.norm = nn.LayerNorm(dim) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, dim) if gated else None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = F.linear(x, self.qkv.weight, bias)
            q, k, v = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q_proj(x).reshape(B, N, H, d).transpose(1, 2)
            k = self.k_proj(x).reshape(B, N, Hkv, d).transpose(1, 2)
            v = self.v_proj(x).reshape(B, N, Hkv, d).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            sin, cos = rope.chunk(2, dim=-1)
            pick = (lambda t: t[..., : d // 2]) if self.rotate_half else (lambda t: t[..., ::2])
            sin, cos = pick(sin), pick(cos)
            npt = self.num_prefix_tokens
            q = torch.cat([q[:, :, :npt], rotate_pairs(q[:, :, npt:], sin, cos, self.rotate_half)], dim=2)
            k = torch.cat([k[:, :, :npt], rotate_pairs(k[:, :, npt:], sin, cos, self.rotate_half)], dim=2)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        else:
            x = softmax_attention(q, k, v, self.scale, additive_mask(attn_mask, N, q.dtype, is_causal))
        x = self.norm(x.transpose(1, 2).reshape(B, N, C))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class RopeBlock(nn.Module):
    def __init__(self, dim, heads, **attn_kw):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), RopeAttention(dim, heads, **attn_kw)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim)

    def forward(self, x, rope=None):
        x = x + self.attn(self.norm1(x), rope=rope)
        return x + self.mlp(self.norm2(x))


class TinyEva(nn.Module):
    """EVA-like: ``num_prefix_tokens`` cls/register tokens, a rotary table per patch, mean-pooled head."""

    def __init__(self, img=12, patch=4, dim=12, depth=2, heads=3, num_prefix_tokens=1, rotate_half=False,
                 **attn_kw):
        super().__init__()
        n = (img // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.prefix = nn.Parameter(torch.randn(1, num_prefix_tokens, dim) * 0.02)
        angles = torch.rand(n, dim // heads // 2) * 6.0  # any angles: the rotation is what is tested
        self.register_buffer("rope", timm_rope(angles, rotate_half), persistent=False)
        self.blocks = nn.ModuleList([RopeBlock(dim, heads, num_prefix_tokens=num_prefix_tokens,
                                               rotate_half=rotate_half, **attn_kw) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.prefix.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x, rope=self.rope.to(x.dtype))
        return self.head(self.norm(x).mean(1))


class WindowAttention(nn.Module):
    """Swin-like: forward(x, mask) over windows; must be left alone."""

    def __init__(self, dim=12, num_heads=3):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        return self.proj(x)


class SeparateProjAttention(nn.Module):
    def __init__(self, dim=12):
        super().__init__()
        self.num_heads = 3
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(x)


# ----------------------------------------------------------------------------------------------------------
# helpers


def _run(model, x):
    model.zero_grad()
    out = model(x)
    out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_same_model(original, patched, dtype, x):
    ref, ref_grads = _run(original, x)
    out, grads = _run(patched, x)
    tol = {"atol": 1e-10, "rtol": 1e-9} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 2e-4}
    assert_close(out, ref, name="output", **tol)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert_close(grads[name], g, name=f"grad {name}", **tol)


def _patched_copy(model):
    twin = copy.deepcopy(model)
    sd_before = twin.state_dict()
    params_before = dict(twin.named_parameters())
    report = patch_timm(twin)
    sd_after = twin.state_dict()
    assert list(sd_after) == list(sd_before), "state_dict keys must not change"
    for k in sd_before:
        assert sd_after[k] is sd_before[k] or torch.equal(sd_after[k], sd_before[k]), k
    for n, p in twin.named_parameters():
        assert p is params_before[n], f"parameter {n} must be the same object after patching"
    return twin, report


# ----------------------------------------------------------------------------------------------------------
# ViT / DeiT


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", [
    {"qkv_bias": True},
    {"qkv_bias": True, "fused_attn": True},
    {"qkv_bias": False, "qk_norm": True, "scale_norm": True},
    {"qkv_bias": True, "distilled": True},
    {"qkv_bias": True, "gated": True},
])
def test_vit_like_outputs_and_gradients_match(dtype, variant):
    model = TinyVit(**variant).to(dtype)
    patched, report = _patched_copy(model)
    assert report.replaced == {"blocks.0.attn": "KernelAttention", "blocks.1.attn": "KernelAttention"}
    assert report.left == {}
    assert all(isinstance(b.attn, KernelAttention) for b in patched.blocks)
    x = torch.randn(2, 3, 12, 12, dtype=dtype)
    _check_same_model(model, patched, dtype, x)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind,mask_kind", [
    (kind, mask) for kind in (VitAttention, LegacyVitAttention)
    for mask in ("float4d", "bool_keypad", "float_per_batch_head", "causal")
    if not (kind is LegacyVitAttention and mask == "causal")  # the legacy signature has no is_causal
])
def test_vit_attention_with_attn_mask(fused, mask_kind, kind):
    dtype = torch.float64
    attn = kind(12, 3, qkv_bias=True, fused_attn=fused).to(dtype)
    holder = nn.Module()
    holder.attn = copy.deepcopy(attn)
    report = patch_timm(holder)
    assert report.replaced == {"attn": "KernelAttention"}
    B, N = 2, 5
    x = torch.randn(B, N, 12, dtype=dtype, requires_grad=True)
    kw = {}
    if mask_kind == "float4d":
        kw["attn_mask"] = torch.randn(B, 1, N, N, dtype=dtype)
    elif mask_kind == "float_per_batch_head":
        kw["attn_mask"] = torch.randn(B, 3, N, N, dtype=dtype)
    elif mask_kind == "causal":
        kw["is_causal"] = True
    else:
        mask = torch.ones(B, 1, 1, N, dtype=torch.bool)
        mask[0, ..., -2:] = False  # key padding
        kw["attn_mask"] = mask
    ref = attn(x, **kw)
    out = holder.attn(x, **kw)
    assert_close(out, ref, atol=1e-10, rtol=1e-9, name="out")
    g = torch.randn_like(out)
    assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0], atol=1e-10, rtol=1e-9,
                 name="dx")


def test_attn_dropout_in_training_matches_timm_math_path():
    model = TinyVit(qkv_bias=True, attn_drop=0.3).double().train()
    patched, _ = _patched_copy(model)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    torch.manual_seed(5)
    ref, ref_grads = _run(model, x)
    torch.manual_seed(5)
    out, grads = _run(patched, x)
    assert_close(out, ref, atol=1e-10, rtol=1e-9, name="output with dropout")
    for n, g in ref_grads.items():
        assert_close(grads[n], g, atol=1e-10, rtol=1e-9, name=n)
    model.eval(), patched.eval()
    assert_close(patched(x), model(x), atol=1e-10, rtol=1e-9, name="eval output")


# ----------------------------------------------------------------------------------------------------------
# BEiT


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", [
    {},
    {"fused_attn": True},
    {"qkv_bias_separate": True},
    {"attn_head_dim": 5},
    {"qkv_bias": False},
    {"shared_rel_pos": True},
    {"shared_rel_pos": True, "fused_attn": True},
])
def test_beit_like_outputs_and_gradients_match(dtype, variant):
    model = TinyBeit(**variant).to(dtype)
    patched, report = _patched_copy(model)
    expected = {"blocks.0.attn": "KernelBeitAttention", "blocks.1.attn": "KernelBeitAttention"}
    if variant.get("shared_rel_pos"):
        expected["rel_pos_bias"] = "KernelRelativePositionBias"
        assert isinstance(patched.rel_pos_bias, KernelRelativePositionBias)
    assert report.replaced == expected and report.left == {}
    x = torch.randn(2, 3, 12, 12, dtype=dtype)
    _check_same_model(model, patched, dtype, x)
    # the rel-pos table really matters: a different table changes the output
    with torch.no_grad():
        table = (patched.rel_pos_bias if variant.get("shared_rel_pos") else patched.blocks[0].attn)
        if table is not None and getattr(table, "relative_position_bias_table", None) is not None:
            before = patched(x)
            table.relative_position_bias_table.add_(torch.randn_like(table.relative_position_bias_table))
            assert not torch.allclose(patched(x), before)


def test_shared_rel_pos_bias_module_alone():
    rpb = BeitRelPosBias((3, 4), 2).double()
    holder = nn.Module()
    holder.rel_pos_bias = copy.deepcopy(rpb)
    report = patch_timm(holder)
    assert report.replaced == {"rel_pos_bias": "KernelRelativePositionBias"}
    out, ref = holder.rel_pos_bias(), rpb()
    assert out.shape == (2, 13, 13) and torch.equal(out, ref)
    g = torch.randn_like(out)
    (ga,) = torch.autograd.grad(out, holder.rel_pos_bias.relative_position_bias_table, g)
    (gr,) = torch.autograd.grad(ref, rpb.relative_position_bias_table, g)
    assert_close(ga, gr, atol=1e-12, rtol=1e-12, name="table grad")


# ----------------------------------------------------------------------------------------------------------
# EVA / rotary


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", [
    {},
    {"fused_attn": True},
    {"rotate_half": True},
    {"num_prefix_tokens": 0},
    {"num_prefix_tokens": 2, "qk_norm": True, "scale_norm": True},
    {"qkv_fused": False},
    {"qkv_fused": False, "heads": 4, "num_kv_heads": 2, "fused_attn": True},
    {"qkv_fused": False, "heads": 4, "num_kv_heads": 1, "gated": True},
    {"qkv_bias": False},
])
def test_rope_like_outputs_and_gradients_match(dtype, variant):
    variant = dict(variant)
    model = TinyEva(dim=16, heads=variant.pop("heads", 2), **variant).to(dtype)
    patched, report = _patched_copy(model)
    assert report.replaced == {"blocks.0.attn": "KernelRopeAttention", "blocks.1.attn": "KernelRopeAttention"}
    assert report.left == {}
    x = torch.randn(2, 3, 12, 12, dtype=dtype)
    _check_same_model(model, patched, dtype, x)
    with torch.no_grad():  # the rotary table really matters
        before = patched(x)
        angles = torch.rand(9, patched.rope.shape[-1] // 4) * 6.0
        patched.rope.copy_(timm_rope(angles, variant.get("rotate_half", False)))
        assert not torch.allclose(patched(x), before)


@pytest.mark.parametrize("kw", [{"rope": True}, {"rope": True, "is_causal": True}, {"attn_mask": True}])
def test_rope_attention_call_arguments(kw):
    attn = RopeAttention(16, 2, num_prefix_tokens=1).double()
    holder = nn.Module()
    holder.attn = copy.deepcopy(attn)
    patch_timm(holder)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    args = {}
    if kw.get("rope"):
        args["rope"] = timm_rope(torch.rand(4, 4) * 6.0, False).double()
    if kw.get("is_causal"):
        args["is_causal"] = True
    if kw.get("attn_mask"):
        args["attn_mask"] = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    assert_close(holder.attn(x, **args), attn(x, **args), atol=1e-10, rtol=1e-9, name="out")


def test_rope_modules_that_do_not_fit_are_left():
    odd = RopeAttention(12, 2)  # head_dim 6 is fine; an odd head dim cannot be rotated in pairs
    odd.num_prefix_tokens = None
    gqa_bad = RopeAttention(16, 4, qkv_fused=False, num_kv_heads=2)
    gqa_bad.num_kv_heads = 3
    holder = nn.Module()
    holder.a, holder.b = odd, gqa_bad
    report = patch_timm(holder)
    assert report.replaced == {}
    assert "num_prefix_tokens" in report.left["a"] and "num_kv_heads" in report.left["b"]


# ----------------------------------------------------------------------------------------------------------
# the report, idempotence, errors, compile


def test_report_lists_modules_left_alone_with_reasons():
    model = nn.Module()
    model.vit = TinyVit(depth=1)
    model.window = WindowAttention()
    model.separate = SeparateProjAttention()
    model.mha = nn.MultiheadAttention(12, 3)
    report = patch_timm(model)
    assert report.replaced == {"vit.blocks.0.attn": "KernelAttention"}
    assert set(report.left) == {"window", "separate", "mha"}
    assert "signature" in report.left["window"]
    assert "qkv" in report.left["separate"]
    assert "signature" in report.left["mha"]
    text = str(report)
    assert "replaced vit.blocks.0.attn" in text and "left     window" in text
    again = patch_timm(model)
    assert again.replaced == {} and set(again.left) == {"window", "separate", "mha"}
    assert isinstance(model.vit.blocks[0].attn, KernelAttention)


def test_forward_hooks_survive_and_our_own_modules_are_skipped():
    model = TinyVit(depth=1)
    seen = []
    handle = model.blocks[0].attn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model.ours = kernels.MultiheadSelfAttention(12, 3)
    model.ours_bias = kernels.RelativePositionBias((2, 2), 3)
    report = patch_timm(model)
    assert report.replaced == {"blocks.0.attn": "KernelAttention"} and report.left == {}
    model(torch.randn(1, 3, 12, 12))
    assert seen == [(1, 10, 12)]
    handle.remove()
    model(torch.randn(1, 3, 12, 12))
    assert len(seen) == 1


def test_unknown_members_are_left():
    attn = VitAttention(12, 3)
    attn.extra = nn.Linear(12, 12)  # a submodule whose role in forward is unknown
    holder = nn.Module()
    holder.attn = attn
    report = patch_timm(holder)
    assert report.replaced == {} and "extra" in report.left["attn"]
    assert holder.attn is attn


def test_bad_input():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        patch_timm("vit_base_patch16_224")


def test_patched_model_compiles_fullgraph():
    model = TinyBeit(shared_rel_pos=True)
    patched, _ = _patched_copy(model)
    x = torch.randn(2, 3, 12, 12)
    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), model(x), atol=2e-5, rtol=2e-4, name="compiled output")
    torch._dynamo.reset()


def test_patched_attention_uses_the_kernel(monkeypatch):
    calls = []
    real = kernels.patch.attention

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(kernels.patch, "attention", spy)
    patched, _ = _patched_copy(TinyBeit())
    patched(torch.randn(2, 3, 12, 12))
    assert len(calls) == 2 and calls[0] == (2, 3, 10, 4)


# ----------------------------------------------------------------------------------------------------------
# real timm (marked `timm`: .ci/compat.sh runs them in its venv; skipped where timm is not importable)

_VIT = {"img_size": 32, "patch_size": 8, "depth": 2}
_SMALL = {"depth": 2, "embed_dim": 48, "num_heads": 3}
REAL_TIMM = [  # (timm name, kwargs, what the patch becomes)
    ("vit_tiny_patch16_224", _VIT, "KernelAttention"),
    ("vit_tiny_patch16_224", {**_VIT, "qk_norm": True, "qkv_bias": False}, "KernelAttention"),
    ("deit_tiny_distilled_patch16_224", _VIT, "KernelAttention"),
    ("beit_base_patch16_224", {**_VIT, **_SMALL}, "KernelBeitAttention"),
    ("beit_base_patch16_224", {**_VIT, **_SMALL, "use_rel_pos_bias": False, "use_shared_rel_pos_bias": True},
     "KernelBeitAttention"),
    ("beitv2_base_patch16_224", {**_VIT, **_SMALL}, "KernelBeitAttention"),
    ("eva_giant_patch14_224", {"img_size": 56, **_SMALL, "mlp_ratio": 4.0}, "KernelRopeAttention"),  # EVA-01
    ("eva02_tiny_patch14_224", {"img_size": 56, **_SMALL}, "KernelRopeAttention"),  # rope, SwiGLU, fused qkv
    ("eva02_tiny_patch14_224", {"img_size": 56, **_SMALL, "qkv_fused": False}, "KernelRopeAttention"),
    ("eva02_tiny_patch14_224", {"img_size": 56, **_SMALL, "rope_rotate_half": True}, "KernelRopeAttention"),
    ("vit_medium_patch16_rope_reg1_gap_256", {"img_size": 64, **_SMALL}, "KernelRopeAttention"),  # + register
    ("vit_medium_patch16_rope_reg1_gap_256",  # AttentionRope with grouped-query attention
     {"img_size": 64, "depth": 2, "embed_dim": 64, "num_heads": 4, "attn_type": "rope", "qkv_fused": False,
      "num_kv_heads": 2}, "KernelRopeAttention"),
    ("vit_small_patch16_rope_mixed_224", {"img_size": 64, **_SMALL}, "KernelRopeAttention"),  # per-depth rope
]


def _timm():
    return pytest.importorskip("timm")


def _real(name, kwargs, dtype=torch.float64, fused=None):
    timm = _timm()
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).to(dtype).eval()
    with torch.no_grad():  # random rel-pos tables, biases and layer scales so that they matter
        gen = torch.Generator().manual_seed(3)
        for n, p in model.named_parameters():
            scale = 0.3 if "relative_position_bias_table" in n or n.endswith(("q_bias", "v_bias")) else 0.05
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    if fused is not None:
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = fused
    return model


@pytest.mark.timm
@pytest.mark.parametrize("fused", [False, True], ids=["math", "sdpa"])
@pytest.mark.parametrize("name,kwargs,kind", REAL_TIMM,
                         ids=[f"{i}-{n}" for i, (n, _, _) in enumerate(REAL_TIMM)])
def test_real_timm_models(name, kwargs, kind, fused, monkeypatch):
    model = _real(name, kwargs, fused=fused)
    patched, report = _patched_copy(model)
    depth = kwargs["depth"]
    assert list(report.replaced.values()).count(kind) == depth, str(report)
    assert report.left == {}, str(report)
    calls = []
    real = kernels.patch.attention
    monkeypatch.setattr(kernels.patch, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    size = kwargs["img_size"]
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    _check_same_model(model, patched, torch.float64, x)
    assert len(calls) == depth, "the patched model must run kernels.attention in every block"
    assert math.isfinite(patched(x).sum().item())


@pytest.mark.timm
@pytest.mark.parametrize("index", [0, 3, 7, 11])
def test_real_timm_float32(index):
    name, kwargs, _ = REAL_TIMM[index]
    model = _real(name, kwargs, dtype=torch.float32)
    patched, _ = _patched_copy(model)
    size = kwargs["img_size"]
    _check_same_model(model, patched, torch.float32, torch.randn(2, 3, size, size))


@pytest.mark.timm
@pytest.mark.parametrize("fused", [False, True], ids=["math", "sdpa"])
@pytest.mark.parametrize("call", ["attn_mask", "bool_mask", "is_causal"])
def test_real_timm_attention_arguments(call, fused):
    timm = _timm()
    from timm.layers import Attention

    attn = Attention(16, num_heads=2, qkv_bias=True).double()
    attn.fused_attn = fused
    holder = nn.Module()
    holder.attn = copy.deepcopy(attn)
    assert patch_timm(holder).replaced == {"attn": "KernelAttention"}
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    if call == "attn_mask":
        kw = {"attn_mask": torch.randn(2, 1, 6, 6, dtype=torch.float64)}
    elif call == "bool_mask":
        mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
        mask[1, ..., -3:] = False
        kw = {"attn_mask": mask}
    else:
        kw = {"is_causal": True}
    assert_close(holder.attn(x, **kw), attn(x, **kw), atol=1e-10, rtol=1e-9, name=f"{call} out")
    assert timm.__version__
