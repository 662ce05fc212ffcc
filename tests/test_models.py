"""ViT backbones and heads: shapes, mask-token path, BEiT options, init, errors."""

import math

import pytest
import torch

import kernels
from engine.models import DINOHead, VIT_CONFIGS, build_vit
from engine.models.vit import DropPath


def test_variants_shapes_and_return_layers():
    x = torch.randn(3, 3, 32, 32)
    m = build_vit("vit_femto")
    tokens, layers = m.forward_features(x, return_layers=[0, -1])
    assert tokens.shape == (3, 1 + 64, 48)
    assert len(layers) == 2 and all(t.shape == (3, 65, 48) for t in layers)
    # the final norm of the last raw layer output is the returned token tensor
    torch.testing.assert_close(m.norm(layers[-1]), tokens)
    assert m(x).shape == (3, 48)
    torch.testing.assert_close(m(x, pool="mean"), tokens[:, 1:].mean(1))
    for name in ("vit_tiny", "vit_small", "vit_base", "vit_large"):
        assert VIT_CONFIGS[name]["embed_dim"] % VIT_CONFIGS[name]["num_heads"] == 0
    tiny = build_vit("vit_tiny", img_size=48, depth=1)  # patch 16 -> 3x3 grid, odd sizes work
    assert tiny.forward_features(torch.randn(2, 3, 48, 48)).shape == (2, 10, 192)


def test_mask_token_path_matches_manual_replacement():
    torch.manual_seed(1)
    m = build_vit("vit_femto", use_mask_token=True).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 8, 8) < 0.4
    out = m.forward_features(x, mask=mask)
    # manual: replace masked patch embeddings by the mask token, prepend cls, add pos, run the blocks
    tok = m.patch_embed(x)
    tok = torch.where(mask.reshape(2, -1, 1), m.mask_token.expand_as(tok), tok)
    h = torch.cat([m.cls_token.expand(2, -1, -1), tok], 1) + m.pos_embed
    for blk in m.blocks:
        h = blk(h)
    torch.testing.assert_close(out, m.norm(h))
    # a mask of all False equals the unmasked path; masking changes the output
    torch.testing.assert_close(m.forward_features(x, mask=torch.zeros_like(mask)), m.forward_features(x))
    assert not torch.allclose(out, m.forward_features(x))


def test_mask_gradients_reach_mask_token():
    m = build_vit("vit_femto", use_mask_token=True)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, :10] = True
    m.forward_features(torch.randn(2, 3, 32, 32), mask=mask).sum().backward()
    assert m.mask_token.grad is not None and m.mask_token.grad.abs().sum() > 0


def test_beit_options_param_names():
    shared = build_vit("vit_femto", qv_bias=True, use_abs_pos_emb=False, use_shared_rel_pos_bias=True,
                       init_values=0.1, use_mask_token=True)
    names = dict(shared.named_parameters())
    assert "pos_embed" not in names and "rel_pos_bias.relative_position_bias_table" in names
    assert names["rel_pos_bias.relative_position_bias_table"].shape == ((2 * 8 - 1) ** 2 + 3, 2)
    assert "blocks.0.attn.q_bias" in names and "blocks.0.attn.v_bias" in names
    assert shared.blocks[0].attn.qkv.bias is None
    assert torch.all(names["blocks.1.gamma_1"] == 0.1)
    per_layer = build_vit("vit_femto", use_rel_pos_bias=True)
    assert "blocks.1.rel_pos_bias.relative_position_bias_table" in dict(per_layer.named_parameters())
    x = torch.randn(2, 3, 32, 32)
    assert shared.forward_features(x).shape == per_layer.forward_features(x).shape == (2, 65, 48)
    # the relative position bias is used: changing the table changes the output
    before = shared.forward_features(x)
    with torch.no_grad():
        shared.rel_pos_bias.relative_position_bias_table.normal_()
    assert not torch.allclose(before, shared.forward_features(x))


