"""DINO: loss vs a naive pairwise implementation, teacher = EMA only, centering, frozen last layer, training."""

import math

import pytest
import torch
import torch.nn.functional as F

from engine.methods import build_method
from engine.methods.dino import dino_loss

CFG = dict(model="vit_femto", image_size=32, out_dim=64, head_hidden_dim=32, bottleneck_dim=16, local_crops=2,
           drop_path=0.1, pool="cls", momentum_teacher=0.9, freeze_last_layer=1, use_abs_pos_emb=True,
           warmup_teacher_temp_epochs=2, teacher_temp=0.07)


def crops(b=4, n_local=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)] + \
           [torch.randn(b, 3, 16, 16, generator=g) for _ in range(n_local)]


def naive_loss(s, t, center, ncrops, st, tt):
    s_chunks = (s / st).chunk(ncrops)
    t_chunks = F.softmax((t - center) / tt, dim=-1).chunk(2)
    total, n = 0.0, 0
    for iq, q in enumerate(t_chunks):
        for v in range(ncrops):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s_chunks[v], dim=-1), dim=-1).mean()
            n += 1
    return total / n


def test_loss_matches_naive_pairs_float64():
    torch.manual_seed(0)
    B, K, n = 5, 37, 4
    s = torch.randn(n * B, K, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2 * B, K, dtype=torch.float64)
    c = torch.randn(1, K, dtype=torch.float64) * 0.1
    got = dino_loss(s, t, c.float(), n, 2, 0.1, 0.04)
    ref = naive_loss(s.float(), t.float(), c.float(), n, 0.1, 0.04)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    g1, = torch.autograd.grad(got, s)
    s2 = s.detach().clone().requires_grad_(True)
    g2, = torch.autograd.grad(naive_loss(s2.float(), t.float(), c.float(), n, 0.1, 0.04), s2)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 crops"):
        dino_loss(s[:B], t, c, 1, 2, 0.1, 0.04)


def test_teacher_is_a_copy_without_grads_and_moves_only_by_ema():
    torch.manual_seed(0)
    m = build_method("dino", CFG)
    s_params, t_params = list(m.student.parameters()), list(m.teacher.parameters())
    assert all(not p.requires_grad for p in t_params)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(s_params, t_params))  # a copy, not an alias
    assert all(torch.equal(a, b) for a, b in zip(s_params, t_params))
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    m.set_progress(0, 1, {"momentum": 0.9, "teacher_temp": 0.04})
    before_t = [p.detach().clone() for p in t_params]
    out = m({"crops": crops()})
    out["loss"].backward()
    assert all(p.grad is None for p in t_params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s_params)
    opt.step()
    # the optimizer did not touch the teacher
    assert all(torch.equal(a, b) for a, b in zip(before_t, t_params))
    m.after_step()
    moved = 0
    for t0, t1, s in zip(before_t, t_params, s_params):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s.detach(), rtol=1e-6, atol=1e-7)
        moved += int(not torch.equal(t0, t1))
    assert moved > 0


def test_center_update_and_temperature():
    torch.manual_seed(0)
    m = build_method("dino", CFG)
    cs = crops()
    with torch.no_grad():
        t_out = m.teacher(cs[:2])
    m({"crops": cs})
    torch.testing.assert_close(m.center, 0.1 * t_out.mean(0, keepdim=True))
    sched = m.schedules(total_steps=100, steps_per_epoch=10)
    assert sched["teacher_temp"][0] == pytest.approx(0.04) and sched["teacher_temp"][-1] == pytest.approx(0.07)
    assert sched["momentum"][0] == pytest.approx(0.9) and sched["momentum"][-1] == pytest.approx(1.0)


def test_multicrop_grouping_equals_per_crop_forward():
    torch.manual_seed(0)
    m = build_method("dino", dict(CFG, drop_path=0.0)).eval()
    cs = crops()
    grouped = m.student(cs)
    separate = torch.cat([m.student.head(m.student.backbone(c, pool="cls")) for c in cs])
    torch.testing.assert_close(grouped, separate, rtol=1e-5, atol=1e-6)


