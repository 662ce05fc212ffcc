"""Weight EMA (engine.trainer.model_ema, ``--model-ema``): the update by hand (parameters and buffers, fp32,
integer buffers copied, timm V3's warm-up), not a submodule, exact resume, the non-finite guard, DDP; and
``--save-every-epochs`` (fewer checkpoints, the same run, exact resume from a checkpoint between saves)."""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from _train_helpers import make_cfg, make_trainer
from engine.trainer import checkpoint as ckpt
from engine.trainer.loop import NonFiniteLossError
from engine.trainer.model_ema import ModelEma


class Tiny(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lin = nn.Linear(3, 2).to(dtype)
        self.bn = nn.BatchNorm1d(2).to(dtype)


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
            else:
                t.add_(3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_by_hand_parameters_and_buffers_in_fp32(dtype):
    model = Tiny(dtype)
    ema = ModelEma(model, decay=0.9)
    expect = {k: v.double() for k, v in model.state_dict().items()}
    for step in range(3):
        _perturb(model, step)
        ema.update(model)
        for k, v in model.state_dict().items():
            expect[k] = 0.9 * expect[k] + 0.1 * v.double() if v.is_floating_point() else v.double()
    got = ema.module.state_dict()
    assert set(got) == set(expect)
    for k, v in got.items():
        if v.is_floating_point():
            assert v.dtype == torch.float32, k  # kept in fp32 whatever the model's dtype
            torch.testing.assert_close(v.double(), expect[k], rtol=1e-6, atol=1e-6, msg=k)
        else:
            assert torch.equal(v, model.state_dict()[k]), k  # num_batches_tracked is copied
    assert ema.updates == 3
    assert "bn.running_mean" in got and not torch.equal(got["bn.running_mean"], model.bn.running_mean.float())


def test_decay_limits_warmup_and_not_a_submodule():
    model = Tiny()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    keep, follow = ModelEma(model, decay=1.0), ModelEma(model, decay=0.0)
    _perturb(model, 5)
    keep.update(model)
    follow.update(model)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(keep.module.state_dict()[k], start[k]), k
        assert torch.equal(follow.module.state_dict()[k], v), k
    assert all(not p.requires_grad for p in keep.module.parameters())
    assert not keep.module.training
    assert len(list(model.parameters())) == 4  # the EMA copy is not registered in the model
    warm = ModelEma(model, decay=0.9999, warmup=True)
    decays = []
    for _ in range(3):
        decays.append(warm.current_decay())
        warm.update(model)
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    with pytest.raises(ValueError, match="model_ema_decay"):
        ModelEma(model, decay=1.5)


def test_state_dict_round_trip_and_mismatch():
    model = Tiny()
    ema = ModelEma(model, decay=0.5)
    _perturb(model, 1)
    ema.update(model)
    other = ModelEma(Tiny(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    assert all(torch.equal(a, b) for a, b in zip(ema.module.state_dict().values(),
                                                  other.module.state_dict().values()))
    bad = ModelEma(nn.Linear(3, 5), decay=0.5)
    with pytest.raises(ValueError, match="model EMA does not fit"):
        bad.load_state_dict(ema.state_dict())


# ------------------------------------------------------------------------------------------------ in the trainer
def test_trainer_ema_follows_every_optimizer_step(tmp_path):
    cfg = make_cfg(tmp_path, method="spark", model="resnet_femto", decoder_width=32, max_steps=4, model_ema=True,
                   model_ema_decay=0.7)
    tr = make_trainer(cfg)
    expect = {k: v.double().clone() for k, v in tr.method.state_dict().items()}
    after = tr.method.after_step

    def record():
        after()
        for k, v in tr.method.state_dict().items():
            expect[k] = 0.7 * expect[k] + 0.3 * v.double() if v.is_floating_point() else v.double()

    tr.method.after_step = record
    tr.fit()
    got = tr.ema.module.state_dict()
    for k, v in got.items():
        torch.testing.assert_close(v.double(), expect[k], rtol=1e-5, atol=1e-6, msg=k)
    assert tr.ema.updates == 4
    saved = ckpt.load(tmp_path / ckpt.LAST)["model_ema"]
    assert saved["updates"] == 4 and all(torch.equal(saved["module"][k], v) for k, v in got.items())
    assert not any(n.startswith("module.") for n in saved["module"])


@pytest.mark.parametrize("method,extra", [("simmim", {}), ("spark", dict(model="resnet_femto", decoder_width=32))])
def test_resume_restores_the_ema_bitwise(tmp_path, method, extra):
    kw = dict(method=method, max_steps=5, model_ema=True, model_ema_decay=0.8, **extra)
    full = make_trainer(make_cfg(tmp_path / "full", **kw))
    ref = full.fit()["history"]
    make_trainer(make_cfg(tmp_path / "part", stop_after=2, **kw)).fit()
    torch.manual_seed(7)
    np.random.seed(7)
    tr = make_trainer(make_cfg(tmp_path / "part", **kw))
    assert tr.fit(resume=ckpt.find_resume("auto", tmp_path / "part"))["history"] == ref
    for (k, a), b in zip(full.ema.module.state_dict().items(), tr.ema.module.state_dict().values()):
        assert torch.equal(a, b), k
    assert tr.ema.updates == full.ema.updates == 5


def test_resume_of_a_run_without_ema_starts_it_from_the_weights(tmp_path, capsys):
    make_trainer(make_cfg(tmp_path, max_steps=4, stop_after=2)).fit()
    tr = make_trainer(make_cfg(tmp_path, max_steps=4, model_ema=True, model_ema_decay=1.0))
    tr.load(tmp_path / ckpt.LAST)
    assert "has no model EMA" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(tr.ema.module.state_dict().values(),
                                                  tr.method.state_dict().values()))


def test_a_non_finite_ema_is_never_written(tmp_path):
    tr = make_trainer(make_cfg(tmp_path, max_steps=2, model_ema=True))
    tr.fit()
    before = (tmp_path / ckpt.LAST).read_bytes()
    with torch.no_grad():
        next(tr.ema.module.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="model_ema"):
        tr.save()
    assert (tmp_path / ckpt.LAST).read_bytes() == before


def test_ema_is_evaluated_beside_the_model_and_keeps_its_own_best(tmp_path):
    cfg = make_cfg(tmp_path, batch_size=256, max_steps=0, epochs=2, eval_every=1, best_metric="acc",
                   model_ema=True, model_ema_decay=0.5)
    tr = make_trainer(cfg)
    seen = []

    def fake_eval(encoder):
        seen.append(encoder)
        return {"acc": 10.0 if encoder is tr.method.encoder() else 20.0 + len(seen)}

    tr.eval_fn = fake_eval
    tr.fit()
    assert seen == [tr.method.encoder(), tr.ema.module.encoder()] * 2
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl") if "acc" in line]
    assert [(r["acc"], r["acc_ema"]) for r in records] == [(10.0, 22.0), (10.0, 24.0)]
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == 0
    best_ema = json.loads((tmp_path / "best_ema.json").read_text())
    assert best_ema["value"] == 24.0 and best_ema["epoch"] == 1
    assert ckpt.load(tmp_path / "checkpoint-best_ema.pt")["step"] == tr.step
    assert ckpt.load(tmp_path / "checkpoint-best.pt")["step"] == tr.steps_per_epoch


# ------------------------------------------------------------------------------------------------ save less often
def test_save_every_epochs_saves_less_and_resumes_exactly(tmp_path, monkeypatch):
    kw = dict(batch_size=256, max_steps=0, epochs=5, save_every_epochs=2, model_ema=True, model_ema_decay=0.9)
    full = make_trainer(make_cfg(tmp_path / "full", **kw))
    saved = []
    real = ckpt.save_atomic

    def counting(state, path):
        saved.append(state["step"])
        return real(state, path)

    monkeypatch.setattr(ckpt, "save_atomic", counting)
    ref = full.fit()["history"]
    spe = full.steps_per_epoch
    assert saved == [2 * spe, 4 * spe, 5 * spe]  # epochs 2 and 4, and the end (not every epoch)
    saved.clear()
    # a pre-emption in epoch 4 (after the epoch-2 save): SIGTERM's checkpoint, then the same run continues
    part = make_trainer(make_cfg(tmp_path / "part", stop_after=3 * spe + 1, **kw))
    assert part.fit()["stopped"] and saved == [2 * spe, 3 * spe + 1]
    torch.manual_seed(3)
    tr = make_trainer(make_cfg(tmp_path / "part", **kw))
    assert tr.fit(resume=tmp_path / "part" / ckpt.LAST)["history"] == ref
    for a, b in zip(full.ema.module.state_dict().values(), tr.ema.module.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.method.state_dict().values(), tr.method.state_dict().values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ DDP
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from engine.trainer import init_distributed
    from engine.trainer.distributed import cleanup

    dist = init_distributed("cpu")
    tr = make_trainer(make_cfg(root, batch_size=8, max_steps=3, model_ema=True, model_ema_decay=0.5), dist)
    tr.fit()
    flat = torch.cat([v.flatten().float() for v in tr.ema.module.state_dict().values()])
    torch.save({"ema": flat, "ddp_params": sum(1 for _ in tr.model.parameters())}, os.path.join(root, f"r{rank}.pt"))
    cleanup()


def test_ddp_ranks_keep_identical_emas_outside_ddp(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt") for r in (0, 1))
    assert torch.equal(r0["ema"], r1["ema"])
    state = ckpt.load(tmp_path / ckpt.LAST)
    n_model = len([k for k in state["model"]])
    assert len(state["model_ema"]["module"]) == n_model
    assert r0["ddp_params"] == sum(1 for _ in make_trainer(make_cfg(tmp_path / "one")).method.parameters())
