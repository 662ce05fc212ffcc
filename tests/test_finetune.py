"""Fine-tuning (issue 21): layer decay and weight-decay groups, the relative-position-bias conversion and the
position-table resampling against hand computations, mixup/cutmix and the soft-target losses, exact resume."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.data.mixup import (NO_MIX, MixSpec, binary_cross_entropy, mix_batch, sample_mix, smooth_one_hot,
                               soft_target_cross_entropy)
from engine.methods import get_method
from engine.methods.finetune import FineTune, build_encoder, convnext_layer_ids, resnet_layer_ids, vit_layer_id
from engine.models import pos_embed as pe
from engine.models.vit import build_vit
from engine.trainer.config import resolve

BEIT_LIKE = dict(qv_bias=True, use_abs_pos_emb=False, use_shared_rel_pos_bias=True, init_values=0.1)


def ft_cfg(tmp_path=None, backbone=None, **over):
    cli = dict(method="finetune", config="finetune_cpu", output_dir=str(tmp_path or "/tmp/unused"), num_threads=1,
               print_every=1000, checkpoint=None, compare_random=False)
    cli.update(over)
    cfg = resolve(cli, method_defaults_fn=lambda m: get_method(m).defaults)
    cfg["num_classes"] = cfg.get("num_classes") or 10
    cfg["backbone"] = backbone
    return cfg


def vit_spec(**kw):
    enc = build_vit("vit_femto", img_size=32, use_mask_token=True, **kw)
    return {"kind": "vit", "config": dict(enc.config), "source": None, "source_method": "simmim"}, enc


# ------------------------------------------------------------------------------------------------ layer decay
def test_vit_layer_decay_and_weight_decay_groups_by_hand():
    """vit_femto (depth 2) with layer decay 0.5: L + 2 = 4 ids, lr_scale = 0.5^(3 - id)."""
    spec, _ = vit_spec(**BEIT_LIKE)
    m = FineTune(ft_cfg(backbone=spec, layer_decay=0.5, drop_path=0.0))
    table = {}
    for g in m.optimizer_groups():
        for name in g["names"]:
            table[name] = (g["lr_scale"], g["apply_wd"])
    expect = {
        "backbone.cls_token": (0.125, False),                    # no_weight_decay() name, layer 0
        "backbone.patch_embed.proj.weight": (0.125, True),
        "backbone.patch_embed.proj.bias": (0.125, False),
        "backbone.blocks.0.gamma_1": (0.25, False),              # 1-D
        "backbone.blocks.0.attn.q_bias": (0.25, False),
        "backbone.blocks.0.attn.qkv.weight": (0.25, True),
        "backbone.blocks.0.rel_pos_bias.relative_position_bias_table": (0.25, True),  # decayed, as BEiT/SimMIM
        "backbone.blocks.1.mlp.fc2.weight": (0.5, True),
        "backbone.blocks.1.norm2.weight": (0.5, False),
        "fc_norm.weight": (1.0, False),
        "head.weight": (1.0, True),
        "head.bias": (1.0, False),
    }
    for name, want in expect.items():
        assert table[name] == want, (name, table[name], want)
    assert "backbone.norm.weight" not in table and "backbone.mask_token" not in table  # mean pooling: no norm
    assert "backbone.rel_pos_bias.relative_position_bias_table" not in table          # per-layer tables now
    assert len(table) == len([p for p in m.parameters() if p.requires_grad])
    # the unilm/SimMIM layer-id function itself
    assert [vit_layer_id(n, 14) for n in ("pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                                          "blocks.11.mlp.fc1.bias", "rel_pos_bias.relative_position_bias_table",
                                          "norm.weight")] == [0, 0, 1, 12, 13, 13]


def test_layer_decay_reaches_the_optimizer_through_the_trainer(tmp_path):
    from engine.data import build_eval_loader, builtin_dataset
    from engine.trainer import Trainer

    spec, _ = vit_spec(**BEIT_LIKE)
    cfg = ft_cfg(tmp_path, backbone=spec, layer_decay=0.5, lr=1e-3, warmup_epochs=0.0, max_steps=1)
    loader = build_eval_loader(builtin_dataset(image_size=32), "train", batch_size=64, image_size=32,
                               backend="torch", num_threads=0)
    tr = Trainer(FineTune(cfg), loader, cfg)
    values = tr._apply_schedules(0)
    assert values["lr"] == pytest.approx(1e-3)
    for g in tr.optimizer.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
        assert g["weight_decay"] == (values["wd"] if g["apply_wd"] else 0.0)
    assert sorted({g["lr_scale"] for g in tr.optimizer.param_groups}) == [0.125, 0.25, 0.5, 1.0]


def test_resnet_and_convnext_layer_ids_follow_spark_by_hand():
    r50, N = resnet_layer_ids((3, 4, 6, 3))
    assert N == 6  # 2 + ceil(4/2) + ceil(6/3)
    ids = {n: r50(n) for n in ("conv1.weight", "bn1.bias", "layer1.2.conv3.weight", "layer2.0.conv1.weight",
                               "layer2.3.bn2.weight", "layer3.2.conv1.weight", "layer3.3.conv1.weight",
                               "layer3.5.conv2.weight", "layer4.0.downsample.0.weight", "fc.weight")}
    assert ids == {"conv1.weight": 0, "bn1.bias": 0, "layer1.2.conv3.weight": 1, "layer2.0.conv1.weight": 2,
                   "layer2.3.bn2.weight": 3, "layer3.2.conv1.weight": 4, "layer3.3.conv1.weight": 5,
                   "layer3.5.conv2.weight": 5, "layer4.0.downsample.0.weight": 6, "fc.weight": 7}
    r101, N = resnet_layer_ids((3, 4, 23, 3))
    assert N == 12 and r101("layer3.22.conv1.weight") == 2 + 2 + 22 // 3 and r101("fc.bias") == 13
    femto, N = resnet_layer_ids((1, 1, 1, 1))  # our extension for depths SparK does not list
    assert N == 4 and [femto(f"layer{i}.0.conv1.weight") for i in (1, 2, 3, 4)] == [1, 2, 3, 4]
    cnx, N = convnext_layer_ids((3, 3, 9, 3))
    assert N == 6
    assert [cnx(n) for n in ("downsample_layers.0.0.weight", "stages.0.2.dwconv.weight", "downsample_layers.1.1.bias",
                             "stages.1.0.gamma", "downsample_layers.2.0.weight", "stages.2.8.pwconv1.weight",
                             "downsample_layers.3.1.weight", "stages.3.2.gamma", "norm.weight",
                             "head.weight")] == [0, 1, 2, 2, 3, 5, 6, 6, 7, 7]
    assert convnext_layer_ids((3, 3, 27, 3))[1] == 12


def test_resnet50_groups_lr_scale_and_no_decay():
    from engine.models.resnet import build_resnet

    enc = build_resnet("resnet50")
    spec = {"kind": "resnet", "config": dict(enc.config), "source": None, "source_method": "spark"}
    m = FineTune(ft_cfg(backbone=spec, layer_decay=0.7, drop_path=0.0, head_init_scale=None))
    table = {n: (g["lr_scale"], g["apply_wd"]) for g in m.optimizer_groups() for n in g["names"]}
    assert table["backbone.conv1.weight"] == (pytest.approx(0.7 ** 7), True)
    assert table["backbone.bn1.weight"] == (pytest.approx(0.7 ** 7), False)
    assert table["backbone.layer3.4.conv1.weight"] == (pytest.approx(0.7 ** 2), True)  # id 2 + 2 + 4 // 3 = 5
    assert table["head.weight"] == (1.0, True) and table["head.bias"] == (1.0, False)
    assert m.sync_batchnorm and m.head.weight.std() > 0.005  # timm's default fc init, not x 0.001


# ------------------------------------------------------------------------------------------------ position tables
def test_shared_rel_pos_bias_copied_into_every_layer_by_hand():
    torch.manual_seed(0)
    heads, window = 2, (2, 2)
    rows = pe.table_rows(window)
    assert rows == 3 * 3 + 3
    shared = torch.arange(rows * heads, dtype=torch.float32).reshape(rows, heads)
    sd = {pe.SHARED_TABLE: shared, "cls_token": torch.zeros(1)}
    out = pe.expand_shared_rel_pos_bias(sd, depth=3)
    assert pe.SHARED_TABLE not in out and torch.equal(out["cls_token"], sd["cls_token"])
    for i in range(3):
        t = out[f"blocks.{i}.rel_pos_bias.relative_position_bias_table"]
        assert torch.equal(t, shared) and t.data_ptr() != shared.data_ptr()  # a copy per layer
    import kernels

    rpb = kernels.RelativePositionBias(window, heads)
    with torch.no_grad():
        rpb.relative_position_bias_table.copy_(shared)
    bias = rpb()  # [H, 5, 5]: [cls, (0,0), (0,1), (1,0), (1,1)]
    # token (0,0) -> token (1,1): offset (-1, -1) -> row (-1 + 1) * 3 + (-1 + 1) = 0
    assert bias[1, 1, 4] == shared[0, 1]
    # token (1,1) -> (0,0): (+1, +1) -> row 2 * 3 + 2 = 8; (0,1) -> (1,0): (-1, +1) -> row 2
    assert bias[0, 4, 1] == shared[8, 0] and bias[0, 2, 3] == shared[2, 0]
    assert bias[0, 0, 3] == shared[9, 0] and bias[0, 3, 0] == shared[10, 0] and bias[0, 0, 0] == shared[11, 0]


def test_converted_backbone_computes_the_pretrained_function():
    """Shared table -> per-layer copies keeps the encoder's output exactly ([CLS] pooling keeps its norm)."""
    spec, enc = vit_spec(**BEIT_LIKE)
    with torch.no_grad():
        enc.rel_pos_bias.relative_position_bias_table.normal_()
        for b in enc.blocks:
            b.gamma_1.fill_(0.7)
    m = FineTune(ft_cfg(backbone=spec, pool="cls", drop_path=0.0))
    notes = m.load_pretrained(enc.state_dict())
    assert any("copied into the 2 layers" in n for n in notes)
    x = torch.randn(3, 3, 32, 32)
    enc.eval(), m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m.backbone(x, pool="cls"), enc(x, pool="cls"), rtol=1e-5, atol=1e-5)
        for b in m.backbone.blocks:
            table = b.rel_pos_bias.relative_position_bias_table
            assert torch.equal(table, enc.rel_pos_bias.relative_position_bias_table)


