"""`python -m engine.visualize` / engine.viz: pictures from tiny checkpoints written by the real trainer.

Every kind renders a valid, non-blank PNG of its stated size; the compositing and the per-patch
de-normalisation are exact on constructed cases; the [CLS] attention is the last block's softmax row; the
60%-mass mask is minimal; bad arguments exit 2 with one line.
"""

import json
import subprocess
import sys

import numpy as np
import math

import pytest
import torch
from PIL import Image

from engine.data import build_pretrain_loader, builtin_dataset
from engine.methods import build_method, get_method
from engine.trainer import Trainer, seed_everything
from engine.trainer.config import resolve
from engine.visualize import main as cli_main
from engine.viz import attention as vatt
from engine.viz import curves as vcur
from engine.viz import default_job_pictures
from engine.viz import reconstruction as vrec
from engine.viz import tokens as vtok
from engine.viz.common import VizError, figure_size_px, plot_size_px, to_display

RUNS = {
    "simmim": {"model": "vit_femto"},
    "spark": {"model": "resnet_femto", "decoder_width": 32},
    "dino": {"model": "vit_femto", "out_dim": 64, "head_hidden_dim": 32, "bottleneck_dim": 16, "local_crops": 2},
    "dvae": {"model": "vit_femto", "vocab_size": 64, "tokenizer_width": 32, "tokenizer_cell": 4},
    "vqkd": {"model": "vit_femto", "vocab_size": 32, "codebook_dim": 8, "decoder_depth": 1},
}


def train_tiny(method_name, out_dir, steps=2):
    """A 2-step run of the real trainer (torch data backend) writing checkpoint-last.pt and log.jsonl."""
    cli = dict(method=method_name, batch_size=8, max_steps=steps, output_dir=str(out_dir), num_threads=1,
               print_every=1000, final_knn=False, warmup_epochs=0.0, image_size=32, **RUNS[method_name])
    cfg = resolve(cli, method_defaults_fn=lambda m: get_method(m).defaults)
    seed_everything(cfg["seed"])
    method = build_method(method_name, cfg)
    loader = build_pretrain_loader(method.data_recipe(), builtin_dataset(image_size=32), batch_size=8, image_size=32,
                                   seed=cfg["seed"], num_threads=1, backend="torch")
    trainer = Trainer(method, loader, cfg)
    trainer.fit()
    trainer.logger.close()
    return out_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = train_tiny(name, tmp_path_factory.mktemp(f"run_{name}"))
        return cache[name]

    return get


def check_png(path, size):
    """A PNG of exactly ``size`` (w, h) that is not blank: its pixels vary and a good part is not background."""
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == size, (path, im.size, size)
        px = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert px.var() > 100.0, f"{path}: nearly uniform picture (variance {px.var():.1f})"
    not_white = (px.min(-1) < 240).mean()
    assert not_white > 0.05, f"{path}: {not_white:.1%} of the pixels are drawn"


# --------------------------------------------------------------------------------------------- reconstruction
def test_composite_identity_and_visible_masks():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 12, 20, generator=g)
    mask = torch.rand(3, 1, 12, 20, generator=g) > 0.5
    # the identity predictor: every column equals the input (except the masked input's masked pixels)
    out = vrec.composite(images, images.clone(), mask)
    assert torch.equal(out["pasted"], images) and torch.equal(out["full"], images)
    assert torch.equal(out["masked"], torch.where(mask, torch.zeros_like(images), images))
    # an all-visible mask keeps the input whatever the prediction
    other = torch.randn(images.shape, generator=g)
    out = vrec.composite(images, other, torch.zeros_like(mask))
    assert torch.equal(out["pasted"], images) and torch.equal(out["masked"], images)
    # an all-masked mask shows the prediction
    out = vrec.composite(images, other, torch.ones_like(mask))
    assert torch.equal(out["pasted"], other)
    # masked pixels come from the prediction, visible ones from the input
    out = vrec.composite(images, other, mask)
    assert torch.equal(out["pasted"][mask.expand_as(images)], other[mask.expand_as(images)])
    assert torch.equal(out["pasted"][~mask.expand_as(images)], images[~mask.expand_as(images)])
    with pytest.raises(ValueError, match="pix_mask"):
        vrec.composite(images, other, mask.float())
    with pytest.raises(ValueError, match="pred"):
        vrec.composite(images, other[:, :, :4], mask)


