"""SparK: convnet backbones, sparse encoder == dense encoder on an all-active mask, converted weights load
into the dense model, masked units never leak into visible features, the loss, training lowers it, the CLI."""


import pytest
import torch

import kernels
from engine.methods import build_method, get_method
from engine.methods.spark import build_convnet, patchify, spark_loss
from engine.models.spark_decoder import LightDecoder
from engine.trainer.config import resolve

from _train_helpers import run_pretrain  # noqa: E402

CPU_MODELS = ["resnet_femto", "convnext_femto"]


def cfg_for(model="resnet_femto", **over):
    cli = dict(method="spark", model=model, image_size=32, batch_size=8, final_knn=False, decoder_width=32)
    cli.update(over)
    return resolve(cli, method_defaults_fn=lambda m: get_method(m).defaults)


def images(b=4, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, s, s, generator=g)


def test_patchify():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    p = patchify(x, 2)
    assert p.shape == (2, 6, 12)
    # patch (row 1, col 2) of image 1: pixels [2:4, 4:6], channel-last inside the patch
    want = x[1, :, 2:4, 4:6].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(p[1, 1 * 3 + 2], want)


@pytest.mark.parametrize(
    "name,ratio,channels",
    [
        ("resnet_femto", 8, [16, 32, 64, 128]),
        ("resnet18", 32, [64, 128, 256, 512]),
        ("resnet50", 32, [256, 512, 1024, 2048]),
        ("convnext_femto", 8, [16, 32, 64, 128]),
        ("convnext_tiny", 32, [96, 192, 384, 768]),
    ],
)
def test_backbone_shapes(name, ratio, channels):
    with torch.device("cpu" if ratio == 8 else "meta"):  # full-size models: structure only, no init cost
        net = build_convnet(name)
    assert net.downsample_ratio == ratio and net.feature_channels == channels
    if ratio == 8:
        feats = net.forward_features(images(2))
        assert [tuple(f.shape) for f in feats] == [
            (2, c, 32 // s, 32 // s) for c, s in zip(channels, net.feature_strides)
        ]
        assert net(images(2)).shape == (2, channels[-1])


def test_decoder_levels():
    dec = LightDecoder(32, 64)
    assert len(dec.dec) == 5 and dec.widths == [64, 32, 16, 8, 4, 2]
    feats = [torch.randn(2, w, 2 * 2**i, 2 * 2**i) for i, w in enumerate(dec.widths[:4])]
    assert dec(feats).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="power of 2"):
        LightDecoder(24, 64)


def test_decoder_block_is_the_official_one():
    """conv-BN-ReLU6-conv-BN: no activation after the last BN, so levels carry signed, unclipped values."""
    from engine.models.spark_decoder import Densifier, UNetBlock

    blk = UNetBlock(8, 4)
    kinds = [type(m) for m in blk.conv]
    assert kinds == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU6, torch.nn.Conv2d, torch.nn.BatchNorm2d]
    y = blk(torch.randn(2, 8, 4, 4) * 10)
    assert y.min() < 0 and y.max() > 0
    torch.manual_seed(0)
    dec = LightDecoder(8, 64)
    for m in dec.modules():
        if isinstance(m, torch.nn.ConvTranspose2d):  # Kaiming normal (fan_out = in * k * k), as official
            assert abs(float(m.weight.detach().std()) - (2 / (m.weight.shape[0] * 16)) ** 0.5) < 0.2 * (2 / (m.weight.shape[0] * 16)) ** 0.5
        elif isinstance(m, torch.nn.Conv2d):
            assert abs(float(m.weight.detach().std()) - 0.02) < 0.004
    d = Densifier([16, 8], [8, 4], "bn")
    assert all(float(t.abs().max()) <= 0.02 for t in d.mask_tokens)  # trunc-normal cut at +-1 std


def test_convnext_tiny_preset_drop_path_and_sync_bn():
    from engine.trainer.config import load_preset

    assert load_preset("spark_convnext_tiny")[0]["drop_path"] == 0.0
    assert load_preset("spark_resnet50")[0]["drop_path"] == 0.05
    assert get_method("spark").sync_batchnorm
    net = build_convnet("resnet_femto", drop_path=0.1)
    rates = [m.drop_prob for m in net.modules() if type(m).__name__ == "DropPath"]
    assert rates[-1] == pytest.approx(0.1) and rates == sorted(rates)