def test_geometric_positions_follow_beits_bisection():
    pos = pe.geometric_positions(2, 4)  # 1 + q would need q = 3 > 1.5: q stays at the top of the bracket
    assert pos[2] == 0 and pos[3] == 1.0 and pos[4] == pytest.approx(2.5, abs=1e-5)
    np.testing.assert_allclose(pos, -pos[::-1])
    pos = pe.geometric_positions(13, 23)  # BEiT 224 -> 384 px: 27 -> 47 offsets per side
    steps = np.diff(pos[14:])  # p_1 = 1, then steps q, q^2, ..., q^12
    q = steps[0]
    assert 1.01 < q < 1.5 and pos[14] == 1.0
    np.testing.assert_allclose(steps, q ** np.arange(1, 13), rtol=1e-9)
    assert pos[-1] == pytest.approx(23, abs=1e-4)  # the source half-width stretched to the target's


def _linear_table(p, extra):
    yy, xx = np.meshgrid(p, p, indexing="ij")
    s = len(p)
    body = torch.tensor(np.stack([0.3 * yy - 0.2 * xx + 1.0, -yy + 2 * xx], -1).reshape(s * s, 2),
                        dtype=torch.float32)
    return torch.cat([body, extra])


def test_rel_pos_table_resampling_reproduces_a_linear_table_by_hand():
    """A cubic interpolating spline reproduces a linear function: a table that is linear in the (geometric)
    source positions resamples to the same linear function at the integer target offsets."""
    src, dst = (7, 7), (12, 12)  # 13 -> 23 offsets per side: q inside BEiT's bracket, no extrapolation
    s, d = 2 * src[0] - 1, 2 * dst[0] - 1
    extra = torch.tensor([[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]])
    table = _linear_table(pe.geometric_positions(s // 2, d // 2), extra)
    out = pe.resize_rel_pos_table(table, src, dst)
    assert out.shape == (d * d + 3, 2)
    t = np.arange(-(d // 2), d // 2 + 1, dtype=np.float64)
    ty, tx = np.meshgrid(t, t, indexing="ij")
    want = np.stack([0.3 * ty - 0.2 * tx + 1.0, -ty + 2 * tx], -1).reshape(d * d, 2)
    np.testing.assert_allclose(out[:-3].numpy(), want, atol=1e-3)
    assert torch.equal(out[-3:], extra)  # the [CLS] rows are kept
    # 5 -> 9 offsets: even q = 1.5 reaches only 2.5 of 4; beyond it the nearest edge value (interp2d's default)
    small = _linear_table(pe.geometric_positions(2, 4), extra)
    out = pe.resize_rel_pos_table(small, (3, 3), (5, 5))[:-3].reshape(9, 9, 2)
    edge = 0.3 * -2.5 - 0.2 * -2.5 + 1.0
    assert float(out[0, 0, 0]) == pytest.approx(edge, abs=1e-4) and float(out[1, 1, 0]) == pytest.approx(edge, abs=1e-4)
    assert float(out[4, 4, 0]) == pytest.approx(1.0, abs=1e-4) and float(out[5, 4, 0]) == pytest.approx(1.3, abs=1e-4)
    same = torch.randn(pe.table_rows(src), 2)
    assert pe.resize_rel_pos_table(same, src, src) is same
    bic = pe.resize_rel_pos_table(torch.ones(pe.table_rows(src), 2), src, dst, mode="bicubic")
    torch.testing.assert_close(bic, torch.ones(pe.table_rows(dst), 2))
    with pytest.raises(ValueError, match="expected"):
        pe.resize_rel_pos_table(torch.zeros(7, 2), src, dst)


def test_pos_embed_resize_keeps_cls_and_a_constant_grid():
    pos = torch.cat([torch.full((1, 1, 4), 9.0), torch.full((1, 4, 4), 2.0)], dim=1)  # 2x2 grid
    out = pe.resize_pos_embed(pos, (3, 3))
    assert out.shape == (1, 10, 4) and torch.equal(out[:, :1], pos[:, :1])
    torch.testing.assert_close(out[:, 1:], torch.full((1, 9, 4), 2.0))
    assert pe.resize_pos_embed(pos, 2) is pos


def test_finetuning_at_another_resolution_resamples_every_table():
    spec, enc = vit_spec(**BEIT_LIKE)
    m = FineTune(ft_cfg(backbone=spec, image_size=48, drop_path=0.0))
    notes = m.load_pretrained(enc.state_dict())
    assert any("resampled (geometric) from window (8, 8) to (12, 12)" in n for n in notes), notes
    assert m.backbone.blocks[0].rel_pos_bias.relative_position_bias_table.shape[0] == 23 * 23 + 3
    assert m.classify(torch.randn(2, 3, 48, 48)).shape == (2, 10)
    spec, enc = vit_spec()  # absolute position embedding (DINO-style)
    m = FineTune(ft_cfg(backbone=spec, image_size=48, drop_path=0.0, pool="cls"))
    notes = m.load_pretrained(enc.state_dict())
    assert any("absolute position embedding resized (bicubic) from 64 to 144" in n for n in notes), notes


def test_load_pretrained_names_what_does_not_fit():
    spec, enc = vit_spec(**BEIT_LIKE)
    m = FineTune(ft_cfg(backbone=spec))
    sd = enc.state_dict()
    sd.pop("blocks.1.mlp.fc2.weight")
    with pytest.raises(ValueError, match="lacks tensors of this backbone: blocks.1.mlp.fc2.weight"):
        m.load_pretrained(sd)
    sd = dict(enc.state_dict(), extra_thing=torch.zeros(1))
    with pytest.raises(ValueError, match="has tensors this backbone does not: extra_thing"):
        m.load_pretrained(sd)


def test_head_init_scale_and_mean_pool_head():
    spec, _ = vit_spec(**BEIT_LIKE)
    m = FineTune(ft_cfg(backbone=spec, head_init_scale=0.001))
    assert 0.01e-3 < float(m.head.weight.std()) < 0.03e-3  # trunc-normal std 0.02, times 0.001
    assert torch.equal(m.head.bias, torch.zeros_like(m.head.bias))
    assert isinstance(m.backbone.norm, torch.nn.Identity) and m.fc_norm is not None
    assert m.classify(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# ------------------------------------------------------------------------------------------------ mixup / losses
def test_mixup_and_cutmix_by_hand():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 4, 4, generator=g)
    y = torch.tensor([0, 1, 2, 1])
    out, t = mix_batch(x, y, [0.7, 0.0, 0, 0, 0, 0], num_classes=3, smoothing=0.3)
    torch.testing.assert_close(out, 0.7 * x + 0.3 * x.flip(0))
    s = torch.full((4, 3), 0.1)  # smoothing 0.3 over 3 classes: off 0.1, on 0.8
    s[torch.arange(4), y] = 0.8
    torch.testing.assert_close(t, 0.7 * s + 0.3 * s.flip(0))
    torch.testing.assert_close(t.sum(1), torch.ones(4))
    # cutmix box rows 1:3, cols 0:2 from the reversed batch; lam as given (already area-corrected)
    out, t = mix_batch(x, y, [0.75, 1.0, 1, 3, 0, 2], num_classes=3)
    want = x.clone()
    want[:, :, 1:3, 0:2] = x.flip(0)[:, :, 1:3, 0:2]
    assert torch.equal(out, want) and not torch.equal(x, want)  # the input is not changed in place
    onehot = F.one_hot(y, 3).float()
    torch.testing.assert_close(t, 0.75 * onehot + 0.25 * onehot.flip(0))
    out, t = mix_batch(x, y, NO_MIX, num_classes=3, smoothing=0.1)
    assert out is x
    torch.testing.assert_close(t, smooth_one_hot(y, 3, 0.1))


def test_sample_mix_follows_the_switch_and_corrects_lambda():
    rng = np.random.default_rng(0)
    assert np.array_equal(sample_mix(rng, MixSpec(0.8, 1.0, prob=0.0), 32, 32), NO_MIX)
    lams, kinds = [], []
    for _ in range(400):
        p = sample_mix(rng, MixSpec(0.8, 1.0, prob=1.0, switch_prob=0.5), 32, 32)
        lams.append(p[0])
        kinds.append(p[1])
        if p[1]:
            y0, y1, x0, x1 = p[2:]
            assert 0 <= y0 <= y1 <= 32 and 0 <= x0 <= x1 <= 32
            assert p[0] == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 1024)
    assert 0.4 < np.mean(kinds) < 0.6 and 0.45 < np.mean(lams) < 0.7  # clipped boxes raise cutmix's lam
    assert all(sample_mix(rng, MixSpec(0.8, 1.0, switch_prob=1.0), 8, 8)[1] == 1 for _ in range(20))
    assert all(sample_mix(rng, MixSpec(0.8, 0.0), 8, 8)[1] == 0 for _ in range(20))
    a = sample_mix(np.random.default_rng(5), MixSpec(0.8, 1.0), 32, 32)
    assert np.array_equal(a, sample_mix(np.random.default_rng(5), MixSpec(0.8, 1.0), 32, 32))  # keyed


def test_soft_target_and_binary_cross_entropy_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax [0.25, 0.75]
    t = torch.tensor([[0.5, 0.5]])
    assert float(soft_target_cross_entropy(logits, t)) == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)))
    z = torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    # soft targets of label smoothing = torch's (and timm's LabelSmoothingCrossEntropy) smoothed CE
    torch.testing.assert_close(soft_target_cross_entropy(z, smooth_one_hot(y, 5, 0.1)),
                               F.cross_entropy(z, y, label_smoothing=0.1))
    sig = torch.sigmoid(torch.tensor([[2.0, -1.0]]))
    want = -(0.9 * torch.log(sig[0, 0]) + 0.1 * torch.log(1 - sig[0, 0])
             + 0.2 * torch.log(sig[0, 1]) + 0.8 * torch.log(1 - sig[0, 1])) / 2
    got = binary_cross_entropy(torch.tensor([[2.0, -1.0]]), torch.tensor([[0.9, 0.2]]))
    assert float(got) == pytest.approx(float(want))
    with pytest.raises(ValueError, match="labels must lie in"):
        smooth_one_hot(torch.tensor([-1, 2]), 3)


