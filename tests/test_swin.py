"""engine.models.swin (Swin-T/S/B/L, swin_pico) and engine.methods.simmim_swin (SimMIM on Swin).

timm cannot be installed on the CPU test machine, so the layout is checked against a hand-written list of timm's
SwinTransformer keys and shapes, and the forward against ``OfficialSwin``: an eager test double written here from
the maths of the official microsoft/SimMIM ``SwinTransformer`` (token layout [B, L, C], the x0..x3 slices of its
PatchMerging, its slice-built shift mask, ``attn + bias`` then ``attn.view(B, nW, H, N, N) + mask``), with timm's
parameter names. The real timm is used by the ``timm``-marked test (.ci/compat.sh).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, losses_on_fixed_batch
from torch import nn

import kernels
from engine.methods.simmim_swin import SwinSimMIM, build_swin_simmim, is_swin_cfg, masked_l1_loss
from engine.models import SWIN_CONFIGS, build_swin, is_swin, swin_model_names
from engine.models.swin import WindowAttention, shifted_window_mask

interpreter = pytest.mark.interpreter


# ------------------------------------------------------------------------------------------------------------
# timm's parameter layout, written by hand


def timm_swin_keys(depths, num_classes=0):
    """The state_dict keys of timm's SwinTransformer (num_classes=0 has no head parameters)."""
    keys = ["patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias"]
    for i, depth in enumerate(depths):
        if i > 0:
            keys += [f"layers.{i}.downsample.norm.weight", f"layers.{i}.downsample.norm.bias",
                     f"layers.{i}.downsample.reduction.weight"]
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            keys += [p + "norm1.weight", p + "norm1.bias", p + "attn.relative_position_bias_table",
                     p + "attn.qkv.weight", p + "attn.qkv.bias", p + "attn.proj.weight", p + "attn.proj.bias",
                     p + "norm2.weight", p + "norm2.bias", p + "mlp.fc1.weight", p + "mlp.fc1.bias",
                     p + "mlp.fc2.weight", p + "mlp.fc2.bias"]
    keys += ["norm.weight", "norm.bias"]
    if num_classes:
        keys += ["head.fc.weight", "head.fc.bias"]
    return keys


TIMM_TINY_HEAD = [  # the first and last keys of timm.create_model("swin_tiny_patch4_window7_224").state_dict()
    "patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias",
    "layers.0.blocks.0.norm1.weight", "layers.0.blocks.0.norm1.bias",
    "layers.0.blocks.0.attn.relative_position_bias_table", "layers.0.blocks.0.attn.qkv.weight",
    "layers.0.blocks.0.attn.qkv.bias", "layers.0.blocks.0.attn.proj.weight", "layers.0.blocks.0.attn.proj.bias",
    "layers.0.blocks.0.norm2.weight", "layers.0.blocks.0.norm2.bias", "layers.0.blocks.0.mlp.fc1.weight",
    "layers.0.blocks.0.mlp.fc1.bias", "layers.0.blocks.0.mlp.fc2.weight", "layers.0.blocks.0.mlp.fc2.bias",
]
TIMM_TINY_TAIL = ["layers.3.blocks.1.mlp.fc2.weight", "layers.3.blocks.1.mlp.fc2.bias", "norm.weight", "norm.bias",
                  "head.fc.weight", "head.fc.bias"]


def meta(name, **kw):
    """A full-size model on the meta device: its layout without the cost of initialising 28-200M weights."""
    with torch.device("meta"):
        return build_swin(name, **kw)


