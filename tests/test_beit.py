"""BEiT and its dVAE tokenizer: tokenizer ids/grid, checkpoint round trips (engine, standalone, DALL-E),
masks, the masked-token loss, training lowers the loss, the CLI end to end (dvae -> beit)."""


import pytest
import torch

import kernels
from engine.methods import build_method, get_method
from engine.methods.beit import default_min_block, default_num_masked
from engine.methods.dvae import imagenet_to_unit
from engine.models.dalle_encoder import DalleEncoder
from engine.models.dvae import DVAE, kl_to_uniform, map_pixels
from engine.tokenizers import load_tokenizer, save_tokenizer

from _train_helpers import fake_checkpoint, run_pretrain, method_cfg as cfg_for, random_images as images  # noqa: E402


def small_dvae_cfg(**over):
    return cfg_for("dvae", vocab_size=32, tokenizer_width=16, tokenizer_cell=4, **over)


# ---------------------------------------------------------------------------------------------- tokenizer
def test_dvae_ids_in_range_on_the_cell_grid():
    net = DVAE(vocab_size=37, hidden=8, cell=4)
    x = torch.rand(3, 3, 24, 40)
    logits = net(map_pixels(x))
    assert logits.shape == (3, 37, 6, 10)
    ids = net.get_codebook_indices(map_pixels(x))
    assert ids.shape == (3, 6, 10) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < 37
    assert torch.equal(ids, logits.argmax(1))
    rec, _ = net.reconstruct(map_pixels(x), tau=0.5)
    rec = rec.detach()
    assert rec.shape == x.shape and float(rec.min()) > 0 and float(rec.max()) < 1
    assert net.decode_indices(ids).shape == x.shape


def test_dvae_bad_input_and_config():
    with pytest.raises(ValueError, match="--tokenizer-cell"):
        build_method("dvae", cfg_for("dvae", vocab_size=8, tokenizer_width=4, tokenizer_cell=8, image_size=36))
    with pytest.raises(ValueError, match="cell"):
        DVAE(vocab_size=8, hidden=4, cell=3)
    with pytest.raises(ValueError, match="images"):
        DVAE(vocab_size=8, hidden=4, cell=4)(torch.rand(1, 3, 10, 12))


def test_kl_to_uniform():
    assert float(kl_to_uniform(torch.zeros(2, 16, 3, 3))) == pytest.approx(0.0, abs=1e-6)
    peaked = torch.zeros(1, 16, 1, 1)
    peaked[0, 3] = 100.0
    assert float(kl_to_uniform(peaked)) == pytest.approx(float(torch.log(torch.tensor(16.0))), rel=1e-4)


def test_imagenet_to_unit_inverts_normalisation():
    x = torch.rand(2, 3, 5, 5)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(imagenet_to_unit((x - mean) / std), x)


def test_dvae_training_lowers_loss_and_anneals_temperature():
    torch.manual_seed(0)
    m = build_method("dvae", small_dvae_cfg())
    sched = m.schedules(10, 5)["gumbel_temp"]
    assert sched[0] == pytest.approx(1.0) and sched[-1] < 0.2 and all(sched[:-1] >= sched[1:])
    batch = {"images": images(4, 16)}
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        m.set_progress(step, 0, {"gumbel_temp": 1.0})
        torch.manual_seed(100)  # the same Gumbel noise every step: a fixed objective
        out = m(batch)
        opt.zero_grad()
        out["loss"].backward()
        if step == 0:  # the relaxation carries gradients back into the encoder
            assert float(m.tokenizer.encoder[0].weight.grad.abs().sum()) > 0
        opt.step()
        losses.append(out["loss"].item())
    assert 0 < float(out["token_usage"]) <= 1 and float(out["gumbel_temp"]) == 1.0
    assert losses[-1] < 0.97 * losses[0], losses


def test_dvae_kl_ramp_and_codebook_log():
    """DALL-E's KL ramp: beta 0 -> kl_weight linearly over kl_warmup_steps, then constant; the loss adds
    beta * KL(q || U); KL, beta, token usage and perplexity are logged every step."""
    from engine.models.dvae import kl_to_uniform

    m = build_method("dvae", small_dvae_cfg(kl_weight=0.5, kl_warmup_steps=4))
    beta = m.schedules(10, 5)["kl_weight"]
    assert beta.tolist() == pytest.approx([0.0, 0.125, 0.25, 0.375] + [0.5] * 6)
    batch = {"images": images(4, 16)}
    for b in (0.0, 0.5):
        m.set_progress(3, 0, {"gumbel_temp": 1.0, "kl_weight": b})
        torch.manual_seed(100)
        out = m(batch)
        torch.testing.assert_close(out["loss"], out["rec_mse"] + b * out["kl"])
        assert float(out["kl_weight"]) == b
    logits = m.tokenizer(map_pixels(imagenet_to_unit(batch["images"])))
    torch.testing.assert_close(out["kl"], kl_to_uniform(logits).detach())
    assert 1.0 <= float(out["perplexity"]) <= m.tokenizer.vocab_size
    assert get_method("dvae").defaults["kl_weight"] > 0  # the tokenizer has a usage-preserving term by default