def test_method_forward_uses_the_batch_mix_and_the_chosen_loss():
    spec, _ = vit_spec(**BEIT_LIKE)
    m = FineTune(ft_cfg(backbone=spec, label_smoothing=0.1, drop_path=0.0))
    m.eval()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    mix = [0.6, 0.0, 0, 0, 0, 0]
    xm, t = mix_batch(x, y, mix, 10, 0.1)
    want = soft_target_cross_entropy(m.classify(xm), t)
    torch.testing.assert_close(m({"images": x, "labels": y, "mix": mix})["loss"], want)
    m2 = FineTune(ft_cfg(backbone=spec, loss="bce", label_smoothing=0.0, drop_path=0.0))
    m2.load_state_dict(m.state_dict())
    m2.eval()
    torch.testing.assert_close(m2({"images": x, "labels": y})["loss"],
                               F.binary_cross_entropy_with_logits(m2.classify(x), F.one_hot(y, 10).float()))


# ------------------------------------------------------------------------------------------------ random erasing
def test_random_erasing_boxes_and_keyed_noise():
    from engine.data.random_erasing import apply_erasing, sample_erasing

    boxes = sample_erasing(np.random.default_rng(0), 200, 32, 32, prob=1.0)
    top, left, h, w = boxes.T
    assert (h > 0).mean() > 0.9 and ((h < 32) & (w < 32)).all()
    assert (top + h <= 32).all() and (left + w <= 32).all()
    area = (h * w)[h > 0] / 1024
    assert area.min() >= 0.015 and area.max() <= 0.36
    assert (sample_erasing(np.random.default_rng(0), 50, 32, 32, prob=0.0)[:, 2] == 0).all()
    x = torch.zeros(2, 3, 8, 8)
    b = np.array([[1, 2, 3, 4], [0, 0, 0, 0]])
    a1 = apply_erasing(x.clone(), b, seed=7)
    a2 = apply_erasing(x.clone(), b, seed=7)
    assert torch.equal(a1, a2) and (a1[0, :, 1:4, 2:6] != 0).all()
    mask = torch.ones_like(a1, dtype=torch.bool)
    mask[0, :, 1:4, 2:6] = False
    assert (a1[mask] == 0).all()
    assert not torch.equal(a1, apply_erasing(x.clone(), b, seed=8))


