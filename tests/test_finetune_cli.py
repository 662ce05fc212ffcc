"""``python -m engine.finetune`` end to end: from SimMIM / BEiT / BEiT v2 / DINO / SparK (ResNet, ConvNeXt)
checkpoints and exported safetensors, exact resume, refusals with exit codes, eval.json and ``engine.eval all``;
the fine-tuning loader (DALI vs the torch/PIL fallback, RandAugment op by op, the few-label subset)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from _train_helpers import fake_checkpoint, make_cfg, make_trainer, method_cfg
from engine import finetune as ft
from engine.data import builtin_dataset, dali_available
from engine.methods import build_method
from engine.trainer import checkpoint as ckpt

FAST = ["--train-fraction", "0.1", "--batch-size", "32", "--epochs", "1", "--eval-every", "1", "--num-threads", "1",
        "--print-every", "1000"]


@pytest.fixture(autouse=True)
def _keep_signal_handlers():
    """engine.finetune.main installs SIGTERM/SIGINT handlers (as a CLI does); give pytest its own back."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def pretrain(tmp_path, name, **over):
    """A tiny pre-training run (2 steps) written like engine.pretrain writes it."""
    cfg = make_cfg(tmp_path / name, max_steps=2, batch_size=16, **over)
    tr = make_trainer(cfg)
    tr.fit()
    return tmp_path / name


def finetune(capsys, *args):
    code = ft.main(list(args))
    out = capsys.readouterr().out
    return code, out


def last_line(out):
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def simmim_run(tmp_path_factory):
    return pretrain(tmp_path_factory.mktemp("pre"), "simmim", method="simmim", model="vit_femto")


# ------------------------------------------------------------------------------------------------ end to end
def test_simmim_checkpoint_both_runs_eval_json_and_eval_all(simmim_run, tmp_path, capsys):
    code, out = finetune(capsys, "--checkpoint", str(simmim_run), "--output-dir", str(tmp_path / "ft"), *FAST)
    assert code == 0
    line = last_line(out)
    assert line.startswith("finetune_top1 pretrained=") and " random_init=" in line, out
    assert "(EMA: pretrained=" in line, out  # the CPU preset keeps a weight EMA (model_ema: true)
    assert "shared relative position bias copied into the 2 layers' tables" in out
    for run in (tmp_path / "ft", tmp_path / "ft" / "random_init"):
        assert (run / "checkpoint-last.pt").is_file() and (run / "checkpoint-best.pt").is_file()
        best = json.loads((run / "best.json").read_text())
        assert best["metric"] == "top1"
        logs = [json.loads(x) for x in open(run / "log.jsonl")]
        assert any("top1" in r and "top5" in r for r in logs) and any("loss" in r for r in logs)
        assert any("top1_ema" in r and "top5_ema" in r for r in logs)
        assert json.loads((run / "best_ema.json").read_text())["metric"] == "top1_ema"
        assert (run / "checkpoint-best_ema.pt").is_file()
        assert ckpt.load(run / ckpt.LAST)["model_ema"]["updates"] > 0
    res = json.loads((simmim_run / "eval.json").read_text())["finetune/cpu"]
    assert 0 <= res["finetune_top1"] <= 100 and 0 <= res["random_init_top1"] <= 100
    assert 0 <= res["finetune_top1_ema"] <= 100 and 0 <= res["random_init_best_top1_ema"] <= 100
    assert res["train_fraction"] == 0.1
    # the fine-tuned checkpoint is a checkpoint of the same trainer: engine.eval reads it too
    from engine import eval as ev

    assert ev.main(["all", "--checkpoint", str(simmim_run), "--epochs", "2", "--no-save"]) == 0
    table = capsys.readouterr().out
    header = [ln for ln in table.splitlines() if ln.startswith("checkpoint")][0]
    assert "finetune_top1" in header and "knn_top1" in header and "linear_top1" in header
    assert f"{res['finetune_top1']:.2f}" in table
    assert "finetune_top1_ema" in header and f"{res['finetune_top1_ema']:.2f}" in table


