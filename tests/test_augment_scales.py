"""Augmentation scales that follow the image size (engine.data.augment): the published crop scales and blur
radii at >= 192 / 224 px, milder ones on small images, explicit crop scales kept as given; recipe variants."""

import math

import pytest

from engine.data import augment, pretrain_recipe

PUBLISHED = {"simmim": (0.67, 1.0), "spark": (0.67, 1.0), "beit": (0.08, 1.0), "beitv2": (0.2, 1.0),
             "dino": (0.4, 1.0)}


@pytest.mark.parametrize("method", sorted(PUBLISHED))
def test_published_scales_from_192_px_and_milder_below(method):
    for S in (192, 224, 448):
        assert pretrain_recipe(method, S).views[0].scale == pytest.approx(PUBLISHED[method])
    prev = PUBLISHED[method][0]
    for S in (160, 112, 64, 32):  # monotone: the smaller the image, the larger the kept area
        lo, hi = pretrain_recipe(method, S).views[0].scale
        g = (S / 192) ** (1 / 3)
        assert lo == pytest.approx(PUBLISHED[method][0] ** g) and hi == 1.0 and lo > prev
        prev = lo
    assert pretrain_recipe(method, 32, crop_scale=(0.3, 0.9)).views[0].scale == (0.3, 0.9)


def test_dino_local_crops_and_blur_follow_the_size():
    r = pretrain_recipe("dino", 32, local_crops=2)
    g_lo = r.views[0].scale[0]
    assert r.views[2].scale == pytest.approx((0.05 ** (32 / 192) ** (1 / 3), g_lo))
    assert r.views[0].blur_sigma == pytest.approx((0.1, 2.0 * 32 / 224))
    assert pretrain_recipe("dino", 224).views[0].blur_sigma == (0.1, 2.0)
    # an explicit global scale below the size-scaled local lower bound: local crops end at it
    r = pretrain_recipe("dino", 32, local_crops=2, crop_scale=(0.14, 1.0))
    assert r.views[2].scale == (0.14, 0.14)
    assert augment.size_scaled_blur(8) == (0.1, 0.1)


def test_recipe_variants_carry_options_to_the_loader():
    name = augment.recipe_variant("dino", color_jitter=0.5, local_crops_scale=(0.2, 0.5))
    assert augment.recipe_variant("dino") == "dino" and name.startswith("dino[")
    r = pretrain_recipe(name, 32, local_crops=2)
    assert r.method == "dino" and r.views[0].jitter == pytest.approx((0.2, 0.2, 0.1, 0.05))
    assert r.views[2].scale == (0.2, 0.5)
    none = pretrain_recipe(augment.recipe_variant("dino", color_jitter=0.0), 32)
    assert all(v.jitter_p == 0 for v in none.views) and all(v.gray_p == 0.2 for v in none.views)
    assert pretrain_recipe("beit", 32, color_jitter=0.5).views[0].jitter == (0.2, 0.2, 0.2, 0.0)
    with pytest.raises(ValueError, match="unknown recipe option"):
        augment.recipe_variant("dino", hue=0.1)
    with pytest.raises(ValueError, match="local_crops_scale"):
        pretrain_recipe(augment.recipe_variant("dino", local_crops_scale=(0.5, 0.2)), 32)