def test_parse_randaug_strings():
    from engine.data.randaugment import parse_randaug

    s = parse_randaug("rand-m9-mstd0.5-inc1")
    assert (s.n, s.m, s.mstd, s.p, s.increasing) == (2, 9.0, 0.5, 0.5, True)
    assert parse_randaug("none") is None and parse_randaug(None) is None
    s = parse_randaug("rand-m7-n3-p0.8-mstd101")
    assert (s.n, s.m, s.p, s.increasing) == (3, 7.0, 0.8, False) and s.mstd == math.inf
    with pytest.raises(ValueError, match="unknown section 'x3'"):
        parse_randaug("rand-m9-x3")
    with pytest.raises(ValueError, match="expected a string like"):
        parse_randaug("auto-v0")


def test_finetune_method_refuses_to_run_without_a_backbone():
    with pytest.raises(ValueError, match="run by python -m engine.finetune"):
        FineTune(ft_cfg(backbone=None))


def test_build_encoder_round_trips_configs():
    from engine.models.convnext import build_convnext
    from engine.models.resnet import build_resnet

    for enc in (build_vit("vit_femto", **BEIT_LIKE), build_resnet("resnet_femto"), build_convnext("convnext_femto")):
        kind = enc.config.get("arch", "vit")
        again = build_encoder(kind, dict(enc.config))
        assert list(again.state_dict()) == list(enc.state_dict())


