"""Evaluation: weighted k-NN against a direct implementation, linear probe, feature extraction, CLI."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from engine.eval import extract_features, knn_classify, linear_probe


def direct_knn(trf, trl, tef, k, T, C):
    trf, tef = F.normalize(trf, dim=1), F.normalize(tef, dim=1)
    preds = []
    for q in tef:
        sims = trf @ q
        idx = sims.argsort(descending=True)[:k]
        votes = torch.zeros(C)
        for i in idx:
            votes[trl[i]] += torch.exp(sims[i] / T)
        preds.append(int(votes.argmax()))
    return torch.tensor(preds)


def test_knn_matches_direct_vote():
    g = torch.Generator().manual_seed(0)
    C, D = 5, 7
    centers = torch.randn(C, D, generator=g) * 2
    trl = torch.randint(0, C, (203,), generator=g)
    trf = centers[trl] + torch.randn(203, D, generator=g)
    tel = torch.randint(0, C, (61,), generator=g)
    tef = centers[tel] + torch.randn(61, D, generator=g)
    res = knn_classify(trf, trl, tef, tel, k=20, temperature=0.07, num_classes=C, chunk=17)
    pred = direct_knn(trf, trl, tef, 20, 0.07, C)
    assert res["knn_top1"] == pytest.approx(100.0 * (pred == tel).float().mean().item())
    assert 60 < res["knn_top1"] <= res["knn_top5"] <= 100


def test_knn_bad_inputs():
    with pytest.raises(ValueError, match="features"):
        knn_classify(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="k must be"):
        knn_classify(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 3), torch.zeros(2, dtype=torch.long), k=0)


def test_linear_probe_separable_and_random_labels():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 4, generator=g)
    x = torch.randn(400, 16, generator=g)
    y = (x @ w).argmax(1)
    res = linear_probe(x[:300], y[:300], x[300:], y[300:], epochs=100, lr=0.1, batch_size=64)
    assert res["linear_top1"] > 92
    yr = torch.randint(0, 4, (400,), generator=g)
    chance = linear_probe(x[:300], yr[:300], x[300:], yr[300:], epochs=30, lr=0.1)
    assert chance["linear_top1"] < 50


def test_extract_features_over_an_eval_loader():
    from engine.data import build_eval_loader, builtin_dataset
    from engine.models import build_vit

    root = builtin_dataset(image_size=32)
    loader = build_eval_loader(str(root), split="val", batch_size=100, image_size=32, num_threads=1)
    enc = build_vit("vit_femto")
    f, y = extract_features(enc, loader, pool="mean")
    n = sum(1 for p in (root / "val").rglob("*.png"))
    assert f.shape == (n, 48) and y.shape == (n,) and set(y.tolist()) == set(range(10))
    assert enc.training  # mode restored


def test_eval_cli_knn_and_linear(tmp_path):
    run = [sys.executable, "-m", "engine.pretrain", "--method", "simmim", "--model", "vit_femto", "--max-steps", "2",
           "--batch-size", "32", "--output-dir", str(tmp_path), "--no-final-knn", "--num-threads", "1"]
    assert subprocess.run(run, capture_output=True, text=True).returncode == 0
    out = subprocess.run([sys.executable, "-m", "engine.eval", "knn", "--checkpoint", str(tmp_path), "--k", "5"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    top1 = float(line.split()[0].split("=")[1])
    assert line.startswith("knn_top1=") and 10 < top1 <= 100
    out = subprocess.run([sys.executable, "-m", "engine.eval", "linear", "--checkpoint", str(tmp_path), "--epochs", "5"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1].startswith("linear_top1="), out.stderr
    saved = json.loads((tmp_path / "eval.json").read_text())["pretrained/mean"]
    assert saved["knn_top1"] == pytest.approx(top1, abs=0.006) and "linear_top1" in saved and saved["step"] == 2
    out = subprocess.run([sys.executable, "-m", "engine.eval", "all", "--checkpoint", str(tmp_path), str(tmp_path),
                          "--epochs", "2", "--k", "5", "--no-save"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    header, rule, *rows = out.stdout.strip().splitlines()
    assert header.split() == ["checkpoint", "knn_top1", "knn_top5", "linear_top1", "step"] and len(rows) == 2
    assert float(rows[0].split()[1]) == pytest.approx(top1, abs=0.006)
    bad = subprocess.run([sys.executable, "-m", "engine.eval", "knn", "--checkpoint", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "no checkpoint" in bad.stderr


def test_finetune_columns_read_eval_json_with_and_without_ema(tmp_path):
    import json

    from engine.eval import finetune_columns

    path = tmp_path / "eval.json"
    assert finetune_columns(tmp_path) == {}
    path.write_text(json.dumps({"knn": {"top1": 50.0}, "finetune/cpu": {
        "finetune_top1": 80.0, "finetune_top1_ema": 79.5, "random_init_top1": 70.0, "random_init_top1_ema": 69.0}}))
    assert finetune_columns(tmp_path) == {"finetune_top1": 80.0, "finetune_top1_ema": 79.5}
    assert finetune_columns(tmp_path, random_init=True) == {"finetune_top1": 70.0, "finetune_top1_ema": 69.0}
    path.write_text(json.dumps({"finetune/cpu": {"finetune_top1": 80.0},
                                "finetune/x": {"finetune_top1": 81.0, "finetune_top1_ema": 82.0}}))
    assert finetune_columns(tmp_path) == {"finetune_top1[cpu]": 80.0, "finetune_top1[x]": 81.0,
                                          "finetune_top1_ema[x]": 82.0}
