"""LAMB: steps equal a per-tensor float64 transcription of the update rule; trust ratio only where weight decay
is (unless always_adapt); exact resume from a state dict; the trainer builds it from --optimizer lamb."""

import copy

import pytest
import torch

from engine.trainer.config import ConfigError, resolve
from engine.trainer.lamb import Lamb
from engine.trainer.optim import build_optimizer


def reference_lamb(params, grads_per_step, lr, betas, eps, wd, always_adapt=False, trust_clip=None):
    """The update rule written out per tensor in float64 (module docstring of engine/trainer/lamb.py)."""
    b1, b2 = betas
    p = [t.detach().double().clone() for t in params]
    m = [torch.zeros_like(t) for t in p]
    v = [torch.zeros_like(t) for t in p]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            g = g.double()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            u = (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps) + wd * p[i]
            r = 1.0
            if wd != 0 or always_adapt:
                wn, un = float(p[i].norm()), float(u.norm())
                r = wn / un if wn > 0 and un > 0 else 1.0
                if trust_clip is not None:
                    r = min(r, trust_clip)
            p[i] = p[i] - lr * r * u
    return p


def _run(opt_params, params, grads_per_step, **kw):
    opt = Lamb(opt_params, **kw)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return opt


@pytest.mark.parametrize("wd,always_adapt,trust_clip", [(0.05, False, None), (0.0, False, None), (0.0, True, None),
                                                         (0.1, False, 0.5)])
def test_matches_float64_reference(wd, always_adapt, trust_clip):
    shapes = [(13, 7), (5,), (3, 4, 3), (1,)]
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    with torch.no_grad():
        params[3].zero_()  # ||p|| = 0: trust ratio falls back to 1
    grads = [[torch.randn(s, dtype=torch.float64) for s in shapes] for _ in range(4)]
    expected = reference_lamb(params, grads, 1e-2, (0.9, 0.95), 1e-6, wd, always_adapt, trust_clip)
    _run(params, params, grads, lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=wd, always_adapt=always_adapt,
         trust_clip=trust_clip)
    for got, exp in zip(params, expected):
        torch.testing.assert_close(got.detach(), exp, rtol=1e-12, atol=1e-12)


def test_trust_ratio_makes_the_step_size_scale_free():
    """With weight decay the relative step ||dp|| / ||p|| is lr at every step, whatever the gradient scale."""
    for scale in (1e-4, 1e2):
        p = torch.nn.Parameter(torch.randn(64, 32))
        opt = Lamb([p], lr=1e-3, weight_decay=0.01)
        before = p.detach().clone()
        p.grad = torch.randn_like(p) * scale
        opt.step()
        assert float((p.detach() - before).norm() / before.norm()) == pytest.approx(1e-3, rel=1e-4)


def test_params_without_grad_are_skipped_and_fp32_matches_reference():
    a = torch.nn.Parameter(torch.randn(9, 5))
    b = torch.nn.Parameter(torch.randn(4))
    b0 = b.detach().clone()
    grads = [[torch.randn(9, 5)] for _ in range(3)]
    expected = reference_lamb([a], grads, 1e-3, (0.9, 0.999), 1e-6, 0.02)
    opt = Lamb([a, b], lr=1e-3, weight_decay=0.02)
    for (g,) in grads:
        a.grad = g
        opt.step()
    torch.testing.assert_close(a.detach().double(), expected[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(b.detach(), b0) and b not in opt.state


def test_state_dict_resume_is_exact():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 11), torch.nn.GELU(), torch.nn.Linear(11, 3))
    x = torch.randn(16, 7)

    def step(model, opt):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    opt = build_optimizer(net, "lamb", (0.9, 0.95), lr=1e-2)
    for g in opt.param_groups:
        g["weight_decay"] = 0.05 if g["apply_wd"] else 0.0
    for _ in range(3):
        step(net, opt)
    net2 = copy.deepcopy(net)
    opt2 = build_optimizer(net2, "lamb", (0.9, 0.95), lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(3):
        step(net, opt)
        step(net2, opt2)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)


def test_bad_arguments_and_config():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for kw, name in [(dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=0.0), "eps"),
                     (dict(weight_decay=-0.1), "weight_decay"), (dict(trust_clip=0.0), "trust_clip")]:
        with pytest.raises(ValueError, match=name):
            Lamb(p, **kw)
    with pytest.raises(ConfigError, match="--optimizer"):
        resolve({"method": "spark", "optimizer": "lars"})
    assert resolve({"config": "spark_resnet50"})["optimizer"] == "lamb"