def test_tokenizer_roundtrip_from_engine_checkpoint_and_standalone(tmp_path):
    torch.manual_seed(1)
    m = build_method("dvae", small_dvae_cfg())
    x = map_pixels(torch.rand(2, 3, 32, 32))
    want = m.tokenizer.get_codebook_indices(x)
    tok = load_tokenizer(fake_checkpoint(m, tmp_path / "ck.pt"))
    assert tok.kind == "dvae" and tok.vocab_size == 32 and tok.cell == 4
    assert torch.equal(tok(x), want)
    assert not any(p.requires_grad for p in tok.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # ids are computed in fp32 even under autocast
        assert torch.equal(tok(x), want)
    tok.train()
    assert not tok.training and not tok.net.training
    tok2 = load_tokenizer(save_tokenizer(tok, tmp_path / "tok.pt"))
    assert torch.equal(tok2(x), want)
    with pytest.raises(ValueError, match="vqkd"):
        load_tokenizer(tmp_path / "ck.pt", kinds=("vqkd",))
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.pt")


def test_tokenizer_from_dalle_encoder_layout(tmp_path):
    torch.manual_seed(2)
    enc = DalleEncoder(n_hid=8, n_blk_per_group=1, vocab_size=19)
    sd = enc.state_dict()
    assert "blocks.input.w" in sd and "blocks.group_1.block_1.res_path.conv_1.w" in sd
    assert "blocks.group_2.block_1.id_path.w" in sd and "blocks.output.conv.w" in sd
    torch.save(sd, tmp_path / "encoder.pt")
    tok = load_tokenizer(tmp_path / "encoder.pt")
    x = map_pixels(torch.rand(2, 3, 24, 16))
    ids = tok(x)
    assert tok.kind == "dalle" and ids.shape == (2, 3, 2) and int(ids.max()) < 19 and int(ids.min()) >= 0
    assert torch.equal(ids, enc(x).argmax(1))


# ---------------------------------------------------------------------------------------------- BEiT
def test_beit_without_tokenizer_raises_one_clear_error():
    with pytest.raises(ValueError, match="--method dvae") as exc:
        build_method("beit", cfg_for("beit"))
    assert "\n" not in str(exc.value)


def test_beit_mask_counts_and_paper_defaults():
    d = get_method("beit").defaults
    assert d["drop_path"] == 0.1 and d["init_values"] == 0.1 and d["clip_grad"] == 3.0 and d["warmup_epochs"] == 10
    assert d["blr"] * 2048 / 256 == pytest.approx(1.5e-3) and d["weight_decay"] == 0.05
    assert default_num_masked(196) == 75 and default_num_masked(64) == 26 and default_min_block(196) == 16
    masks = kernels.blockwise_masks(4, 8, 8, default_num_masked(64), min_block=default_min_block(64), seed=3)
    assert masks.shape == (4, 8, 8) and masks.reshape(4, -1).sum(1).tolist() == [26] * 4


@pytest.fixture(scope="module")
def dvae_ckpt(tmp_path_factory):
    torch.manual_seed(3)
    m = build_method("dvae", small_dvae_cfg())
    return fake_checkpoint(m, tmp_path_factory.mktemp("dvae") / "ck.pt")


def test_beit_loss_matches_reference_and_training_lowers_it(dvae_ckpt):
    torch.manual_seed(4)
    m = build_method("beit", cfg_for("beit", tokenizer=str(dvae_ckpt), drop_path=0.0))  # deterministic forward
    assert m.backbone.rel_pos_bias is not None and m.backbone.pos_embed is None
    assert float(m.backbone.blocks[0].gamma_1.detach()[0]) == pytest.approx(0.1)
    kw = m.loader_kwargs()
    assert kw["tokenizer_size"] == 32
    B = 6
    mask = kw["mask_fn"](B, 7)["mask"]
    assert mask.reshape(B, -1).sum(1).tolist() == [m.num_masked] * B
    x = images(B)
    batch = {"images": x, "tokenizer_images": map_pixels(imagenet_to_unit(x)), "mask": mask}
    out = m(batch)
    # the loss is plain cross-entropy of the LM head on the masked positions
    ids = m.tokenizer(batch["tokenizer_images"]).reshape(B, -1)
    h = m.backbone.forward_features(x, mask=mask.reshape(B, -1))[:, 1:]
    logits = m.lm_head(h[mask.reshape(B, -1)])
    ref = torch.nn.functional.cross_entropy(logits, ids[mask.reshape(B, -1)])
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-5)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3)
    tok_before = [p.clone() for p in m.tokenizer.parameters()]
    losses = []
    for _ in range(8):
        m.train()
        out = m(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0] - 0.3, losses
    assert not m.tokenizer.training
    assert all(torch.equal(a, b) for a, b in zip(tok_before, m.tokenizer.parameters()))


def test_beit_tokenizer_grid_mismatch_is_reported(dvae_ckpt):
    with pytest.raises(ValueError, match="use 32"):
        build_method("beit", cfg_for("beit", tokenizer=str(dvae_ckpt), tokenizer_size=16))
    m = build_method("beit", cfg_for("beit", tokenizer=str(dvae_ckpt)))
    x = images(2)
    batch = {
        "images": x,
        "tokenizer_images": torch.rand(2, 3, 16, 16),
        "mask": m.loader_kwargs()["mask_fn"](2, 0)["mask"],
    }
    with pytest.raises(ValueError, match="32 px"):
        m(batch)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_dvae_then_beit(tmp_path):
    common = [
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
        "dvae",
        "--vocab-size",
        "32",
        "--tokenizer-width",
        "16",
        "--tokenizer-cell",
        "4",
        "--output-dir",
        str(tmp_path / "dvae"),
        *common,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "dvae" / "checkpoint-last.pt").is_file()
    r = run_pretrain(
        "--method",
        "beit",
        "--model",
        "vit_femto",
        "--tokenizer",
        str(tmp_path / "dvae"),
        "--output-dir",
        str(tmp_path / "beit"),
        *common,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trained 2/2 steps" in r.stdout and "mlm_acc" in r.stdout
    r = run_pretrain("--method", "beit", "--output-dir", str(tmp_path / "x"), *common)
    assert r.returncode == 2 and "--tokenizer PATH" in r.stderr and "--method dvae" in r.stderr