@pytest.mark.parametrize("name", CPU_MODELS)
@pytest.mark.parametrize("train_mode", [True, False])
def test_sparse_encoder_all_active_equals_dense(name, train_mode):
    torch.manual_seed(0)
    m = build_method("spark", cfg_for(name))
    dense = build_convnet(name)
    dense.load_state_dict(m.encoder().state_dict())
    enc = m.encoder()
    if not train_mode:  # non-trivial running statistics
        with torch.no_grad():
            for mod in list(enc.modules()):
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.uniform_(-0.5, 0.5)
                    mod.running_var.uniform_(0.5, 1.5)
        dense.load_state_dict(enc.state_dict())
    enc.train(train_mode)
    dense.train(train_mode)
    x = images(3)
    active = torch.ones(3, 4, 4, dtype=torch.bool)
    with kernels.sparse_context(active):
        sparse_feats = enc.forward_features(x)
    for a, b in zip(sparse_feats, dense.forward_features(x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CPU_MODELS)
def test_converted_weights_load_into_dense_model(name):
    torch.manual_seed(1)
    m = build_method("spark", cfg_for(name))
    batch = {"images": images(4), "mask": m.loader_kwargs()["mask_fn"](4, 0)["mask"]}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(2):  # move the weights and BN statistics away from their init
        out = m(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    sd = m.encoder().state_dict()
    dense = build_convnet(name)
    assert set(sd) == set(dense.state_dict())
    dense.load_state_dict(sd, strict=True)
    assert all(
        type(mod).__module__.startswith("torch.nn") or "engine" in type(mod).__module__
        for mod in dense.modules()
    )
    x = images(3, seed=5)
    enc = m.encoder().eval()
    torch.testing.assert_close(enc(x), dense.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CPU_MODELS)
def test_masked_units_do_not_leak_into_visible_features(name):
    torch.manual_seed(2)
    m = build_method("spark", cfg_for(name))
    enc = m.encoder().eval()
    mask = kernels.spark_masks(2, 4, 4, 0.6, seed=3)
    active = ~mask
    x = images(2)
    noise = images(2, seed=7) * upsample(mask, 8).unsqueeze(1)
    with kernels.sparse_context(active):
        f1 = enc.forward_features(x)
    with kernels.sparse_context(active):
        f2 = enc.forward_features(x + noise)  # only masked units change
    for f, g, s in zip(f1, f2, enc.feature_strides):
        a = upsample(active, 8 // s).unsqueeze(1).expand_as(f)
        torch.testing.assert_close(f[a], g[a], rtol=1e-5, atol=1e-5)
    # and a dense run does see the masked content at visible sites (the sparse run is not trivially masked)
    d1, d2 = enc.forward_features(x), enc.forward_features(x + noise)
    assert not torch.allclose(d1[-1], d2[-1])


def upsample(m, f):
    return m.repeat_interleave(f, 1).repeat_interleave(f, 2) if f > 1 else m


def test_spark_loss_counts_masked_patches_only():
    torch.manual_seed(3)
    x, rec = images(2, 16), torch.randn(2, 3, 16, 16)
    mask = torch.tensor([[[True, False], [False, True]], [[False, False], [True, False]]])
    loss = spark_loss(rec, x, mask, 8)
    t = patchify(x, 8)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    per = (patchify(rec, 8) - t).pow(2).mean(-1)
    torch.testing.assert_close(loss, per[mask.reshape(2, -1)].mean())
    rec2 = rec + 5 * upsample(~mask, 8).unsqueeze(1)  # change only visible patches
    torch.testing.assert_close(spark_loss(rec2, x, mask, 8), loss)


@pytest.mark.parametrize("name", CPU_MODELS)
def test_training_lowers_loss(name):
    torch.manual_seed(4)
    m = build_method("spark", cfg_for(name))
    B = 6
    mask = m.loader_kwargs()["mask_fn"](B, 1)["mask"]
    assert mask.shape == (B, 4, 4) and (~mask).reshape(B, -1).sum(1).tolist() == [6] * B
    batch = {"images": images(B), "mask": mask}
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        out = m(batch)
        opt.zero_grad()
        out["loss"].backward()
        if step == 0:
            assert all(float(t.grad.abs().sum()) > 0 for t in m.densify.mask_tokens)
            stem = m.encoder().conv1 if name.startswith("resnet") else m.encoder().downsample_layers[0][0]
            assert float(stem.weight.grad.abs().sum()) > 0
        opt.step()
        losses.append(out["loss"].item())
    # noise images: the masked targets are unpredictable, so the fixed batch is fitted slowly but steadily
    assert losses[-1] < losses[0] - 0.015 and sum(b < a for a, b in zip(losses, losses[1:])) >= 6, losses


def test_bad_model_and_grid():
    with pytest.raises(ValueError, match="convnet --model"):
        build_method("spark", cfg_for("vit_pico"))
    with pytest.raises(ValueError, match="divisible"):
        build_method("spark", cfg_for("resnet_femto", image_size=36))
    with pytest.raises(ValueError, match="no visible unit"):
        build_method("spark", cfg_for("resnet_femto", image_size=8))


def test_cli_smoke(tmp_path):
    """Also runs the paper's optimiser (LAMB): its state lands in the checkpoint."""
    args = "--method spark --model resnet_femto --decoder-width 64 --batch-size 8 --max-steps 2 --optimizer lamb"
    r = run_pretrain(*args.split(), "--num-threads", "1", "--no-final-knn", "--output-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "model resnet_femto" in r.stdout and "trained 2/2 steps" in r.stdout
    state = torch.load(tmp_path / "checkpoint-last.pt", map_location="cpu", weights_only=False)
    assert state["encoder_config"]["arch"] == "resnet"
    assert state["config"]["optimizer"] == "lamb"
    assert all(s["step"] == 2 and "exp_avg_sq" in s for s in state["optimizer"]["state"].values())
    dense = build_convnet("resnet_femto")
    dense.load_state_dict({k[len("net.") :]: v for k, v in state["model"].items() if k.startswith("net.")})