# ------------------------------------------------------------------------------------------------ Swin (SimMIM)
def swin_spec(name="swin_pico", **kw):
    from engine.models.swin import build_swin

    enc = build_swin(name, use_mask_token=True, **kw)
    return {"kind": "swin", "config": dict(enc.config), "source": None, "source_method": "simmim"}, enc


def test_swin_layer_ids_follow_simmim_get_swin_layer_by_hand():
    """SimMIM get_swin_layer, our (timm's) names: the merging SimMIM calls layers.{s-1}.downsample is
    layers.{s}.downsample here and takes sum(depths[:s]), the id of the block before it."""
    from engine.methods.finetune import swin_layer_ids

    tiny, N = swin_layer_ids((2, 2, 6, 2))
    assert N == 12
    names = {"mask_token": 0, "patch_embed.proj.weight": 0, "patch_embed.norm.bias": 0,
             "layers.0.blocks.0.attn.qkv.weight": 1, "layers.0.blocks.1.attn.relative_position_bias_table": 2,
             "layers.1.downsample.reduction.weight": 2, "layers.1.downsample.norm.weight": 2,
             "layers.1.blocks.0.norm1.weight": 3, "layers.1.blocks.1.mlp.fc2.bias": 4,
             "layers.2.downsample.reduction.weight": 4, "layers.2.blocks.0.attn.proj.weight": 5,
             "layers.2.blocks.5.mlp.fc1.weight": 10, "layers.3.downsample.norm.bias": 10,
             "layers.3.blocks.0.norm2.weight": 11, "layers.3.blocks.1.attn.qkv.bias": 12,
             "norm.weight": 13, "head.fc.weight": 13, "absolute_pos_embed": 13}  # APE: official else-branch
    assert {n: tiny(n) for n in names} == names
    pico, N = swin_layer_ids((2, 2, 2))  # swin_pico (3 stages)
    assert N == 6
    assert [pico(n) for n in ("patch_embed.proj.bias", "layers.0.blocks.1.norm1.weight",
                              "layers.1.downsample.reduction.weight", "layers.2.downsample.norm.weight",
                              "layers.2.blocks.1.mlp.fc2.weight", "norm.bias")] == [0, 2, 2, 4, 6, 7]
    base, N = swin_layer_ids((2, 2, 18, 2))  # Swin-B: 26 ids, as SimMIM's num_layers + 2
    assert N == 24 and base("layers.2.blocks.17.attn.qkv.weight") == 22 and base("layers.3.downsample.norm.weight") \
        == 22 and base("layers.3.blocks.1.mlp.fc2.weight") == 24 and base("norm.weight") == 25


