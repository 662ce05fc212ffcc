"""Mask generators: batch 2048 on a 14 x 14 grid, native C++ (1 thread and all threads) vs Python reference."""

import pytest
import torch

import kernels
from kernels import use_backend

B, H, W = 2048, 14, 14

CASES = {
    "blockwise_masks": (lambda: kernels.blockwise_masks(B, H, W, 75, seed=0), "B2048 14x14 75 masked"),
    "simmim_masks": (lambda: kernels.simmim_masks(B, 224, 32, 16, 0.6, seed=0), "B2048 224px unit32 patch16"),
    "spark_masks": (lambda: kernels.spark_masks(B, 7, 7, 0.6, seed=0), "B2048 7x7"),
    "random_masks": (lambda: kernels.random_masks(B, 196, 0.75, seed=0), "B2048 N196"),
}


def _with(backend, fn, threads=None):
    def run():
        old = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            with use_backend(backend):
                return fn()
        finally:
            torch.set_num_threads(old)

    return run


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("provider,backend,threads", [
    ("native", "native", 1), ("native-all-threads", "native", None), ("reference", "reference", 1),
])
def test_mask_generator(bench, name, provider, backend, threads):
    fn, shape = CASES[name]
    rounds = 3 if backend == "reference" else 20
    bench(_with(backend, fn, threads), kernel=name, provider=provider, shape=shape, dtype=torch.bool,
          device="cpu", rounds=rounds, threads=threads or torch.get_num_threads())