@pytest.mark.parametrize("mode,cut,shrink,rescaled", [("beit", 0.02, 0.540, True), ("timm", None, 1.0, True),
                                                     ("dino", None, 1.0, False)])
def test_init_modes_cutoff_and_rescale(mode, cut, shrink, rescaled):
    """beit: trunc-normal cut at +-1 std (unilm); timm/dino: +-2 absolute, i.e. a plain normal; the rescale
    1/sqrt(2 l) of attn.proj / mlp.fc2 everywhere but DINO. ``shrink``: std of the truncated normal / std."""
    torch.manual_seed(0)
    m = build_vit("vit_small", depth=4, img_size=32, patch_size=8, init_mode=mode)
    w = m.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() / (0.02 * shrink) - 1) < 0.05
    if cut is not None:
        assert w.abs().max() <= cut + 1e-6
    else:
        assert w.abs().max() > 0.06  # beyond 3 std: not truncated at +-2 std
    for i, blk in enumerate(m.blocks, start=1):
        expect = 0.02 * shrink / (math.sqrt(2 * i) if rescaled else 1.0)
        for wt in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            assert abs(wt.std().item() / expect - 1) < 0.1, (i, wt.std().item(), expect)
    pe = m.patch_embed.proj.weight
    if mode == "dino":  # PyTorch's default conv init (kaiming uniform a=sqrt(5)): std 1/sqrt(3 fan_in)
        assert abs(pe.std().item() * math.sqrt(3 * pe[0].numel()) - 1) < 0.1
    else:
        assert abs(pe.std().item() / (0.02 * shrink) - 1) < 0.1
    assert torch.all(m.blocks[0].norm1.weight == 1) and torch.all(m.blocks[0].attn.qkv.bias == 0)
    with pytest.raises(ValueError, match="init_mode"):
        build_vit("vit_femto", init_mode="xavier")


def test_uses_kernels_attention_module():
    m = build_vit("vit_femto")
    assert isinstance(m.blocks[0].attn, kernels.MultiheadSelfAttention)


def test_pos_embed_interpolation_for_other_resolutions():
    m = build_vit("vit_femto")
    assert m.forward_features(torch.randn(2, 3, 16, 16)).shape == (2, 17, 48)
    assert m.interpolate_pos_embed(8, 8) is m.pos_embed


def test_drop_path():
    dp = DropPath(0.5).train()
    x = torch.ones(1000, 4)
    y = dp(x)
    rows = y[:, 0]
    assert set(rows.unique().tolist()) <= {0.0, 2.0} and 0.35 < (rows == 0).float().mean() < 0.65
    assert torch.equal(dp.eval()(x), x)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown 'vit_huge'"):
        build_vit("vit_huge")
    m = build_vit("vit_femto")
    with pytest.raises(ValueError, match="mask token"):
        m.forward_features(torch.randn(1, 3, 32, 32), mask=torch.zeros(1, 64, dtype=torch.bool))
    mt = build_vit("vit_femto", use_mask_token=True)
    with pytest.raises(ValueError, match="mask: expected bool"):
        mt.forward_features(torch.randn(1, 3, 32, 32), mask=torch.zeros(1, 64))
    with pytest.raises(ValueError, match="divisible by 4"):
        m(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        build_vit("vit_femto", num_heads=5)


def test_dino_head():
    head = DINOHead(48, out_dim=100, hidden_dim=32, bottleneck_dim=16)
    y = head(torch.randn(5, 48))
    assert y.shape == (5, 100)
    # norm_last_layer: logits are cosines (|y| <= 1), gains are frozen at 1
    assert y.abs().max() <= 1 + 1e-5
    assert not head.last_layer.weight_g.requires_grad and torch.all(head.last_layer.weight_g == 1)
    free = DINOHead(48, out_dim=100, hidden_dim=32, bottleneck_dim=16, norm_last_layer=False)
    assert free.last_layer.weight_g.requires_grad
