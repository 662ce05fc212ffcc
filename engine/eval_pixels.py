"""The raw-pixel floor of k-NN evaluation: the same weighted k-NN as :mod:`engine.eval`, on the evaluation
views' pixels themselves (resize + centre crop, ImageNet-normalised, flattened to ``3 * S * S`` values).

An encoder that cannot beat this on a dataset has learnt nothing k-NN can use beyond the pixels (the built-in
8 x 8-origin digits are easy for pixels: about 94%).

    python -m engine.eval_pixels [--data DIR] [--image-size 32] [--k 20] [--temperature 0.07]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn


class Pixels(nn.Module):
    """An "encoder" whose features are the flattened input pixels."""

    def forward(self, x: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        return x.flatten(1)


def raw_pixel_knn(data_dir, image_size: int, k: int = 20, temperature: float = 0.07, batch_size: int = 256,
                  num_threads: int = 2) -> dict[str, float]:
    """``{"knn_top1", "knn_top5"}`` (percent) of the weighted k-NN on raw pixels of ``data_dir``'s
    ``train/`` and ``val/`` splits at ``image_size`` (the evaluation transform of :mod:`engine.eval`)."""
    from engine.eval import knn_eval

    return knn_eval(Pixels(), data_dir, image_size=image_size, device="cpu", pool=None, k=k,
                    temperature=temperature, batch_size=batch_size, num_threads=num_threads)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.eval_pixels", description=__doc__.splitlines()[0])
    p.add_argument("--data", help="folder with train/ and val/ (default: the built-in digits)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    args = p.parse_args(argv)
    if args.data is None:
        from engine.data import builtin_dataset

        data = builtin_dataset(image_size=args.image_size)
    else:
        data = args.data
    res = raw_pixel_knn(data, args.image_size, k=args.k, temperature=args.temperature)
    print(f"knn_top1 raw_pixels={res['knn_top1']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