def test_swin_groups_lr_scale_and_weight_decay_by_hand():
    """swin_pico with layer decay 0.9: 8 ids, lr_scale = 0.9^(7 - id); no wd on 1-D, biases, rel-pos tables."""
    spec, _ = swin_spec()
    m = FineTune(ft_cfg(backbone=spec, layer_decay=0.9, drop_path=0.0, head_init_scale=None))
    table = {n: (g["lr_scale"], g["apply_wd"]) for g in m.optimizer_groups() for n in g["names"]}
    expect = {
        "backbone.patch_embed.proj.weight": (0.9 ** 7, True),
        "backbone.patch_embed.norm.weight": (0.9 ** 7, False),
        "backbone.layers.0.blocks.0.attn.qkv.weight": (0.9 ** 6, True),
        "backbone.layers.0.blocks.0.attn.relative_position_bias_table": (0.9 ** 6, False),
        "backbone.layers.1.downsample.reduction.weight": (0.9 ** 5, True),  # id 2
        "backbone.layers.1.downsample.norm.weight": (0.9 ** 5, False),
        "backbone.layers.1.blocks.1.mlp.fc1.weight": (0.9 ** 3, True),      # id 2 + 1 + 1
        "backbone.layers.2.blocks.1.attn.qkv.bias": (0.9 ** 1, False),      # id 6
        "backbone.norm.weight": (1.0, False),                               # the final norm is kept
        "head.weight": (1.0, True),
        "head.bias": (1.0, False),
    }
    for name, (scale, wd) in expect.items():
        assert table[name][0] == pytest.approx(scale) and table[name][1] == wd, (name, table[name])
    assert "backbone.mask_token" not in table and m.fc_norm is None and m.kind == "swin" and not m.sync_batchnorm
    assert len(table) == len([p for p in m.parameters() if p.requires_grad])
    assert sorted({round(s, 12) for s, _ in table.values()}) == sorted(round(0.9 ** k, 12) for k in range(8))
    assert m.head.weight.std() > 0.01  # trunc-normal 0.02, no init scale (SimMIM's Swin)
    # the Swin default decay (0.9) and the preset's recipe
    assert FineTune(ft_cfg(backbone=spec, layer_decay=None)).layer_decay == 0.9
    pre = ft_cfg(config="finetune_simmim_swin_base")
    assert (pre["layer_decay"], pre["window_size"], pre["image_size"], pre["head_init_scale"], pre["drop_path"],
            pre["blr"], pre["warmup_epochs"], pre["epochs"]) == (0.9, 7, 224, 1.0, 0.1, 6.25e-4, 20, 100)


