"""Data-loading throughput: DALI pipelines vs the torch DataLoader fallback (and torchvision) on the same cores.

A folder of JPEGs (random colour fields, ~256 px, made by ``engine.data.synthetic_dataset``) is read for one
epoch per timed round. Two recipes: decode + RandomResizedCrop + flip + normalise at 224 px (SimMIM/SparK),
and DINO multi-crop (2 x 224 + 8 x 96 with jitter/grayscale/blur/solarise). ``extra_info["images_per_s"]`` is
images / median epoch time. DALI uses ``num_threads`` CPU threads (or the GPU decoder and operators on a
CUDA machine), the fallback ``num_workers`` = the same number. Loaders are built and run once (index scan,
pipeline build, worker start-up) before timing, so the rounds measure steady-state epochs.
``torchvision`` (when importable): ``ImageFolder`` + torchvision transforms of the same recipe in a
``DataLoader`` with the same number of workers -- the loader most codebases use (issue 3's 3x target).
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


def _torchvision_loader(folder, method):
    """The common torchvision recipe of ``method`` (the same crops, flips, jitter, blur and solarisation)."""
    pytest.importorskip("torchvision", reason="torchvision is not installed")
    from torchvision import datasets
    from torchvision import transforms as T

    norm = T.Compose([T.ToTensor(), T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])
    if method != "dino":
        transform = T.Compose([T.RandomResizedCrop(224, scale=(0.67, 1.0)), T.RandomHorizontalFlip(), norm])
    else:
        def view(size, scale, blur_p, solarize_p=0.0):
            return T.Compose([
                T.RandomResizedCrop(size, scale=scale), T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                T.RandomApply([T.GaussianBlur(23, sigma=(0.1, 2.0))], p=blur_p),
                T.RandomSolarize(128, p=solarize_p), norm,
            ])

        g1, g2, loc = view(224, (0.4, 1.0), 1.0), view(224, (0.4, 1.0), 0.1, 0.2), view(96, (0.05, 0.4), 0.5)

        def transform(img):
            return [g1(img), g2(img)] + [loc(img) for _ in range(8)]

    dataset = datasets.ImageFolder(str(folder), transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=THREADS,
                                       drop_last=True, persistent_workers=THREADS > 0)


def _run_torchvision(bench, benchmark, folder, method, rounds):
    loader = _torchvision_loader(folder, method)

    def epoch():
        return sum(len(labels) for _, labels in loader)

    seen = epoch()
    recipe = "RRC(0.67,1)+flip+norm 224" if method != "dino" else "2x224+8x96 multi-crop"
    bench(epoch, kernel=f"data_{method}", provider="torchvision",
          shape=f"{NUM_IMAGES} JPEG ~256px, {recipe}, B{BATCH}, {THREADS} threads/workers", rounds=rounds,
          images=seen)
    benchmark.extra_info["images_per_s"] = seen / benchmark.extra_info["median_s"]


@pytest.mark.parametrize("backend", ["dali", "torch", "torchvision"])
def test_bench_rrc_flip_normalise(bench, benchmark, jpeg_folder, backend):
    if backend == "torchvision":
        _run_torchvision(bench, benchmark, jpeg_folder, "simmim", rounds=3)
    else:
        _run(bench, benchmark, jpeg_folder, "simmim", backend, "cpu", rounds=3)


@pytest.mark.parametrize("backend", ["dali", "torch", "torchvision"])
def test_bench_dino_multicrop(bench, benchmark, jpeg_folder, backend):
    if backend == "torchvision":
        _run_torchvision(bench, benchmark, jpeg_folder, "dino", rounds=2)
    else:
        _run(bench, benchmark, jpeg_folder, "dino", backend, "cpu", rounds=2)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["simmim", "dino"])
@pytest.mark.parametrize("backend", ["dali", "torch", "torchvision"])
def test_bench_gpu(bench, benchmark, jpeg_folder, method, backend):
    from bench.conftest import DRY_RUN

    if DRY_RUN:
        pytest.skip("data loading is not part of the GPU plan (the GPU image has no DALI)")
    assert torch.cuda.is_available()
    if backend == "torchvision":  # a CPU loader: the GPU run compares DALI's GPU path with it
        _run_torchvision(bench, benchmark, jpeg_folder, method, rounds=3)
    else:
        _run(bench, benchmark, jpeg_folder, method, backend, "cuda", rounds=3)