def test_resume_is_exact(simmim_run, tmp_path, capsys):
    args = ["--checkpoint", str(simmim_run), "--no-compare-random", *FAST, "--epochs", "2", "--eval-every", "0"]
    assert finetune(capsys, *args, "--output-dir", str(tmp_path / "full"))[0] == 0
    assert finetune(capsys, *args, "--output-dir", str(tmp_path / "part"), "--stop-after", "3")[0] == 0
    torch.manual_seed(123)
    np.random.seed(123)
    code, out = finetune(capsys, *args, "--output-dir", str(tmp_path / "part"), "--resume")
    assert code == 0 and "resume" in out
    full = [json.loads(x)["loss"] for x in open(tmp_path / "full" / "log.jsonl")]
    part = [json.loads(x)["loss"] for x in open(tmp_path / "part" / "log.jsonl")]
    assert len(full) == 8 and part == full  # bitwise (CPU fp32): mixup, RandAugment, erasing, drop path keyed
    a, b = (ckpt.load(tmp_path / run / ckpt.LAST) for run in ("full", "part"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ema_a, ema_b = a["model_ema"]["module"], b["model_ema"]["module"]  # the preset's weight EMA, restored exactly
    assert a["model_ema"]["updates"] == b["model_ema"]["updates"] == 8
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_spark_resnet_and_convnext_checkpoints(tmp_path, capsys):
    for model in ("resnet_femto", "convnext_femto"):
        run = pretrain(tmp_path, model, method="spark", model=model, decoder_width=32)
        code, out = finetune(capsys, "--checkpoint", str(run), "--output-dir", str(tmp_path / f"ft-{model}"),
                             "--no-compare-random", "--max-steps", "2", "--optimizer", "lamb", "--loss", "bce",
                             *FAST)
        assert code == 0, out
        assert "backbone resnet" in out if model.startswith("resnet") else "backbone convnext" in out
        assert last_line(out).startswith("finetune_top1 pretrained=")
        state = ckpt.load(tmp_path / f"ft-{model}" / ckpt.LAST)
        src = ckpt.load(run / ckpt.LAST)["model"]
        assert state["config"]["backbone"]["source_method"] == "spark"
        # the SparK encoder ("net.") went into the dense backbone: same names
        assert {k[len("net."):] for k in src if k.startswith("net.")} == \
            {k[len("backbone."):] for k in state["model"] if k.startswith("backbone.")}


def test_dino_beit_beitv2_checkpoints(tmp_path, capsys):
    dino = pretrain(tmp_path, "dino", method="dino", model="vit_femto", out_dim=64, head_hidden_dim=32,
                    bottleneck_dim=16, local_crops=2)
    torch.manual_seed(3)
    dvae = fake_checkpoint(build_method("dvae", method_cfg("dvae", vocab_size=32, tokenizer_width=16,
                                                           tokenizer_cell=4)), tmp_path / "dvae.pt")
    vqkd = fake_checkpoint(build_method("vqkd", method_cfg("vqkd", vocab_size=32, codebook_dim=8, decoder_depth=1)),
                           tmp_path / "vqkd.pt")
    beit = pretrain(tmp_path, "beit", method="beit", model="vit_femto", tokenizer=str(dvae))
    beitv2 = pretrain(tmp_path, "beitv2", method="beitv2", model="vit_femto", tokenizer=str(vqkd))
    for name, run, pool in (("dino", dino, "cls"), ("beit", beit, "mean"), ("beitv2", beitv2, "mean")):
        code, out = finetune(capsys, "--checkpoint", str(run), "--output-dir", str(tmp_path / f"ft-{name}"),
                             "--no-compare-random", "--max-steps", "2", "--pool", pool, *FAST)
        assert code == 0, out
        assert f"({name})" in out and f"pool {pool}" in out
        assert last_line(out).startswith("finetune_top1 pretrained=")
    # DINO: the teacher's backbone is the one fine-tuned (DINO's evaluation protocol)
    from engine.methods.finetune import load_source

    src = ckpt.load(dino / ckpt.LAST)["model"]
    got = load_source(dino).state_dict
    assert torch.equal(got["patch_embed.proj.weight"], src["teacher.backbone.patch_embed.proj.weight"])


def test_exported_safetensors_and_another_resolution(simmim_run, tmp_path, capsys):
    from engine.eval import encoder_from_checkpoint, load_checkpoint
    from engine.export import export
    from engine.methods.finetune import load_source

    encoder, _ = encoder_from_checkpoint(load_checkpoint(simmim_run))
    path = export(encoder, tmp_path / "vit.safetensors")
    a, b = load_source(path), load_source(simmim_run)
    assert a.kind == b.kind == "vit" and a.config == b.config and set(a.state_dict) == set(b.state_dict)
    for k, v in a.state_dict.items():
        if k != "mask_token":  # not exported (a pre-training-only tensor), not used by fine-tuning
            assert torch.equal(v, b.state_dict[k]), k
    code, out = finetune(capsys, "--checkpoint", str(path), "--output-dir", str(tmp_path / "ft48"), "--image-size",
                         "48", "--no-compare-random", "--max-steps", "2", *FAST)
    assert code == 0, out
    assert "relative position tables resampled (geometric) from window (8, 8) to (12, 12)" in out
    assert json.loads((tmp_path / "eval.json").read_text())["finetune/cpu"]["finetune_top1"] >= 0


# ------------------------------------------------------------------------------------------------ refusals
def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "engine.finetune", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("args,code,needle", [
    (["--layer-decay", "0"], 2, "--layer-decay must be in (0,1]"),
    (["--init", "foo"], 2, "--init must be pretrained, random"),
    (["--method", "simmim"], 2, "runs --method finetune"),
    (["--randaug", "rand-q3", "--init", "random", "--checkpoint", ""], 2, "--randaug 'rand-q3': unknown section"),
    (["--checkpoint", "/nonexistent/run"], 5, "no checkpoint at /nonexistent/run"),
])
def test_refusals_are_one_line_with_their_exit_code(args, code, needle, tmp_path):
    out = run_cli(*args, "--output-dir", str(tmp_path / "o"))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == code, out.stderr
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("python -m engine.finetune: error:"), lines


def test_preset_checkpoint_missing_names_the_pretraining_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no output/pretrain here
    with pytest.raises(SystemExit) as exc:
        ft.main([])
    assert exc.value.code == 5
    assert "run python -m engine.pretrain first" in capsys.readouterr().err


def test_a_tokenizer_checkpoint_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    m = build_method("dvae", method_cfg("dvae", vocab_size=32, tokenizer_width=16, tokenizer_cell=4))
    path = tmp_path / "dvae.pt"
    ckpt.save_atomic({"model": m.state_dict(), "method": "dvae", "config": dict(m.cfg), "encoder_config": {}}, path)
    with pytest.raises(SystemExit) as exc:
        ft.main(["--checkpoint", str(path), "--output-dir", str(tmp_path / "o")])
    assert exc.value.code == 5 and "is a tokenizer, not an encoder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ data
def test_class_subset_is_per_class_and_fixed():
    from engine.data.finetune_recipe import class_subset

    labels = np.repeat(np.arange(4), [10, 20, 30, 3])
    idx = class_subset(labels, 0.1)
    assert np.bincount(labels[idx]).tolist() == [1, 2, 3, 1]
    assert np.array_equal(idx, class_subset(labels, 0.1)) and np.array_equal(class_subset(labels, 1.0), np.arange(63))
    with pytest.raises(ValueError, match="train_fraction"):
        class_subset(labels, 0.0)


@pytest.mark.skipif(not dali_available()[0], reason="needs NVIDIA DALI")
def test_randaugment_ops_dali_match_the_pil_fallback():
    from nvidia.dali import fn, pipeline_def

    from engine.data import randaugment as ra

    S, names = 32, ra.OPS_INCREASING
    spec = ra.RandAugSpec(n=1)

    @pipeline_def(enable_conditionals=True)
    def graph():
        x = fn.external_source(name="img", batch=True, layout="HWC")
        return ra.dali_randaugment(x, {k: fn.external_source(name=k, batch=True) for k in ra.input_names(spec)},
                                   1, S, "cpu")

    pipe = graph(batch_size=len(names), num_threads=1, device_id=None, prefetch_queue_depth=1, seed=0)
    pipe.build()
    yy, xx = np.mgrid[0:S, 0:S]
    rng = np.random.default_rng(0)
    base = np.stack([xx * 6 + 20, yy * 5 + 40, (xx + yy) * 3 + 10], -1)
    imgs = np.clip(base[None] + rng.integers(0, 25, (len(names), S, S, 3)), 0, 255).astype(np.uint8)
    for negate in (False, True):
        feed = {"ra0_op": np.full(len(names), -1, np.int32), "ra0_mat": np.tile(np.eye(2, 3, dtype=np.float32),
                                                                                 (len(names), 1, 1)),
                "ra0_f": np.zeros(len(names), np.float32), "ra0_u8": np.zeros(len(names), np.uint8)}
        for i, name in enumerate(names):
            kind, mat, f, u8 = ra.op_arguments(name, 9.0, negate, S, S)
            feed["ra0_op"][i], feed["ra0_f"][i], feed["ra0_u8"][i] = kind, f, u8
            if mat is not None:
                feed["ra0_mat"][i] = mat
        pipe.feed_input("img", imgs)
        for k, v in feed.items():
            pipe.feed_input(k, v)
        pipe.schedule_run()
        out = np.array(pipe.outputs()[0].as_tensor())
        for i, name in enumerate(names):
            ref = ra.pil_randaugment(torch.from_numpy(imgs[i]).permute(2, 0, 1).contiguous(), feed, i, 1)
            diff = np.abs(ref.permute(1, 2, 0).numpy().astype(int) - out[i].astype(int))
            if feed["ra0_op"][i] == ra.AFFINE:  # bilinear; differences at the edge of the filled area only
                assert diff.mean() < 2.0 and np.mean(diff > 1) < 0.1, (name, diff.mean())
            else:  # point ops exact, AutoContrast within one grey level
                assert diff.max() <= (1 if name == "AutoContrast" else 0), (name, diff.max())
            assert not np.array_equal(out[i], imgs[i]), name  # magnitude 9 changes every image


@pytest.mark.skipif(not dali_available()[0], reason="needs NVIDIA DALI")
def test_finetune_loader_dali_matches_the_fallback_and_resumes():
    from engine.data.finetune_recipe import FinetuneLoader, FinetuneRecipe

    root = builtin_dataset(image_size=32)
    recipe = FinetuneRecipe(32)
    loaders = [FinetuneLoader(root, recipe, batch_size=16, seed=1, num_threads=1, backend=be, train_fraction=0.2)
               for be in ("dali", "torch")]
    batches = [list(L) for L in loaders]
    assert len(batches[0]) == len(loaders[0]) == loaders[0].num_samples // 16 > 0
    for a, b in zip(*batches):
        assert set(a) == {"images", "labels", "mix"} and a["images"].shape == (16, 3, 32, 32)
        assert torch.equal(a["labels"], b["labels"]) and a["mix"] == b["mix"]
        assert float((a["images"] - b["images"]).abs().mean()) < 0.05
    # resume: a restored loader yields exactly the batch that came next
    L = loaders[0]
    L.set_epoch(3)
    it = iter(L)
    next(it)
    state = L.state_dict()
    want = next(it)
    del it
    R = FinetuneLoader(root, recipe, batch_size=16, seed=1, num_threads=1, backend="dali", train_fraction=0.2)
    R.load_state_dict(state)
    R.set_epoch(3)
    got = next(iter(R))
    assert torch.equal(got["images"], want["images"]) and got["mix"] == want["mix"]


@pytest.mark.cuda
@pytest.mark.skipif(not dali_available()[0], reason="needs NVIDIA DALI")
def test_gpu_finetune_pipeline_matches_cpu(device):
    """--device cuda: the GPU graph (nvJPEG, GPU RandAugment branches) gives the CPU graph's batch on the GPU."""
    if device.type != "cuda":
        pytest.skip("needs --device cuda")
    from engine.data.finetune_recipe import FinetuneLoader, FinetuneRecipe

    root = builtin_dataset(image_size=32)

    def first(dev):
        return next(iter(FinetuneLoader(root, FinetuneRecipe(32), batch_size=16, seed=2, num_threads=1, device=dev)))

    cpu, gpu = first("cpu"), first("cuda")
    assert gpu["images"].device.type == "cuda" and gpu["labels"].device.type == "cuda"
    assert torch.equal(cpu["labels"], gpu["labels"].cpu()) and cpu["mix"] == gpu["mix"]
    assert float((cpu["images"] - gpu["images"].cpu()).abs().mean()) < 0.05