def test_state_dict_names_and_shapes_are_timms():
    m = meta("swin_tiny", num_classes=1000)
    sd = m.state_dict()
    assert list(sd) == timm_swin_keys((2, 2, 6, 2), num_classes=1000)
    assert list(sd)[:len(TIMM_TINY_HEAD)] == TIMM_TINY_HEAD and list(sd)[-len(TIMM_TINY_TAIL):] == TIMM_TINY_TAIL
    shapes = {
        "patch_embed.proj.weight": (96, 3, 4, 4),
        "layers.0.blocks.0.attn.relative_position_bias_table": (169, 3),
        "layers.0.blocks.0.attn.qkv.weight": (288, 96),
        "layers.1.downsample.norm.weight": (384,),
        "layers.1.downsample.reduction.weight": (192, 384),
        "layers.3.downsample.reduction.weight": (768, 1536),
        "layers.3.blocks.1.attn.relative_position_bias_table": (169, 24),
        "layers.2.blocks.5.mlp.fc1.weight": (1536, 384),
        "norm.weight": (768,),
        "head.fc.weight": (1000, 768),
    }
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    # no buffers in the state dict (timm's index and mask buffers are non-persistent); the SimMIM token is extra
    enc = meta("swin_base", img_size=192, window_size=6, use_mask_token=True)
    keys = [k for k in enc.state_dict() if k != "mask_token"]
    assert keys == timm_swin_keys((2, 2, 18, 2)) and "mask_token" in enc.state_dict()
    assert enc.state_dict()["layers.0.blocks.0.attn.relative_position_bias_table"].shape == (121, 4)  # (2*6-1)^2


def test_timm_spec():
    enc = meta("swin_base", img_size=192, window_size=6, use_mask_token=True)
    spec = enc.timm_spec()
    assert spec["name"] == "swin_base_patch4_window7_224"
    assert spec["kwargs"] == dict(img_size=192, patch_size=4, in_chans=3, window_size=6, embed_dim=128,
                                  depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), mlp_ratio=4.0, qkv_bias=True,
                                  num_classes=0)
    assert spec["drop"] == ["mask_token"]
    assert meta("swin_tiny").timm_spec()["name"] == "swin_tiny_patch4_window7_224"
    assert meta("swin_small").timm_spec()["name"] == "swin_small_patch4_window7_224"
    assert meta("swin_large").timm_spec()["name"] == "swin_large_patch4_window7_224"
    pico = build_swin("swin_pico").timm_spec()
    assert pico["name"] == "swin_tiny_patch4_window7_224" and pico["kwargs"]["embed_dim"] == 32  # overrides all
    assert pico["drop"] == []
    with pytest.raises(ValueError, match="no absolute position embedding"):
        build_swin("swin_pico", ape=True).timm_spec()


@pytest.mark.timm
def test_state_dict_loads_into_real_timm_strict():
    timm = pytest.importorskip("timm")
    for name, over in (("swin_pico", {}), ("swin_tiny", dict(img_size=192, window_size=6))):
        enc = build_swin(name, use_mask_token=True, drop_path_rate=0.0, **over).eval()
        spec = enc.timm_spec()
        ref = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"]).eval()
        sd = {k: v for k, v in enc.state_dict().items() if k not in spec["drop"]}
        ref.load_state_dict(sd, strict=True)
        x = torch.randn(2, 3, enc.config["img_size"], enc.config["img_size"])
        with torch.no_grad():
            assert_close(enc.forward_features(x), ref.forward_features(x), atol=1e-4, rtol=1e-4, name=name)
            assert_close(enc(x), ref(x), atol=1e-4, rtol=1e-4, name=f"{name} pooled")


# ------------------------------------------------------------------------------------------------------------
# an eager double of the official SwinTransformer (written from its maths), timm's names


def _official_rel_index(wh, ww):
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    return rel.sum(-1)