def test_last_layer_frozen_in_first_epoch():
    torch.manual_seed(0)
    m = build_method("dino", CFG)
    for epoch, frozen in ((0, True), (1, False)):
        m.zero_grad(set_to_none=True)
        m.set_progress(0, epoch, {})
        m({"crops": crops()})["loss"].backward()
        m.after_backward()
        g = m.student.head.last_layer.weight_v.grad
        assert (g is None) == frozen
        assert m.student.head.mlp[0].weight.grad is not None


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    m = build_method("dino", dict(CFG, drop_path=0.0, freeze_last_layer=0, use_bn_in_head=True))
    batch = {"crops": crops(b=8)}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(12):
        m.set_progress(step, 1, {"momentum": 0.99, "teacher_temp": 0.04})
        loss = m(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0 and sum(b < a for a, b in zip(losses, losses[1:])) >= 9, losses


# ------------------------------------------------------------------------------ faithful to the original
def test_head_init_as_the_original():
    """Prototypes: nn.Linear's default init (row norm ~ 1/sqrt(3)); MLP: normal std 0.02, zero biases."""
    import math

    from engine.models.heads import DINOHead

    torch.manual_seed(0)
    head = DINOHead(96, out_dim=4096, hidden_dim=256, bottleneck_dim=256)
    rows = head.last_layer.weight_v.norm(dim=1)
    assert abs(float(rows.detach().mean()) - 1 / math.sqrt(3)) < 0.02
    bound = 1 / math.sqrt(256)
    assert float(head.last_layer.weight_v.detach().abs().max()) <= bound + 1e-6
    w = head.mlp[0].weight
    assert abs(float(w.detach().std()) - 0.02) < 0.002 and torch.all(head.mlp[0].bias == 0)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules())
    bn = DINOHead(96, out_dim=64, hidden_dim=32, bottleneck_dim=16, use_bn=True)
    kinds = [type(m).__name__ for m in bn.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]


def test_vit_backbone_has_dino_init_without_rescale():
    torch.manual_seed(0)
    m = build_method("dino", dict(CFG, model="vit_pico"))
    enc = m.student.backbone
    assert enc.config["init_mode"] == "dino"
    stds = [float(b.mlp.fc2.weight.std()) for b in enc.blocks]
    assert all(abs(s / 0.02 - 1) < 0.08 for s in stds), stds  # no 1/sqrt(2 l) rescale


