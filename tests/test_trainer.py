"""Trainer: schedules, parameter groups, atomic checkpoints, exact resume, NaN stop, 2-process DDP (gloo)."""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from _train_helpers import make_cfg, make_trainer
from engine.trainer import NonFiniteLossError, cosine_schedule, scaled_lr, warmup_constant_schedule
from engine.trainer import checkpoint as ckpt
from engine.trainer.config import ConfigError, resolve
from engine.trainer.optim import param_groups


def test_cosine_schedule_values():
    s = cosine_schedule(1.0, 0.1, 11, warmup_steps=4, warmup_start=0.0)
    assert len(s) == 11
    np.testing.assert_allclose(s[:4], [0.0, 0.25, 0.5, 0.75])
    assert s[4] == 1.0 and abs(s[-1] - 0.1) < 1e-12
    mid = 4 + 3  # halfway through the 7 cosine steps
    assert abs(s[mid] - 0.55) < 1e-12
    assert np.all(np.diff(s[4:]) <= 0)
    m = cosine_schedule(0.996, 1.0, 50)
    assert m[0] == 0.996 and m[-1] == 1.0 and np.all(np.diff(m) >= 0)
    t = warmup_constant_schedule(0.04, 0.07, 10, 4)
    np.testing.assert_allclose(t, [0.04, 0.0475, 0.055, 0.0625] + [0.07] * 6)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_schedule(1.0, 0.0, 0)


def test_linear_scaling_rule():
    assert scaled_lr(1.5e-4, 256) == 1.5e-4
    assert scaled_lr(1e-3, 64, world_size=2, accum_steps=2) == 1e-3


def test_param_groups_skip_decay_for_bias_norm_tokens(tmp_path):
    from engine.methods import build_method

    cfg = make_cfg(tmp_path, use_abs_pos_emb=True)
    method = build_method("simmim", cfg)
    groups = {g["apply_wd"]: set(g["names"]) for g in param_groups(method)}
    nodecay, decay = groups[False], groups[True]
    for name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed", "backbone.blocks.0.norm1.weight",
                 "backbone.blocks.0.attn.proj.bias", "backbone.rel_pos_bias.relative_position_bias_table",
                 "backbone.blocks.0.gamma_1", "backbone.blocks.0.attn.q_bias"):
        assert name in nodecay, name
    for name in ("backbone.blocks.0.attn.qkv.weight", "backbone.blocks.1.mlp.fc2.weight",
                 "backbone.patch_embed.proj.weight", "decoder.0.weight"):
        assert name in decay, name
    assert not (nodecay & decay)


def test_schedules_reach_optimizer(tmp_path):
    cfg = make_cfg(tmp_path, lr=1e-3, min_lr=1e-5, weight_decay=0.04, weight_decay_end=0.4, max_steps=3)
    tr = make_trainer(cfg)
    tr.fit()
    lr, wd = tr.schedules["lr"], tr.schedules["wd"]
    assert lr[0] == pytest.approx(1e-3) and lr[-1] == pytest.approx(1e-5) and wd[0] == pytest.approx(0.04)
    assert wd[-1] == pytest.approx(0.4)
    groups = {g["apply_wd"]: g for g in tr.optimizer.param_groups}
    assert groups[True]["weight_decay"] == pytest.approx(0.4) and groups[False]["weight_decay"] == 0.0
    assert groups[True]["lr"] == pytest.approx(1e-5)
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["lr"] == pytest.approx(1e-3) and all(np.isfinite(r["loss"]) for r in records)


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    ckpt.save_atomic({"a": torch.arange(5)}, path)
    good = path.read_bytes()

    def broken_save(obj, fh, *a, **k):
        fh.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic({"a": torch.arange(100)}, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    assert torch.equal(ckpt.load(path)["a"], torch.arange(5))


RESUME_EXTRA = {
    "simmim": {},
    "dino": dict(out_dim=64, head_hidden_dim=32, bottleneck_dim=16, local_crops=2, drop_path=0.1),
    # BatchNorm running statistics in the model state, LAMB state in the optimizer
    "spark": dict(model="resnet_femto", decoder_width=32, optimizer="lamb"),
}


@pytest.mark.parametrize("method,accum", [("simmim", 1), ("dino", 2), ("spark", 1)])
def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, method, accum):
    extra = RESUME_EXTRA[method]
    full = make_trainer(make_cfg(tmp_path / "full", method=method, max_steps=5, accum_steps=accum, **extra))
    ref = full.fit()["history"]
    assert len(ref) == 5
    # interrupted after 2 steps (a pre-emption), then resumed from the output folder's last checkpoint
    part_cfg = make_cfg(tmp_path / "part", method=method, max_steps=5, stop_after=2, accum_steps=accum, **extra)
    first = make_trainer(part_cfg).fit()
    assert first["stopped"] and first["step"] == 2
    torch.manual_seed(999)  # a fresh process would not share the interrupted run's RNG state
    np.random.seed(999)
    resumed_cfg = dict(part_cfg, stop_after=0)
    tr = make_trainer(resumed_cfg)
    out = tr.fit(resume=ckpt.find_resume("auto", tmp_path / "part"))
    assert out["history"] == ref  # bitwise equal losses (CPU fp32)
    for (n, a), b in zip(full.method.state_dict().items(), tr.method.state_dict().values()):
        assert torch.equal(a, b), n


