"""BEiT v2 and its VQ-KD tokenizer: ids/grid, codebook usage, teacher loading and the random fallback,
training lowers the losses, the [CLS] aggregation branch, the CLI end to end (vqkd -> beitv2)."""


import pytest
import torch
import torch.nn.functional as F

from engine.methods import build_method
from engine.methods.beitv2 import default_early_layer
from engine.models.vqkd import VQKD, cosine_distill_loss
from engine.tokenizers import load_tokenizer

from _train_helpers import fake_checkpoint, run_pretrain, method_cfg as cfg_for, random_images as images  # noqa: E402


def vqkd_cfg(**over):
    return cfg_for("vqkd", vocab_size=32, codebook_dim=8, decoder_depth=1, **over)


def train(m, batch, steps, lr, params=None):
    opt = torch.optim.AdamW(params or [p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    outs = []
    for _ in range(steps):
        m.train()
        out = m(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        outs.append({k: float(v.detach()) for k, v in out.items()})
    return outs


# ---------------------------------------------------------------------------------------------- VQ-KD
def test_vqkd_ids_in_range_on_the_patch_grid():
    torch.manual_seed(0)
    m = build_method("vqkd", vqkd_cfg())
    x = images(3)
    out = m.tokenizer(x)
    assert out["ids"].shape == (3, 8, 8) and out["ids"].dtype == torch.int64
    assert int(out["ids"].min()) >= 0 and int(out["ids"].max()) < 32
    assert out["rec"].shape == (3, 64, m.teacher.embed_dim)
    m.eval()
    assert torch.equal(m.tokenizer.get_codebook_indices(x), m.tokenizer(x)["ids"])


def test_cosine_distill_loss():
    a = torch.randn(2, 5, 7)
    assert float(cosine_distill_loss(a, 3 * a)) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_distill_loss(a, -a)) == pytest.approx(2.0, abs=1e-6)
    want = (1 - F.cosine_similarity(a, a.flip(0), dim=-1)).mean()
    torch.testing.assert_close(cosine_distill_loss(a, a.flip(0)), want)


def test_random_teacher_fallback_is_announced_and_frozen(capsys):
    import engine.methods.vqkd as mod

    mod._ANNOUNCED.clear()
    m1 = build_method("vqkd", vqkd_cfg())
    err = capsys.readouterr().err
    assert "RANDOMLY INITIALISED" in err and "NOT CLIP/DINO" in err
    m2 = build_method("vqkd", vqkd_cfg())
    for a, b in zip(m1.teacher.parameters(), m2.teacher.parameters()):  # fixed seed: the same teacher
        assert torch.equal(a, b) and not a.requires_grad
    m1.train()
    assert not m1.teacher.training and m1.tokenizer.training


def test_teacher_from_engine_checkpoint(tmp_path):
    torch.manual_seed(5)
    simmim = build_method("simmim", cfg_for("simmim"))
    path = fake_checkpoint(simmim, tmp_path / "teacher.pt")
    m = build_method("vqkd", vqkd_cfg(teacher=str(path)))
    assert "frozen vit_femto encoder" in m.teacher_desc
    for (n, a), b in zip(m.teacher.named_parameters(), simmim.backbone.parameters()):
        assert torch.equal(a, b), n
    x = images(2)
    t = m.teacher_features(x, (8, 8))
    torch.testing.assert_close(t, simmim.backbone.eval().forward_features(x)[:, 1:])
    # a relative-position teacher runs on its own grid; its features are resized to the tokenizer grid
    t4 = m.teacher_features(F.interpolate(x, size=(16, 16)), (4, 4))
    assert t4.shape == (2, 16, m.teacher.embed_dim)
    x16 = F.interpolate(F.interpolate(x, size=(16, 16)), size=(32, 32), mode="bicubic", align_corners=False)
    want = F.interpolate(
        simmim.backbone.forward_features(x16)[:, 1:].transpose(1, 2).reshape(2, -1, 8, 8),
        size=(4, 4),
        mode="bilinear",
        align_corners=False,
    )
    torch.testing.assert_close(t4, want.flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="--teacher"):
        build_method("vqkd", vqkd_cfg(teacher=str(tmp_path / "none.pt")))


def test_vqkd_training_lowers_loss_and_uses_the_codebook():
    torch.manual_seed(1)
    m = build_method("vqkd", vqkd_cfg())
    batch = {"images": images(8)}
    outs = train(m, batch, 10, 2e-3)
    assert all(k in outs[0] for k in ("codebook_usage", "perplexity", "distill", "commit"))
    assert outs[-1]["distill"] < outs[0]["distill"] - 0.05, [o["distill"] for o in outs]
    # k-means init spreads the 32 codes over the batch: far above the collapsed 1/32
    assert outs[-1]["codebook_usage"] >= 0.25 and outs[-1]["perplexity"] > 4
    assert bool(m.tokenizer.quantizer.initialized)
    # the codebook moves only by EMA: no gradient, l2-normalised rows
    cb = m.tokenizer.quantizer.codebook
    assert not cb.requires_grad
    torch.testing.assert_close(cb.norm(dim=1), torch.ones(32), rtol=1e-4, atol=1e-4)


def test_vqkd_tokenizer_roundtrip(tmp_path):
    torch.manual_seed(2)
    m = build_method("vqkd", vqkd_cfg())
    train(m, {"images": images(4)}, 1, 1e-3)
    path = fake_checkpoint(m, tmp_path / "vqkd.pt")
    tok = load_tokenizer(path, kinds=("vqkd",))
    x = images(2, seed=9)
    m.eval()
    assert tok.kind == "vqkd" and tok.cell == 4 and tok.vocab_size == 32
    assert torch.equal(tok(x), m.tokenizer.get_codebook_indices(x))
    assert isinstance(tok.net, VQKD) and not any(p.requires_grad for p in tok.parameters())


# ---------------------------------------------------------------------------------------------- BEiT v2
@pytest.fixture(scope="module")
def vqkd_ckpt(tmp_path_factory):
    torch.manual_seed(3)
    m = build_method("vqkd", vqkd_cfg())
    train(m, {"images": images(8)}, 2, 1e-3)
    return fake_checkpoint(m, tmp_path_factory.mktemp("vqkd") / "ck.pt")


def test_early_layer_scaling():
    assert default_early_layer(12) == 9 and default_early_layer(4) == 3 and default_early_layer(2) == 1


def test_beitv2_needs_a_vqkd_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="--method vqkd"):
        build_method("beitv2", cfg_for("beitv2"))
    dvae = build_method("dvae", cfg_for("dvae", vocab_size=16, tokenizer_width=8, tokenizer_cell=4))
    path = fake_checkpoint(dvae, tmp_path / "dvae.pt")
    with pytest.raises(ValueError, match="needs vqkd"):
        build_method("beitv2", cfg_for("beitv2", tokenizer=str(path)))


def test_beitv2_losses_aggregation_gradients_and_training(vqkd_ckpt):
    torch.manual_seed(4)
    m = build_method("beitv2", cfg_for("beitv2", model="vit_pico", tokenizer=str(vqkd_ckpt)))
    assert m.early_layer == 3 and len(m.cls_pt_layers) == 2
    B = 6
    mask = m.loader_kwargs()["mask_fn"](B, 11)["mask"]
    assert mask.reshape(B, -1).sum(1).tolist() == [26] * B
    x = images(B)
    batch = {"images": x, "mask": mask}
    out = m(batch)
    torch.testing.assert_close(out["loss"], out["loss_main"] + out["loss_cls"])
    # the cls branch (official): the LAST block's raw [CLS] (before the final norm) + raw block-3 patch tokens
    # through 2 extra blocks, same head and norm
    mk = mask.reshape(B, -1)
    ids = m.tokenizer(x).reshape(B, -1)
    tok, (early, last) = m.backbone.forward_features(x, mask=mk, return_layers=[2, 3])
    assert not torch.allclose(tok[:, 0], last[:, 0])  # the final norm does change the [CLS]
    y = torch.cat([last[:, :1], early[:, 1:]], 1)
    for blk in m.cls_pt_layers:
        y = blk(y, rel_pos_bias=m.backbone.rel_pos_bias())
    ref = F.cross_entropy(m.lm_head(m.backbone.norm(y)[:, 1:][mk]), ids[mk])
    torch.testing.assert_close(out["loss_cls"], ref, rtol=1e-5, atol=1e-5)
    out["loss"].backward()
    for name, p in m.cls_pt_layers.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    early_blocks = m.backbone.blocks[: m.early_layer]
    assert all(p.grad is not None for p in early_blocks.parameters())
    m.zero_grad()
    outs = train(m, batch, 8, 2e-3)
    assert (
        outs[-1]["loss_main"] < outs[0]["loss_main"] - 0.2
        and outs[-1]["loss_cls"] < outs[0]["loss_cls"] - 0.2
    )
    assert not m.tokenizer.training


def test_beitv2_head_blocks_rescale_and_drop_path_as_official(vqkd_ckpt):
    """fix_init_cls_pt_weight: block i of the head is rescaled as layer early_layer + i + 1; drop path rates
    are entries early_layer, early_layer + 1 of linspace(0, rate, max(depth, early_layer + 2))."""
    import math

    torch.manual_seed(0)
    m = build_method("beitv2", cfg_for("beitv2", model="vit_pico", tokenizer=str(vqkd_ckpt), drop_path=0.1))
    assert m.early_layer == 3
    for i, blk in enumerate(m.cls_pt_layers):
        layer = m.early_layer + i + 1  # 4, 5 (was depth + 1, depth + 2 = 5, 6)
        expect = 0.02 * 0.540 / math.sqrt(2 * layer)  # trunc-normal cut at +-1 std: std 0.54 sigma
        got = float(blk.mlp.fc2.weight.detach().std())
        assert abs(got / expect - 1) < 0.08, (layer, got, expect)
    rates = [blk.drop_path.drop_prob for blk in m.cls_pt_layers]
    want = torch.linspace(0, 0.1, 5).tolist()[3:5]
    assert rates == pytest.approx(want)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_vqkd_then_beitv2(tmp_path):
    common = [
        "--model",
        "vit_femto",
        "--batch-size",
        "8",
        "--max-steps",
        "2",
        "--num-threads",
        "1",
        "--no-final-knn",
        "--print-every",
        "1",
    ]
    r = run_pretrain(
        "--method",
        "vqkd",
        "--vocab-size",
        "32",
        "--decoder-depth",
        "1",
        "--output-dir",
        str(tmp_path / "vqkd"),
        *common,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "NOT CLIP/DINO" in r.stderr and "codebook_usage" in r.stdout
    r = run_pretrain(
        "--method",
        "beitv2",
        "--tokenizer",
        str(tmp_path / "vqkd"),
        "--output-dir",
        str(tmp_path / "beitv2"),
        *common,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trained 2/2 steps" in r.stdout and "loss_cls" in r.stdout


# ---------------------------------------------------------------------------------------------- resume
def _trainer(cfg):
    from engine.data import build_pretrain_loader, builtin_dataset
    from engine.trainer import Trainer, seed_everything

    seed_everything(cfg["seed"])
    m = build_method(cfg["method"], cfg)
    loader = build_pretrain_loader(m.data_recipe(), builtin_dataset(image_size=32), batch_size=cfg["batch_size"],
                                   image_size=32, seed=cfg["seed"], num_threads=1, backend="torch")
    return Trainer(m, loader, cfg)


def test_vqkd_resume_continues_exactly(tmp_path):
    """The codebook (k-means initialised, EMA-updated buffers) survives a pre-emption bit for bit."""
    from engine.trainer import find_resume

    over = dict(max_steps=4, print_every=1000, warmup_epochs=0.0, num_threads=1)
    full = _trainer(vqkd_cfg(output_dir=str(tmp_path / "full"), **over))
    ref = full.fit()["history"]
    part = vqkd_cfg(output_dir=str(tmp_path / "part"), stop_after=2, **over)
    assert _trainer(part).fit()["stopped"]
    torch.manual_seed(999)
    tr = _trainer(dict(part, stop_after=0))
    out = tr.fit(resume=find_resume("auto", tmp_path / "part"))
    assert out["history"] == ref
    q_full, q_res = full.method.tokenizer.quantizer, tr.method.tokenizer.quantizer
    for name in ("codebook", "cluster_size", "embed_sum", "initialized"):
        assert torch.equal(getattr(q_full, name), getattr(q_res, name)), name
