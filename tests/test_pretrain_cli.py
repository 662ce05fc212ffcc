"""`python -m engine.pretrain`: bad values exit 2 with one line; the default job's smoke run; export."""

import json
import pathlib
import subprocess
import sys

import pytest

from engine.methods import available_methods


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "engine.pretrain", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args,needle", [
    (["--method", "mae"], "unknown method 'mae'; available: "),
    (["--data", "/nonexistent/folder"], "--data: no such folder"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--batch-size", "x"], "invalid int value"),
    (["--precision", "fp8"], "--precision must be"),
    (["--config", "nope"], "no preset or file 'nope'"),
    (["--epochs", "0"], "--epochs must be"),
])
def test_bad_cli_values_exit_2_with_one_line(args, needle):
    out = run(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert lines[0].startswith("python -m engine.pretrain: error:")


def test_unknown_method_lists_what_exists():
    out = run("--method", "mae")
    for name in available_methods():
        assert name in out.stderr
    assert "dino" in out.stderr and "simmim" in out.stderr


def test_default_job_smoke_and_export(tmp_path):
    """The default job (SimMIM preset), shortened with --max-steps, ends with the k-NN comparison line."""
    out = run("--max-steps", "4", "--output-dir", str(tmp_path), "--print-every", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("knn_top1 pretrained=") and " random_init=" in last, out.stdout
    pre, rnd = (float(kv.split("=")[1]) for kv in last.split()[1:])
    assert 0 <= pre <= 100 and 0 <= rnd <= 100
    assert "images/s" in out.stdout and "loss" in out.stdout
    records = [json.loads(x) for x in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert (tmp_path / "checkpoint-last.pt").is_file()
    # the job ends by drawing its curves and its method's picture, and names the files
    pictures = [line.split(" ", 1)[1] for line in out.stdout.splitlines() if line.startswith("picture ")]
    names = {pathlib.Path(p).name for p in pictures}
    assert "curves.png" in names and any(n.startswith("reconstruction") for n in names), out.stdout
    for path in pictures:
        assert pathlib.Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # auto-resume of a finished run: nothing left to train, evaluates again
    again = run("--max-steps", "4", "--output-dir", str(tmp_path), "--resume", "--no-final-knn")
    assert again.returncode == 0 and "trained 4/4 steps" in again.stdout and "resume" in again.stdout
    # export the encoder with timm (BEiT layout) names
    exp = subprocess.run([sys.executable, "-m", "engine.export", "--checkpoint", str(tmp_path), "--out",
                          str(tmp_path / "vit.safetensors")], capture_output=True, text=True)
    assert exp.returncode == 0, exp.stderr
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "vit.safetensors"))
    assert {"blocks.0.attn.qkv.weight", "blocks.0.attn.q_bias", "rel_pos_bias.relative_position_bias_table"} <= set(sd)
    assert "mask_token" not in sd and "pos_embed" not in sd


def test_export_key_names_vit_tiny(tmp_path):
    from safetensors import safe_open

    from engine.export import export, timm_model_name
    from engine.models import build_vit

    enc = build_vit("vit_tiny")
    per_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                 "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                 "mlp.fc2.bias"]
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias"} | {f"blocks.{i}.{k}" for i in range(12) for k in per_block}
    path = export(enc, tmp_path / "t.safetensors")
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == expected
        assert f.get_tensor("pos_embed").shape == (1, 197, 192)
        assert f.get_tensor("blocks.3.mlp.fc1.weight").shape == (768, 192)
        assert f.metadata()["timm_model"] == "vit_tiny_patch16_224"
    assert timm_model_name(enc) == "vit_tiny_patch16_224"
    beit = build_vit("vit_femto", qv_bias=True, use_shared_rel_pos_bias=True, use_abs_pos_emb=False, init_values=0.1,
                     use_mask_token=True)
    from engine.export import timm_state_dict

    keys = set(timm_state_dict(beit))
    assert {"blocks.0.attn.q_bias", "blocks.0.gamma_1", "rel_pos_bias.relative_position_bias_table"} <= keys
    assert "mask_token" not in keys and "blocks.0.attn.qkv.bias" not in keys
    ls = build_vit("vit_femto", init_values=0.1)
    assert "blocks.1.ls2.gamma" in set(timm_state_dict(ls))


@pytest.mark.timm
def test_export_against_timm_if_installed(tmp_path):
    timm = pytest.importorskip("timm")
    from engine.export import timm_state_dict
    from engine.models import build_vit

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    missing, unexpected = model.load_state_dict(timm_state_dict(build_vit("vit_tiny")), strict=False)
    assert not missing and not unexpected
