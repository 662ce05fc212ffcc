"""DINO: loss vs a naive pairwise implementation, teacher = EMA only, centering, frozen last layer, training."""

import pytest
import torch
import torch.nn.functional as F

from engine.methods import build_method
from engine.methods.dino import dino_loss

CFG = dict(model="vit_femto", image_size=32, out_dim=64, head_hidden_dim=32, bottleneck_dim=16, local_crops=2,
           drop_path=0.1, pool="cls", momentum_teacher=0.9, freeze_last_layer=1, use_abs_pos_emb=True,
           warmup_teacher_temp_epochs=2)


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
    m = build_method("dino", dict(CFG, drop_path=0.0, freeze_last_layer=0))
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
    assert losses[-1] < losses[0] - 0.1, losses
