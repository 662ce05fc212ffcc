"""The raw-pixel k-NN floor (engine.eval_pixels)."""

from engine.data import builtin_dataset
from engine.eval_pixels import Pixels, main, raw_pixel_knn


def test_raw_pixel_knn_floor():
    res = raw_pixel_knn(builtin_dataset(image_size=32), 32, num_threads=1)
    assert 85.0 < res["knn_top1"] <= 100.0  # ~94% on the built-in digits


def test_pixels_encoder_and_cli(capsys):
    import torch

    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(Pixels()(x, pool="cls"), x.flatten(1))
    assert main(["--image-size", "32"]) == 0
    assert capsys.readouterr().out.startswith("knn_top1 raw_pixels=")
