"""kernels.patch_timm: timm ViT / DeiT / BEiT attention swapped for kernels.attention, weights kept.

timm cannot be installed on the CPU test machine (it needs torchvision), so the main tests use structural
test doubles written here from the maths of timm's modules: same attribute names, parameter/buffer layout
(persistence included) and forward semantics, both of timm's attention paths (``fused_attn``: SDPA;
otherwise explicit softmax). The last tests run against real timm when it is importable.
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


class VitAttention(nn.Module):
    """timm ``vision_transformer.Attention`` layout."""

    def __init__(self, dim, num_heads, qkv_bias=False, qk_norm=False, scale_norm=False, attn_drop=0.0,
                 fused_attn=False):
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
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            p = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        else:
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype).masked_fill(~attn_mask, float("-inf"))
            x = softmax_attention(q, k, v, self.scale, attn_mask, self.attn_drop)
        x = self.norm(x.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(self.proj(x))


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
@pytest.mark.parametrize("mask_kind", ["float4d", "bool_keypad", "float_per_batch_head"])
def test_vit_attention_with_attn_mask(fused, mask_kind):
    dtype = torch.float64
    attn = VitAttention(12, 3, qkv_bias=True, fused_attn=fused).to(dtype)
    holder = nn.Module()
    holder.attn = copy.deepcopy(attn)
    patch_timm(holder)
    B, N = 2, 5
    x = torch.randn(B, N, 12, dtype=dtype, requires_grad=True)
    if mask_kind == "float4d":
        mask = torch.randn(B, 1, N, N, dtype=dtype)
    elif mask_kind == "float_per_batch_head":
        mask = torch.randn(B, 3, N, N, dtype=dtype)
    else:
        mask = torch.ones(B, 1, 1, N, dtype=torch.bool)
        mask[0, ..., -2:] = False  # key padding
    ref = attn(x, attn_mask=mask)
    out = holder.attn(x, attn_mask=mask)
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
# real timm (when importable)


def _timm():
    return pytest.importorskip("timm")


@pytest.mark.parametrize("name,kwargs", [
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}),
    ("deit_tiny_distilled_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}),
    ("beit_base_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}),
    ("beit_base_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3,
                                   "use_rel_pos_bias": False, "use_shared_rel_pos_bias": True}),
])
def test_real_timm_models(name, kwargs):
    timm = _timm()
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).double().eval()
    with torch.no_grad():  # random rel-pos tables and q/v biases so they matter
        for n, p in model.named_parameters():
            if "relative_position_bias_table" in n or n.endswith(("q_bias", "v_bias")):
                p.normal_(0, 0.3)
    patched, report = _patched_copy(model)
    depth = kwargs["depth"]
    assert sum(v in ("KernelAttention", "KernelBeitAttention") for v in report.replaced.values()) == depth
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _check_same_model(model, patched, torch.float64, x)
    assert math.isfinite(patched(x).sum().item())