def test_resume_rejects_other_plan(tmp_path):
    make_trainer(make_cfg(tmp_path, max_steps=2)).fit()
    tr = make_trainer(make_cfg(tmp_path, max_steps=3))
    with pytest.raises(ValueError, match="plans 2 steps"):
        tr.fit(resume=tmp_path / ckpt.LAST)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.find_resume(str(tmp_path / "nope.pt"), tmp_path)
    assert ckpt.find_resume("auto", tmp_path / "empty") is None


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path):
    tr = make_trainer(make_cfg(tmp_path, max_steps=6, save_every=1))
    forward = tr.method.forward

    def poisoned(batch):
        out = forward(batch)
        if tr.method.step >= 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    tr.method.forward = poisoned
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 3 .*Last finite checkpoint: .*checkpoint-last.pt \(step 3\)"):
        tr.fit()
    state = ckpt.load(tmp_path / ckpt.LAST)
    assert state["step"] == 3 and all(np.isfinite(state["history"]))
    # the failing step did not touch the parameters: they equal the last good checkpoint
    for n, v in tr.method.state_dict().items():
        assert torch.equal(v, state["model"][n]), n


def test_precision_bf16_and_fp16_run(tmp_path):
    for prec in ("bf16", "fp16"):
        tr = make_trainer(make_cfg(tmp_path / prec, precision=prec, max_steps=2))
        out = tr.fit()
        assert len(out["history"]) == 2 and all(np.isfinite(out["history"]))
        assert tr.scaler.is_enabled() == (prec == "fp16")
        assert "scaler" in ckpt.load(tmp_path / prec / ckpt.LAST)


def test_config_errors(tmp_path):
    from engine.methods import get_method

    fn = lambda m: get_method(m).defaults  # noqa: E731
    with pytest.raises(ConfigError, match="--batch-size must be an integer >= 1"):
        resolve({"batch_size": 0}, fn)
    with pytest.raises(ConfigError, match="--data: no such folder"):
        resolve({"data": str(tmp_path / "missing")}, fn)
    with pytest.raises(ConfigError, match="--precision"):
        resolve({"precision": "fp8"}, fn)
    with pytest.raises(ConfigError, match="no preset or file 'nope'"):
        resolve({"config": "nope"}, fn)
    cfg = resolve({"method": "simmim", "blr": 1e-3, "batch_size": 128}, fn)
    assert cfg["mask_patch_size"] == 16 and cfg["weight_decay_end"] == cfg["weight_decay"]  # preset section + default


# -------------------------------------------------------------------------------------------- DDP (gloo, 2 ranks)
def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from engine.trainer.distributed import cleanup, init_distributed

    dist = init_distributed("cpu")
    torch.manual_seed(0)  # same init on every rank (DDP also broadcasts rank 0's weights)
    cfg = make_cfg(out_dir, max_steps=3, batch_size=8)
    tr = make_trainer(cfg, dist)
    out = tr.fit()
    flat = torch.cat([p.detach().reshape(-1) for p in tr.method.parameters()])
    torch.save({"flat": flat, "history": out["history"], "len": len(tr.loader)}, os.path.join(out_dir, f"rank{rank}.pt"))
    cleanup()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["flat"], r1["flat"])  # gradients were averaged: replicas stay identical
    assert r0["history"] != r1["history"]  # each rank saw its own shard
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]  # rank 0 only, all-reduced metrics
    assert [r["step"] for r in records] == [1, 2, 3]
    for rec, a, b in zip(records, r0["history"], r1["history"]):
        assert rec["loss"] == pytest.approx((a + b) / 2, rel=1e-6)
    state = ckpt.load(tmp_path / ckpt.LAST)
    assert state["step"] == 3
    assert r0["len"] == len(make_trainer(make_cfg(tmp_path / "single", batch_size=8)).loader) // 2


def test_eval_every_epoch_is_logged(tmp_path):
    cfg = make_cfg(tmp_path, batch_size=256, max_steps=0, epochs=1, eval_every=1)
    tr = make_trainer(cfg)
    seen = []

    def fake_eval(encoder):
        seen.append(encoder)
        return {"knn_top1": 12.5}

    tr.eval_fn = fake_eval
    out = tr.fit()
    assert out["step"] == tr.steps_per_epoch == len(tr.loader)
    assert seen == [tr.method.encoder()]
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert records[-1]["knn_top1"] == 12.5 and records[-1]["epoch"] == 0