def test_gradients_are_clipped_per_parameter():
    m = build_method("dino", CFG)
    ps = [torch.zeros(3, requires_grad=True), torch.zeros(5, requires_grad=True), torch.zeros(2, requires_grad=True)]
    ps[0].grad = torch.full((3,), 10.0)    # norm 17.3 -> 3
    ps[1].grad = torch.full((5,), 0.1)     # norm 0.22: untouched
    ps[2].grad = torch.tensor([3.0, 4.0])  # norm 5 -> 3
    total = torch.linalg.vector_norm(torch.cat([p.grad for p in ps]))
    m.clip_gradients(ps, 3.0, total)
    norms = [float(p.grad.norm()) for p in ps]
    assert norms[0] == pytest.approx(3.0, rel=1e-5) and norms[2] == pytest.approx(3.0, rel=1e-5)
    torch.testing.assert_close(ps[1].grad, torch.full((5,), 0.1))
    torch.testing.assert_close(ps[2].grad, torch.tensor([1.8, 2.4]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["resnet_femto", "convnext_femto"])
def test_convnet_backbones(model):
    """DINO on a ResNet / ConvNeXt (the original trains ResNet-50): pooled features, head BN synchronisable."""
    torch.manual_seed(0)
    m = build_method("dino", dict(CFG, model=model, use_bn_in_head=True))
    out = m({"crops": crops()})
    out["loss"].backward()
    assert m.student.backbone.config["arch"] == model.split("_")[0]
    assert m.encoder() is m.teacher.backbone and m.encoder()(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in m.student.backbone.parameters())
    n_bn = sum(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())
    assert m.convert_sync_batchnorm() == n_bn and n_bn >= 4  # head BN of student and teacher (+ ResNet BNs)


def test_collapse_monitor_values():
    from engine.methods.dino import collapse_stats

    K, N = 64, 16
    uniform = collapse_stats(torch.zeros(N, K), torch.zeros(1, K), 0.04)
    assert float(uniform["teacher_mi"]) == pytest.approx(0.0, abs=1e-6)
    assert float(uniform["teacher_entropy_rel"]) == pytest.approx(1.0, abs=1e-6)
    assert float(uniform["teacher_std"]) == 0.0
    one = torch.full((N, K), -50.0)
    one[:, 3] = 50.0  # every image -> prototype 3: dominant collapse, also MI 0
    dom = collapse_stats(one, torch.zeros(1, K), 0.04)
    assert float(dom["teacher_mi"]) == pytest.approx(0.0, abs=1e-4) and float(dom["teacher_entropy"]) < 1e-3
    spread = torch.full((N, K), -50.0)
    spread[torch.arange(N), torch.arange(N)] = 50.0  # image i -> prototype i: MI = ln N
    good = collapse_stats(spread, torch.zeros(1, K), 0.04)
    assert float(good["teacher_mi"]) == pytest.approx(math.log(N), rel=1e-4)


def test_monitor_is_logged_every_step_and_warns_once(capsys):
    m = build_method("dino", CFG)
    m.schedules(total_steps=50, steps_per_epoch=10)
    assert m.monitor_after == 20
    keys = {"teacher_mi", "teacher_entropy", "teacher_entropy_rel", "teacher_std"}
    for step in (0, 25, 26):
        m.set_progress(step, 2, {"momentum": 0.99, "teacher_temp": 0.04})
        with torch.no_grad():
            for p in m.teacher.head.last_layer.parameters():
                p.zero_()  # a teacher that maps every image to the same (uniform) output
            out = m({"crops": crops()})
        assert keys <= set(out) and all(out[k].ndim == 0 for k in keys)
    err = capsys.readouterr().err
    assert err.count("dino: WARNING the teacher has collapsed") == 1
    assert "--use-bn-in-head" in err and "--local-crops 0" in err and "uniform" in err


def test_defaults_and_vit_small_preset_are_the_vanilla_100_epoch_run():
    from engine.methods import get_method
    from engine.trainer.config import load_preset

    d = get_method("dino").defaults
    assert (d["teacher_temp"], d["warmup_teacher_temp"], d["warmup_teacher_temp_epochs"]) == (0.04, 0.04, 0)
    assert d["momentum_teacher"] == 0.996 and d["use_bn_in_head"] is False and d["clip_grad"] == 3.0
    p = load_preset("dino_vit_small")[0]["dino"]
    assert (p["teacher_temp"], p["warmup_teacher_temp_epochs"], p["norm_last_layer"]) == (0.04, 0, True)
    assert get_method("dino").sync_batchnorm


def test_dino_method_hands_its_variant_to_the_loader():
    from engine.data import build_pretrain_loader, builtin_dataset
    from engine.methods import build_method, get_method
    from engine.trainer.config import resolve

    cfg = resolve(dict(method="dino", model="vit_femto", out_dim=64, head_hidden_dim=32, bottleneck_dim=16,
                       local_crops=1, local_crops_scale="0.3,0.5", color_jitter=0.0),
                  method_defaults_fn=lambda m: get_method(m).defaults)
    m = build_method("dino", cfg)
    ld = build_pretrain_loader(m.data_recipe(), builtin_dataset(image_size=32), batch_size=8, image_size=32,
                               num_threads=1, backend="torch")
    assert ld.recipe.views[2].scale == (0.3, 0.5) and ld.recipe.views[0].jitter_p == 0.0
    batch = next(iter(ld))
    assert [tuple(c.shape) for c in batch["crops"]] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)]
    with pytest.raises(ValueError, match="local-crops-scale"):
        build_method("dino", dict(cfg, local_crops_scale="0.5"))