def _official_mask(H, W, ws, shift):
    img = torch.zeros(1, H, W, 1)
    cnt = 0
    for h in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for w in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, h, w, :] = cnt
            cnt += 1
    win = img.view(1, H // ws, ws, W // ws, ws, 1).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws * ws)
    m = win.unsqueeze(1) - win.unsqueeze(2)
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


class _Attn(nn.Module):
    def __init__(self, dim, heads, ws):
        super().__init__()
        self.heads, self.ws = heads, ws
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        self.register_buffer("relative_position_index", _official_rel_index(ws, ws), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (C // self.heads) ** -0.5, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, N, N)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(B_, N, C))


class _Block(nn.Module):
    def __init__(self, dim, res, heads, ws, shift):
        super().__init__()
        if min(res) <= ws:
            ws, shift = min(res), 0
        self.res, self.ws, self.shift = res, ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attn(dim, heads, ws)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.register_buffer("attn_mask", _official_mask(*res, ws, shift) if shift else None, persistent=False)

    def forward(self, x):  # [B, L, C] as the official block
        H, W = self.res
        B, L, C = x.shape
        h = self.norm1(x).view(B, H, W, C)
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
        ws = self.ws
        win = h.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws * ws, C)
        win = self.attn(win, self.attn_mask).view(-1, ws, ws, C)
        h = win.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, C)
        if self.shift:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + h.view(B, L, C)
        return x + self.mlp(self.norm2(x))


class _Merge(nn.Module):
    def __init__(self, res, dim):
        super().__init__()
        self.res = res
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        H, W = self.res
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class OfficialSwin(nn.Module):
    """Official SimMIM Swin maths, with timm's names (downsample at the start of stages 1..3)."""

    def __init__(self, img_size, patch_size, embed_dim, depths, num_heads, window_size):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        g = img_size // patch_size
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            stage = nn.Module()
            dim, res = embed_dim * 2 ** i, (g // 2 ** i, g // 2 ** i)
            stage.downsample = _Merge((res[0] * 2, res[1] * 2), dim // 2) if i > 0 else None
            stage.blocks = nn.ModuleList([_Block(dim, res, heads, window_size, 0 if j % 2 == 0 else window_size // 2)
                                          for j in range(depth)])
            self.layers.append(stage)
        self.norm = nn.LayerNorm(embed_dim * 2 ** (len(depths) - 1))

    def forward(self, x, mask=None):
        x = self.patch_embed.norm(self.patch_embed.proj(x).flatten(2).transpose(1, 2))
        if mask is not None:  # SwinTransformerForSimMIM
            w = mask.flatten(1).unsqueeze(-1).type_as(x)
            x = x * (1.0 - w) + self.mask_token.expand_as(x) * w
        for stage in self.layers:
            if stage.downsample is not None:
                x = stage.downsample(x)
            for blk in stage.blocks:
                x = blk(x)
        return self.norm(x)  # [B, L, C]


def _randomise(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_(0, 0.5 if "relative_position" in n or "mask_token" in n else 0.1)


@pytest.mark.parametrize("name,img,ws", [("swin_pico", 32, 4), ("swin_pico", 48, 3), ("swin_pico", 16, 4)])
def test_forward_matches_official_swin_maths(name, img, ws):
    """pico (3 stages) at 32 px (window 4: shifted stages 0-1, stage 2 one window), at 48 px with 3x3 windows (odd
    N = 9: shifted stages 0-2) and at 16 px (stage 2's 2x2 map is smaller than the window: clamped to 2x2)."""
    torch.manual_seed(0)
    cfg = dict(SWIN_CONFIGS[name], img_size=img, window_size=ws)
    ours = build_swin(name, img_size=img, window_size=ws, use_mask_token=True, drop_path_rate=0.0).double()
    _randomise(ours)
    twin = OfficialSwin(img, cfg["patch_size"], cfg["embed_dim"], cfg["depths"], cfg["num_heads"], ws).double()
    twin.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, img, img, dtype=torch.float64)
    g = img // cfg["patch_size"]
    mask = torch.rand(2, g, g) < 0.5
    for m in (None, mask):
        ref = twin(x, m)
        out = ours.forward_features(x, m)
        B, h, w, C = out.shape
        assert (h, w, C) == (g // ours.stride * cfg["patch_size"], g // ours.stride * cfg["patch_size"],
                             ours.num_features)
        assert_close(out.reshape(B, h * w, C), ref, dtype=torch.float64, name=f"features mask={m is not None}")
    assert_close(ours(x), twin(x).mean(1), dtype=torch.float64, name="pooled")
    # gradients of every parameter agree too
    loss_o = ours.forward_features(x, mask).square().sum()
    loss_t = twin(x, mask).square().sum()
    go = torch.autograd.grad(loss_o, list(ours.parameters()))
    gt = dict(zip([n for n, _ in twin.named_parameters()], torch.autograd.grad(loss_t, list(twin.parameters()))))
    for (n, _), a in zip(ours.named_parameters(), go):
        assert_close(a, gt[n], dtype=torch.float64, atol=1e-8, rtol=1e-7, name=f"grad {n}")


def test_relative_position_index_and_shift_mask_are_the_officials():
    for wh in (3, 4, 6, 7):
        attn = WindowAttention(8, 2, (wh, wh))
        assert torch.equal(attn.relative_position_index, _official_rel_index(wh, wh))
        assert attn.relative_position_bias_table.shape == ((2 * wh - 1) ** 2, 2)
    for H, ws in ((12, 6), (14, 7), (48, 6), (8, 4)):
        assert torch.equal(shifted_window_mask((H, H), (ws, ws), (ws // 2, ws // 2)), _official_mask(H, H, ws, ws // 2))


@pytest.mark.parametrize("img,ws,expect", [
    (192, 6, [(6, 64, True), (6, 16, True), (6, 4, True), (6, 1, False)]),   # SimMIM pre-training (48, 24, 12, 6)
    (224, 7, [(7, 64, True), (7, 16, True), (7, 4, True), (7, 1, False)]),   # fine-tuning (56, 28, 14, 7)
])
def test_stage_windows_at_swin_b_sizes(img, ws, expect):
    m = meta("swin_base", img_size=img, window_size=ws)
    for stage, (w, nw, shifted) in zip(m.layers, expect):
        blk0, blk1 = stage.blocks[0], stage.blocks[1]
        assert blk0.window_size == (w, w) and blk0.attn_mask is None
        res = blk1.input_resolution
        assert (res[0] // w) ** 2 == nw
        assert (blk1.attn_mask is not None) == shifted and blk1.shift_size == ((w // 2,) * 2 if shifted else (0, 0))
        if shifted:
            assert blk1.attn_mask.shape == (nw, w * w, w * w)
    assert m.stride == 32 and m.num_features == 1024
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(86.7e6, rel=0.01)


def test_mask_token_replaces_masked_patch_embeddings():
    m = build_swin("swin_pico", use_mask_token=True, ape=True)
    _randomise(m)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 16, 16) < 0.6
    plain = m.embed(x)
    masked = m.embed(x, mask)
    tok = m.mask_token.reshape(-1) + m.absolute_pos_embed.reshape(16, 16, -1)
    assert_close(masked[mask], tok.expand(2, 16, 16, -1)[mask], name="masked rows")
    assert_close(masked[~mask], plain[~mask], name="visible rows")
    with pytest.raises(ValueError, match="without a mask token"):
        build_swin("swin_pico").embed(x, mask)
    with pytest.raises(ValueError, match=r"mask: expected bool \[B, 256\]"):
        m.embed(x, mask.float())


def test_api_errors_pool_config_and_registry():
    m = build_swin("swin_pico", drop_path_rate=0.1)
    x = torch.randn(3, 3, 32, 32)
    assert m(x).shape == (3, 128) and m(x, pool="mean").shape == (3, 128)
    assert m.forward_features(x, return_layers=True)[1][0].shape == (3, 16, 16, 32)
    with pytest.raises(ValueError, match="no cls token"):
        m(x, pool="cls")
    with pytest.raises(ValueError, match=r"images: expected \[B, 3, 32, 32\]"):
        m(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="not divisible into 5x5 windows"):
        build_swin("swin_pico", window_size=5)
    with pytest.raises(ValueError, match="divisible by 2\\^2 for the patch merging of 3 stages"):
        build_swin("swin_pico", img_size=36)
    with pytest.raises(ValueError, match="unknown Swin"):
        build_swin("swin_huge")
    assert set(swin_model_names()) == {"swin_pico", "swin_tiny", "swin_small", "swin_base", "swin_large"}
    assert is_swin("swin_base") and not is_swin("vit_base") and is_swin_cfg({"model": "swin_tiny"})
    cfg = m.config
    assert cfg["arch"] == "swin" and cfg["depths"] == [2, 2, 2] and cfg["drop_path_rate"] == 0.1
    import json

    assert json.loads(json.dumps(cfg)) == cfg  # export writes it as JSON; resume compares it
    rates = [blk.drop_path1.drop_prob for st in m.layers for blk in st.blocks]
    assert rates == pytest.approx([0.1 * i / 5 for i in range(6)])  # linear over all blocks


def test_drop_path_and_train_mode_run():
    m = build_swin("swin_pico", drop_path_rate=0.5).train()
    y = m(torch.randn(4, 3, 32, 32))
    y.sum().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if not n.startswith("head"))


@interpreter
def test_model_through_the_triton_kernel_matches_reference():
    torch.manual_seed(0)
    m = build_swin("swin_pico", use_mask_token=True, drop_path_rate=0.0)
    _randomise(m)
    x = torch.randn(1, 3, 32, 32)
    mask = torch.rand(1, 16, 16) < 0.5
    ref = m.forward_features(x, mask)
    ref_g = torch.autograd.grad(ref.square().sum(), list(m.parameters()))
    with kernels.use_backend("triton", op="window_attention"):
        out = m.forward_features(x, mask)
        got_g = torch.autograd.grad(out.square().sum(), list(m.parameters()))
    assert_close(out, ref, atol=1e-4, rtol=1e-4, name="features")
    for (n, _), a, e in zip(m.named_parameters(), got_g, ref_g):
        assert_close(a, e, atol=1e-3, rtol=1e-3, name=f"grad {n}")


@pytest.mark.slow
def test_compile_fullgraph_swin_is_one_graph_with_the_fused_ops():
    """torch.compile(fullgraph=True) over the masked Swin: one graph, window attention and the mask-token scatter
    as opaque custom ops (aot_eager keeps it to ~30 s on CPU)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    m = build_swin("swin_pico", use_mask_token=True, drop_path_rate=0.0)
    x, mask = torch.randn(2, 3, 32, 32), torch.rand(2, 16, 16) < 0.5
    counter = CompileCounterWithBackend("aot_eager")
    loss = torch.compile(lambda a, b: m.forward_features(a, b).square().mean(), fullgraph=True, backend=counter)(x, mask)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    ref = m.forward_features(x, mask).square().mean()
    ref_grads = torch.autograd.grad(ref, list(m.parameters()))
    assert counter.frame_count == 1
    ops = {str(n.target) for g in counter.graphs for n in g.graph.nodes if "ssl_kernels" in str(n.target)}
    assert {"ssl_kernels.window_attention_fwd.default", "ssl_kernels.masked_token_scatter_fwd.default"} <= ops
    assert_close(loss, ref, atol=1e-6, rtol=1e-5, name="loss")
    for (n, _), a, e in zip(m.named_parameters(), grads, ref_grads):
        assert_close(a, e, atol=1e-6, rtol=1e-4, name=f"grad {n}")
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------------------
# SimMIM on Swin


PICO = dict(model="swin_pico", image_size=32, mask_ratio=0.6, drop_path=0.0, use_abs_pos_emb=False, pool="mean")


def test_swin_simmim_decoder_stride_and_loss_formula():
    torch.manual_seed(0)
    m = SwinSimMIM(PICO).eval()
    conv, shuffle = m.decoder
    assert m.backbone.stride == 8 and conv.kernel_size == (1, 1) and shuffle.upscale_factor == 8
    assert conv.in_channels == 128 and conv.out_channels == 8 * 8 * 3
    assert m.mask_patch == 8
    mask = m.loader_kwargs()["mask_fn"](3, 7)["mask"]
    assert torch.equal(mask, kernels.simmim_masks(3, 32, 8, 2, 0.6, seed=7)) and mask.shape == (3, 16, 16)
    x = torch.randn(3, 3, 32, 32)
    loss = m({"images": x, "mask": mask})["loss"]
    rec = m.reconstruct(x, mask)
    assert rec.shape == x.shape
    pm = mask.repeat_interleave(2, 1).repeat_interleave(2, 2).unsqueeze(1).float()
    torch.testing.assert_close(loss, (F.l1_loss(x, rec, reduction="none") * pm).sum() / (pm.sum() + 1e-5) / 3)
    torch.testing.assert_close(masked_l1_loss(x, rec, mask, 2), loss)
    with torch.no_grad():
        for p in m.decoder.parameters():
            p.zero_()
    torch.testing.assert_close(m({"images": x, "mask": mask})["loss"], (x.abs() * pm).sum() / (pm.sum() + 1e-5) / 3)
    with pytest.raises(ValueError, match="needs a Swin model"):
        SwinSimMIM(dict(PICO, model="vit_femto"))


def test_official_swin_b_simmim_shapes():
    with torch.device("meta"):
        backbone, decoder = build_swin_simmim(dict(model="swin_base", image_size=192, patch_size=4, window_size=6,
                                                   drop_path=0.0, use_abs_pos_emb=False))
    assert backbone.stride == 32 and backbone.mask_token is not None and backbone.config["window_size"] == 6
    assert decoder[0].in_channels == 1024 and decoder[0].out_channels == 32 * 32 * 3
    assert decoder[1].upscale_factor == 32
    n_dec = sum(p.numel() for p in decoder.parameters())
    assert n_dec == 1024 * 3072 + 3072


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    m = SwinSimMIM(PICO)
    x = torch.randn(4, 3, 32, 32)
    batch = {"images": x, "mask": kernels.simmim_masks(4, 32, 8, 2, 0.6, seed=0)}
    losses = losses_on_fixed_batch(m, batch, lr=3e-3, steps=6)
    assert losses[-1] < 0.9 * losses[0], losses


def test_trainer_runs_swin_simmim_with_the_engine_loop(tmp_path):
    """The engine's config resolution, loader (mask_fn), optimiser groups, checkpoint and encoder_config with a
    Swin: what ``--method simmim --model swin_pico`` runs once simmim.py routes Swin models to simmim_swin."""
    from _train_helpers import make_cfg

    from engine.data import build_pretrain_loader, builtin_dataset
    from engine.trainer import Trainer, seed_everything
    from engine.trainer import checkpoint as ckpt
    from engine.trainer.distributed import DistInfo
    from engine.trainer.optim import param_groups

    cfg = make_cfg(tmp_path, model="swin_pico", image_size=32, batch_size=8, max_steps=3, drop_path=0.0)
    seed_everything(cfg["seed"])
    method = SwinSimMIM(cfg)
    no_decay = {n for g in param_groups(method) if not g["apply_wd"] for n in g["names"]}
    assert "backbone.mask_token" in no_decay and "backbone.layers.0.blocks.0.attn.relative_position_bias_table" in no_decay
    loader = build_pretrain_loader("simmim", builtin_dataset(image_size=32), batch_size=8, image_size=32,
                                   seed=cfg["seed"], num_threads=1, **method.loader_kwargs())
    trainer = Trainer(method, loader, cfg, DistInfo())
    trainer.fit()
    state = ckpt.load(trainer.last_checkpoint)
    assert state["encoder_config"] == method.encoder().config and state["step"] == 3
    assert len(trainer.history) == 3 and all(math.isfinite(h) for h in trainer.history)


@pytest.mark.parametrize("preset,model,params", [("simmim_swin_tiny", "swin_tiny", 27.5e6),
                                                 ("simmim_swin_base", "swin_base", 86.7e6)])
def test_presets_resolve_to_the_official_recipe(preset, model, params):
    from engine.methods import get_method
    from engine.trainer.config import peak_lr, resolve

    cfg = resolve({"config": preset}, method_defaults_fn=lambda m: get_method(m).defaults)
    assert cfg["method"] == "simmim" and cfg["model"] == model and is_swin_cfg(cfg)
    assert (cfg["image_size"], cfg["patch_size"], cfg["window_size"]) == (192, 4, 6)
    assert (cfg["epochs"], cfg["warmup_epochs"], cfg["mask_ratio"], cfg["mask_patch_size"]) == (100, 10, 0.6, 32)
    assert cfg["optimizer"] == "adamw" and cfg["weight_decay"] == 0.05 and cfg["drop_path"] == 0.0
    # official: lr = 2e-4 * batch / 512 -> 8e-4 at 2048 images (16 x 128)
    assert peak_lr(dict(cfg, batch_size=128), world_size=16) == pytest.approx(2e-4 * 2048 / 512)
    with torch.device("meta"):
        backbone, decoder = build_swin_simmim(cfg)
    assert backbone.config["img_size"] == 192 and backbone.config["window_size"] == 6 and backbone.stride == 32
    assert sum(p.numel() for n, p in backbone.named_parameters() if n != "mask_token") == pytest.approx(params, rel=0.01)


def test_simmim_swin_pico_through_the_cli(tmp_path):
    """`python -m engine.pretrain --method simmim --model swin_pico` end to end: train and its pictures."""
    from _train_helpers import run_pretrain

    out = run_pretrain("--method", "simmim", "--model", "swin_pico", "--max-steps", "2", "--batch-size", "16",
                       "--num-threads", "1", "--output-dir", str(tmp_path), "--print-every", "1", "--no-final-knn")
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "viz" / "reconstruction.png").is_file()
    assert "trained 2/2 steps" in out.stdout