def test_swin_backbone_computes_the_pretrained_function_and_windows():
    """Same resolution: the fine-tuning backbone is the pre-trained encoder (final norm, mean). Another one:
    the per-block tables resampled (geometric, no [CLS] rows) to the new windows, or one clear error."""
    from engine.models.pos_embed import resize_rel_pos_table

    torch.manual_seed(0)
    spec, enc = swin_spec()
    m = FineTune(ft_cfg(backbone=spec, drop_path=0.0))
    assert m.load_pretrained(enc.state_dict()) == ["not used: mask_token"]
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    enc.eval()
    torch.testing.assert_close(m.features(x), enc.forward_features(x).mean(dim=(1, 2)), rtol=1e-5, atol=1e-5)
    big = FineTune(ft_cfg(backbone=spec, drop_path=0.0, image_size=64, window_size=8))
    notes = big.load_pretrained(enc.state_dict())
    assert notes[0] == ("relative position tables resampled (geometric) for the new windows: window 4 -> 8 "
                        "(6 blocks)")  # stage maps 32/16/8, every one tiled by 8x8 windows
    key = "layers.0.blocks.1.attn.relative_position_bias_table"
    assert big.backbone.state_dict()[key].shape == (15 * 15, 2)
    torch.testing.assert_close(big.backbone.state_dict()[key],
                               resize_rel_pos_table(enc.state_dict()[key], (4, 4), (8, 8), with_cls=False))
    assert big.classify(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"stage maps 24/12/6 .* 4x4 windows do not tile .* give --window-size "
                                         r"3 or 6"):
        FineTune(ft_cfg(backbone=spec, image_size=48))
    with pytest.raises(ValueError, match="give --window-size"):  # --init random, the model's window
        FineTune(ft_cfg(backbone={"kind": "swin", "config": None, "source": None, "source_method": None},
                        model="swin_pico", image_size=48))
    assert FineTune(ft_cfg(backbone=spec, image_size=48, window_size=6)).backbone.config["window_size"] == 6


