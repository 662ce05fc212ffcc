"""Data-loading throughput: DALI pipelines vs the torch DataLoader fallback on the same cores.

A folder of JPEGs (random colour fields, ~256 px, made by ``engine.data.synthetic_dataset``) is read for one
epoch per timed round. Two recipes: decode + RandomResizedCrop + flip + normalise at 224 px (SimMIM/SparK),
and DINO multi-crop (2 x 224 + 8 x 96 with jitter/grayscale/blur/solarise). ``extra_info["images_per_s"]`` is
images / median epoch time. DALI uses ``num_threads`` CPU threads (or the GPU decoder and operators on a
CUDA machine), the fallback ``num_workers`` = the same number. Loaders are built and run once (index scan,
pipeline build, worker start-up) before timing, so the rounds measure steady-state epochs.
"""

import os

import pytest
import torch

from engine import data

NUM_IMAGES = int(os.environ.get("BENCH_DATA_IMAGES", "256"))
THREADS = int(os.environ.get("BENCH_DATA_THREADS", "2"))
BATCH = 32
HAVE_DALI = data.dali_available()[0]


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    return data.synthetic_dataset(
        tmp_path_factory.mktemp("bench_jpegs"), num_images=NUM_IMAGES, image_size=256, num_classes=8, seed=0
    )


def _epoch(loader):
    n = 0
    for batch in loader:
        n += len(batch["labels"])
    return n


def _run(bench, benchmark, folder, method, backend, device, rounds):
    if backend == "dali" and not HAVE_DALI:
        pytest.skip("nvidia.dali not importable")
    kw = {"local_crops": 8} if method == "dino" else {}
    loader = data.build_pretrain_loader(
        method,
        folder,
        batch_size=BATCH,
        image_size=224,
        num_threads=THREADS,
        device=device,
        backend=backend,
        **kw,
    )
    seen = _epoch(loader)  # warm-up: pipeline build / worker start, page cache
    assert seen == len(loader) * BATCH
    recipe = "RRC(0.67,1)+flip+norm 224" if method != "dino" else "2x224+8x96 multi-crop"
    bench(
        _epoch,
        loader,
        kernel=f"data_{method}",
        provider=backend,
        shape=f"{NUM_IMAGES} JPEG ~256px, {recipe}, B{BATCH}, {THREADS} threads/workers",
        device=device,
        rounds=rounds,
        images=seen,
    )
    benchmark.extra_info["images_per_s"] = seen / benchmark.extra_info["median_s"]


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_bench_rrc_flip_normalise(bench, benchmark, jpeg_folder, backend):
    _run(bench, benchmark, jpeg_folder, "simmim", backend, "cpu", rounds=3)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_bench_dino_multicrop(bench, benchmark, jpeg_folder, backend):
    _run(bench, benchmark, jpeg_folder, "dino", backend, "cpu", rounds=2)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["simmim", "dino"])
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_bench_gpu(bench, benchmark, jpeg_folder, method, backend):
    assert torch.cuda.is_available()
    _run(bench, benchmark, jpeg_folder, method, backend, "cuda", rounds=3)
