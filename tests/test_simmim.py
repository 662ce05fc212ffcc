"""SimMIM: loss formula, masks from the loader's mask_fn, a few steps lower the loss on a fixed batch."""

import pytest
import torch
import torch.nn.functional as F
from conftest import losses_on_fixed_batch

import kernels
from engine.methods import build_method
from engine.methods.simmim import default_mask_patch

CFG = dict(model="vit_femto", image_size=32, mask_ratio=0.6, drop_path=0.0, init_values=0.1, qv_bias=True,
           use_shared_rel_pos_bias=True, use_abs_pos_emb=False, pool="mean")


def test_default_mask_patch():
    assert default_mask_patch(224, 16) == 32 and default_mask_patch(192, 16) == 32
    assert default_mask_patch(32, 4) == 8 and default_mask_patch(48, 4) == 12 and default_mask_patch(32, 8) == 8


def test_mask_fn_uses_simmim_masks():
    m = build_method("simmim", CFG)
    fn = m.loader_kwargs()["mask_fn"]
    out = fn(5, 123)
    expect = kernels.simmim_masks(5, 32, 8, 4, 0.6, seed=123)
    assert torch.equal(out["mask"], expect)
    assert out["mask"].shape == (5, 8, 8)
    # 8-px mask units on a 4-px patch grid: 2x2 blocks, ceil(0.6 * 16) = 10 of the 16 units masked
    assert torch.all(out["mask"].float().sum((1, 2)) == 10 * 4)
    assert torch.equal(out["mask"][:, ::2, ::2], out["mask"][:, 1::2, 1::2])


def test_loss_matches_formula():
    torch.manual_seed(0)
    m = build_method("simmim", CFG).eval()
    x = torch.randn(3, 3, 32, 32)
    mask = kernels.simmim_masks(3, 32, 8, 4, 0.6, seed=1)
    loss = m({"images": x, "mask": mask})["loss"]
    rec = m.reconstruct(x, mask)
    assert rec.shape == x.shape
    pm = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).float()
    expect = (F.l1_loss(x, rec, reduction="none") * pm).sum() / (pm.sum() + 1e-5) / 3
    torch.testing.assert_close(loss, expect)
    # only masked pixels count: changing the image at visible positions only moves the loss through the encoder,
    # so zero the decoder and compare with the masked mean of |x|
    with torch.no_grad():
        for p in m.decoder.parameters():
            p.zero_()
    expect0 = (x.abs() * pm).sum() / (pm.sum() + 1e-5) / 3
    torch.testing.assert_close(m({"images": x, "mask": mask})["loss"], expect0)


def test_decoder_is_conv1x1_pixelshuffle():
    m = build_method("simmim", CFG)
    conv, shuffle = m.decoder
    assert conv.kernel_size == (1, 1) and conv.out_channels == 4 * 4 * 3 and shuffle.upscale_factor == 4


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    m = build_method("simmim", CFG)
    x = torch.randn(8, 3, 32, 32)
    batch = {"images": x, "mask": kernels.simmim_masks(8, 32, 8, 4, 0.6, seed=0)}
    losses = losses_on_fixed_batch(m, batch, lr=2e-3, steps=15)
    assert losses[-1] < 0.9 * losses[0], losses


def test_bad_mask_config():
    with pytest.raises(ValueError, match="divisible"):
        m = build_method("simmim", dict(CFG, mask_patch_size=12))
        m.loader_kwargs()["mask_fn"](2, 0)


def _local_normalize_loops(x, window, eps=1e-6):
    """Each pixel by hand: mean and unbiased variance of the in-image pixels of its window, per channel."""
    B, C, H, W = x.shape
    r = window // 2
    out = torch.empty_like(x)
    for i in range(H):
        for j in range(W):
            nb = x[:, :, max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].reshape(B, C, -1)
            out[:, :, i, j] = (x[:, :, i, j] - nb.mean(-1)) / (nb.var(-1, unbiased=True) + eps).sqrt()
    return out


@pytest.mark.parametrize("window,shape", [(3, (2, 3, 7, 9)), (5, (1, 3, 6, 5)), (7, (1, 2, 4, 4))])
def test_local_normalize_matches_a_per_pixel_loop(window, shape):
    from engine.methods.simmim import local_normalize

    x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(local_normalize(x, window), _local_normalize_loops(x, window))


def test_norm_target_window_regresses_locally_normalised_pixels():
    from engine.methods.simmim import local_normalize

    torch.manual_seed(0)
    m = build_method("simmim", dict(CFG, norm_target_window=5)).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = kernels.simmim_masks(2, 32, 8, 4, 0.6, seed=1)
    rec = m.reconstruct(x, mask)
    pm = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).float()
    t = local_normalize(x, 5)
    expect = (F.l1_loss(t, rec, reduction="none") * pm).sum() / (pm.sum() + 1e-5) / 3
    torch.testing.assert_close(m({"images": x, "mask": mask})["loss"], expect)
    assert not torch.allclose(expect, (F.l1_loss(x, rec, reduction="none") * pm).sum() / (pm.sum() + 1e-5) / 3)
    with pytest.raises(ValueError, match="--norm-target-window: expected an odd number of pixels, got 4"):
        build_method("simmim", dict(CFG, norm_target_window=4))


def test_reconstruction_picture_undoes_the_target_normalisation():
    from engine.methods.simmim import local_stats
    from engine.viz.reconstruction import predict

    torch.manual_seed(0)
    m = build_method("simmim", dict(CFG, norm_target_window=5)).eval()
    x = torch.randn(2, 3, 32, 32)
    out = predict(m, x, seed=3)
    mask = m.mask_fn()(2, 3)["mask"]
    mean, std = local_stats(x, 5)
    torch.testing.assert_close(out["pred"], m.reconstruct(x, mask) * std + mean)