@pytest.fixture
def _keep_signal_handlers():
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_simmim_swin_pico_pretrain_then_finetune_cli(tmp_path, capsys, _keep_signal_handlers):
    """engine.pretrain --method simmim --model swin_pico (3 steps), then engine.finetune from it (evaluated,
    eval.json) and from --init random --model swin_pico (3 steps each): both finish and log finite losses."""
    import json
    from pathlib import Path

    from engine import finetune as ft
    from engine import pretrain as pt
    from engine.trainer import checkpoint as ckpt

    pre = tmp_path / "pre"
    assert pt.main(["--method", "simmim", "--model", "swin_pico", "--max-steps", "3", "--batch-size", "16",
                    "--num-threads", "1", "--output-dir", str(pre), "--print-every", "1000", "--no-final-knn"]) == 0
    capsys.readouterr()
    fast = ["--no-compare-random", "--max-steps", "3", "--train-fraction", "0.1", "--batch-size", "16", "--epochs",
            "1", "--eval-every", "1", "--num-threads", "1", "--print-every", "1"]
    from engine.data import builtin_dataset

    train_only = tmp_path / "train-only"  # no val/: the random-init run skips the (slow on CPU) evaluation
    train_only.mkdir()
    (train_only / "train").symlink_to(Path(builtin_dataset(image_size=32)) / "train", target_is_directory=True)
    runs = {"pretrained": ["--checkpoint", str(pre)],
            "random": ["--init", "random", "--model", "swin_pico", "--checkpoint", "", "--data", str(train_only)]}
    for init, args in runs.items():
        out_dir = tmp_path / f"ft-{init}"
        code = ft.main([*args, "--output-dir", str(out_dir), *fast])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "backbone swin" in out and "trained 3/" in out and "layer decay 0.75" in out, out
        losses = [json.loads(x)["loss"] for x in open(out_dir / "log.jsonl") if '"loss"' in x]
        assert len(losses) >= 3 and all(math.isfinite(v) for v in losses), losses
        assert ckpt.load(out_dir / ckpt.LAST)["config"]["backbone"]["kind"] == "swin"
        if init == "pretrained":
            assert f"pretrained init from {pre}" in out and "note: not used: mask_token" in out, out
    res = json.loads((pre / "eval.json").read_text())["finetune/cpu"]
    assert 0 <= res["finetune_top1"] <= 100