def test_patch_denormalise_inverts_the_spark_target():
    from engine.methods.spark import patchify, spark_loss

    g = torch.Generator().manual_seed(2)
    B, C, H, W, p = 2, 3, 12, 18, 6
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * 2 + 0.5
    t = patchify(x, p)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    # the image whose patchify is the target (inverse of patchify's channel-last layout)
    pred = t.reshape(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
    assert spark_loss(pred, x, torch.ones(B, H // p, W // p, dtype=torch.bool), p).item() < 1e-12
    back = vrec.patch_denormalise(pred, x, p)
    torch.testing.assert_close(back, x, rtol=1e-10, atol=1e-10)
    # a zero prediction de-normalises to each patch's mean colour
    flat = vrec.patch_denormalise(torch.zeros_like(x), x, p)
    want = patchify(x, p).mean(-1)  # [B, L]
    got = patchify(flat, p)
    torch.testing.assert_close(got, want.unsqueeze(-1).expand_as(got))


@pytest.mark.parametrize("name", ["simmim", "spark"])
def test_predict_uses_the_methods_masks_and_identity_case(runs, name, monkeypatch):
    from engine.viz.common import build_method_from_state, load_run

    state, _, _ = load_run(runs(name))
    method = build_method_from_state(state)
    images = torch.randn(2, 3, 32, 32)
    out = vrec.predict(method, images, seed=3)
    assert out["pred"].shape == images.shape and out["mask"].shape == (2, 1, 32, 32)
    frac = out["mask"].float().mean().item()
    # exactly the masked fraction of the method's own generator (ratio 0.6 on its unit grid)
    if name == "simmim":
        units = (32 // method.mask_patch) ** 2
        expected = math.ceil(method.ratio * units) / units
    else:
        units = method.grid**2
        expected = (units - round((1 - method.mask_ratio) * units)) / units
    assert frac == pytest.approx(expected)
    # a model that is the identity (SimMIM: pixels; SparK: the per-patch normalised target), all visible
    if name == "simmim":
        monkeypatch.setattr(method, "reconstruct", lambda x, m: x.clone())
    else:
        def normalised(x, active):
            t = x.reshape(2, 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(2, 4, 4, -1)
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
            return t.reshape(2, 4, 4, 3, 8, 8).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 32, 32)
        monkeypatch.setattr(method, "reconstruct", normalised)
    fn = method.mask_fn()
    monkeypatch.setattr(method, "mask_fn", lambda: lambda b, s: {"mask": torch.zeros_like(fn(b, s)["mask"])})
    out = vrec.predict(method, images)
    cols = vrec.composite(images, out["pred"], out["mask"])
    torch.testing.assert_close(cols["pasted"], images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cols["full"], images, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["simmim", "spark"])
def test_reconstruction_png(runs, name, tmp_path):
    paths = vrec.render(runs(name), tmp_path, num_images=3)
    assert [p.name for p in paths] == ["reconstruction.png"]
    check_png(paths[0], figure_size_px(3, 4))


# --------------------------------------------------------------------------------------------- attention
def test_mass_mask_keeps_the_fewest_patches_with_60_percent():
    uniform = torch.full((1, 2, 5), 0.1)
    assert int(vatt.mass_mask(uniform).sum()) == 6
    onehot = torch.zeros(2, 3, 3)
    onehot[0, 1, 2] = 1.0
    onehot[1, 0, 0] = 5.0
    m = vatt.mass_mask(onehot)
    assert m.sum().item() == 2 and m[0, 1, 2] and m[1, 0, 0]
    a = torch.tensor([[0.2, 0.5, 0.3]])
    assert vatt.mass_mask(a).tolist() == [[False, True, True]]
    g = torch.Generator().manual_seed(4)
    maps = torch.rand(7, 5, 7, generator=g) ** 3
    masks = vatt.mass_mask(maps)
    p = maps.flatten(1) / maps.flatten(1).sum(1, keepdim=True)
    for row, keep in zip(p, masks.flatten(1)):
        kept = row[keep]
        assert kept.sum() >= 0.6 - 1e-6  # enough mass
        assert kept.sum() - kept.min() < 0.6  # and minimal: dropping the smallest kept falls short
        assert kept.min() >= row[~keep].max() if (~keep).any() else True  # the largest entries
    with pytest.raises(ValueError, match="keep"):
        vatt.mass_mask(maps, keep=0.0)


def test_cls_attention_is_the_last_blocks_softmax_row():
    from engine.models.vit import build_vit

    vit = build_vit("vit_femto", img_size=24, use_abs_pos_emb=True).eval()
    images = torch.randn(2, 3, 24, 24)
    captured = {}
    hook = vit.blocks[-1].register_forward_pre_hook(lambda m, args, kw: captured.update(x=args[0]), with_kwargs=True)
    with torch.no_grad():
        vit.forward_features(images)
    hook.remove()
    attn = vatt.cls_attention(vit, images)
    assert attn.shape == (2, 2, 6, 6)
    mod = vit.blocks[-1].attn
    x = vit.blocks[-1].norm1(captured["x"]).double()
    W, b = mod.qkv.weight.double(), mod.qkv.bias.double()
    qkv = (x @ W.T + b).reshape(2, 37, 3, 2, 24).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    probs = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * mod.scale, dim=-1)[:, :, 0, 1:]
    want = (probs / probs.sum(-1, keepdim=True)).reshape(2, 2, 6, 6)
    torch.testing.assert_close(attn.double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(attn.sum((-1, -2)), torch.ones(2, 2))


@pytest.mark.parametrize("name", ["dino", "simmim"])
def test_attention_png(runs, name, tmp_path):
    paths = vatt.render(runs(name), tmp_path, num_images=2)
    assert [p.name for p in paths] == ["attention.png"]
    heads = 2  # vit_femto
    check_png(paths[0], figure_size_px(2, heads + 2))


@pytest.mark.parametrize("name", ["dino", "simmim", "vqkd"])
def test_vit_from_encoder_config_equals_the_methods_encoder(runs, name):
    from engine.eval import encoder_from_checkpoint
    from engine.viz.common import load_run

    state, _, _ = load_run(runs(name))
    want, _ = encoder_from_checkpoint(state)
    got = vatt.vit_from_encoder_config(state)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vatt.cls_attention(got.eval(), images), vatt.cls_attention(want.eval(), images))
    assert vatt.vit_from_encoder_config(load_run(runs("spark"))[0]) is None


def test_attention_of_a_beit_run_whose_tokenizer_is_gone(runs, tmp_path):
    import shutil

    tok = tmp_path / "tok.pt"
    shutil.copy(runs("dvae") / "checkpoint-last.pt", tok)
    RUNS["beit"] = {"model": "vit_femto", "tokenizer": str(tok)}
    try:
        run = train_tiny("beit", tmp_path / "beit")
    finally:
        RUNS.pop("beit")
    tok.unlink()
    paths = vatt.render(run, tmp_path / "viz", num_images=1)
    check_png(paths[0], figure_size_px(1, 2 + 2))


# --------------------------------------------------------------------------------------------- tokens
def test_choose_codes_and_patch_crop():
    counts = np.array([0, 5, 9, 1, 0, 3])
    assert vtok.choose_codes(counts, 10) == [2, 1, 5, 3]
    assert vtok.choose_codes(counts, 2) == [2, 3]
    img = np.arange(8 * 8 * 3, dtype=np.float64).reshape(8, 8, 3)
    crop = vtok.patch_crop(img, 1, 1, 2)  # patch rows/cols 2..3 with one patch of context: 0..5
    assert crop.shape == (6, 6, 3) and np.array_equal(crop, img[0:6, 0:6])
    corner = vtok.patch_crop(img, 0, 0, 2)
    assert np.array_equal(corner[2:4, 2:4], img[0:2, 0:2]) and np.array_equal(corner[0, 0], img[0, 0])


@pytest.mark.parametrize("name", ["dvae", "vqkd"])
def test_tokens_png(runs, name, tmp_path):
    paths = vtok.render(runs(name), tmp_path, num_images=2, stats_images=64)
    names = ["token_map.png", "codebook_usage.png"] + (["codebook_patches.png"] if name == "vqkd" else [])
    assert [p.name for p in paths] == names
    check_png(paths[0], figure_size_px(2, 3 if name == "dvae" else 2))
    check_png(paths[1], plot_size_px(2))
    if name == "vqkd":
        with Image.open(paths[2]) as im:
            w, h = im.size
        assert w == figure_size_px(1, 8, row_labels=True)[0]
        assert h in {figure_size_px(r, 8)[1] for r in range(1, 7)}
        check_png(paths[2], (w, h))


def test_token_ids_match_the_tokenizer(runs):
    tok, _, _ = vtok.load(runs("dvae"))
    images = torch.randn(2, 3, 32, 32)
    ids = vtok.token_ids(tok, images)
    from engine.models.dvae import map_pixels
    from engine.viz.common import imagenet_to_unit

    assert ids.shape == (2, 8, 8) and ids.dtype == torch.int64
    assert torch.equal(ids, tok.net(map_pixels(imagenet_to_unit(images))).argmax(1))


# --------------------------------------------------------------------------------------------- curves
def test_read_log_and_series(tmp_path):
    log = tmp_path / "log.jsonl"
    recs = [{"step": 1, "loss": 2.0, "lr": 0.1, "images_per_s": 10.0}, {"step": 2, "loss": 1.0, "lr": 0.2},
            {"step": 2, "epoch": 0, "knn_top1": 50.0}]
    log.write_text("\n".join(json.dumps(r) for r in recs) + '\n{"step": 3, "lo')  # truncated last line
    got = vcur.read_log(tmp_path)
    assert got == recs
    s, v = vcur.series(got, "loss")
    assert s.tolist() == [1, 2] and v.tolist() == [2.0, 1.0]
    s, v, unit = vcur.throughput(got)
    assert unit == "images/s" and v.tolist() == [10.0]
    s, v, unit = vcur.throughput([{"step": 1, "loss": 1, "time": 10.0}, {"step": 3, "loss": 1, "time": 11.0}])
    assert unit == "steps/s" and v.tolist() == [2.0]
    log.write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(VizError, match="log.jsonl:2"):
        vcur.read_log(log)
    with pytest.raises(VizError, match="no training log"):
        vcur.read_log(tmp_path / "missing")
    ma = vcur.moving_average(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), 3)
    assert np.allclose(ma, [1.5, 2.0, 3.0, 4.0, 4.5])


def test_curves_png_several_runs(runs, tmp_path):
    recs = [json.loads(x) for x in (runs("simmim") / "log.jsonl").read_text().splitlines()]
    assert all(r["images_per_s"] > 0 for r in recs)  # the trainer logs throughput
    paths = vcur.render([runs("simmim") / "log.jsonl", runs("spark"), runs("dino") / "checkpoint-last.pt"], tmp_path)
    assert [p.name for p in paths] == ["curves.png"]
    check_png(paths[0], plot_size_px(3))


# --------------------------------------------------------------------------------------------- default job
def test_default_job_pictures(runs, tmp_path):
    paths = default_job_pictures("simmim", runs("simmim") / "checkpoint-last.pt", tmp_path, None)
    assert sorted(p.name for p in paths) == ["curves.png", "reconstruction.png"]
    assert all(p.parent == tmp_path and p.is_file() for p in paths)
    paths = default_job_pictures("dino", runs("dino"), tmp_path / "d", builtin_dataset(image_size=32))
    assert sorted(p.name for p in paths) == ["attention.png", "curves.png"]


# --------------------------------------------------------------------------------------------- CLI
def cli(args, capsys):
    try:
        rc = cli_main([str(a) for a in args])
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_writes_and_prints_paths(runs, tmp_path, capsys):
    rc, out, err = cli(["reconstruction", "--checkpoint", runs("simmim"), "--out", tmp_path, "--num-images", "2"],
                       capsys)
    assert rc == 0, err
    assert out.split() == [str(tmp_path / "reconstruction.png")]
    check_png(tmp_path / "reconstruction.png", figure_size_px(2, 4))
    rc, out, err = cli(["curves", "--log", runs("simmim") / "log.jsonl", "--log", runs("spark") / "log.jsonl",
                        "--out", tmp_path], capsys)
    assert rc == 0 and out.split() == [str(tmp_path / "curves.png")], err


@pytest.mark.parametrize("kind,run,needle", [
    ("attention", "spark", "not a ViT"),
    ("tokens", "simmim", "has no tokenizer"),
    ("reconstruction", "dino", "predicts no pixels"),
    ("reconstruction", None, "no checkpoint at"),
    ("painting", "simmim", "invalid choice"),
])
def test_cli_bad_arguments_exit_2_with_one_line(runs, tmp_path, capsys, kind, run, needle):
    ckpt = runs(run) if run else tmp_path / "missing.pt"
    rc, _, err = cli([kind, "--checkpoint", ckpt, "--out", tmp_path], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m engine.visualize: error:") and needle in lines[0], err
    assert not list(tmp_path.glob("*.png"))


def test_cli_subprocess_bad_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "-m", "engine.visualize", "attention", "--checkpoint", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no checkpoint at" in r.stderr


def test_to_display_undoes_imagenet_normalisation():
    from engine.data import IMAGENET_MEAN, IMAGENET_STD

    unit = torch.rand(1, 3, 4, 5)
    norm = (unit - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert np.allclose(to_display(norm)[0], unit[0].permute(1, 2, 0).numpy(), atol=1e-6)
