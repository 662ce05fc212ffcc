"""Mask generators: exact counts, determinism, distribution agreement of native and reference."""

import math

import pytest
import torch

import kernels
from kernels import use_backend

BACKENDS = ["native", "reference"]
GRIDS = [(1, 1), (7, 7), (14, 14), (20, 13)]


def _blockwise(backend, *args, **kwargs):
    with use_backend(backend, op="blockwise_masks"):
        return kernels.blockwise_masks(*args, **kwargs)


@pytest.fixture(params=BACKENDS)
def backend(request):
    with use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("grid", GRIDS)
def test_blockwise_exact_count(backend, grid):
    h, w = grid
    n = h * w
    for num_masked in sorted({0, 1, n // 3, round(0.4 * n), n - 1, n}):
        m = kernels.blockwise_masks(16, h, w, num_masked, min_block=min(16, max(1, num_masked)), seed=5)
        assert m.dtype == torch.bool and m.shape == (16, h, w)
        assert (m.flatten(1).sum(1) == num_masked).all(), (grid, num_masked, m.flatten(1).sum(1))


def test_blockwise_default_beit(backend):
    m = kernels.blockwise_masks(64, 14, 14, 75, seed=0)
    assert (m.flatten(1).sum(1) == 75).all()
    # blockwise, not scattered: most masked patches have a masked 4-neighbour
    f = m.float()
    nb = torch.zeros_like(f)
    nb[:, 1:] += f[:, :-1]
    nb[:, :-1] += f[:, 1:]
    nb[:, :, 1:] += f[:, :, :-1]
    nb[:, :, :-1] += f[:, :, 1:]
    isolated = ((nb == 0) & m).sum() / m.sum()
    assert isolated < 0.05, float(isolated)


@pytest.mark.parametrize(
    "gen",
    [
        lambda s: kernels.blockwise_masks(8, 20, 13, 100, seed=s),
        lambda s: kernels.simmim_masks(8, 192, 32, 16, 0.6, seed=s),
        lambda s: kernels.spark_masks(8, 7, 9, 0.6, seed=s),
        lambda s: kernels.random_masks(8, 50, 0.75, seed=s)[2],
    ],
    ids=["blockwise", "simmim", "spark", "random"],
)
def test_determinism_under_seed(backend, gen):
    assert torch.equal(gen(3), gen(3))
    assert not torch.equal(gen(3), gen(4))
    torch.manual_seed(11)
    a = gen(None)
    torch.manual_seed(11)
    assert torch.equal(a, gen(None))


def test_native_independent_of_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = _blockwise("native", 33, 14, 14, 75, seed=9)
        torch.set_num_threads(2)
        b = _blockwise("native", 33, 14, 14, 75, seed=9)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)


def _stats(m):
    """Per-mask statistics of a block pattern: bounding box height/width, masked-run counts, per-row mass."""
    rows = m.any(2).float()
    cols = m.any(1).float()
    f = m.float()
    horiz_runs = (f[:, :, 1:] > f[:, :, :-1]).sum((1, 2)) + f[:, :, 0].sum(1)
    return {
        "bbox_h": rows.sum(1),
        "bbox_w": cols.sum(1),
        "runs": horiz_runs.float(),
        "log_aspect": torch.log(rows.sum(1).clamp(min=1) / cols.sum(1).clamp(min=1)),
    }


@pytest.mark.parametrize("num_masked,min_block", [(75, 16), (16, 16), (40, 4)])
def test_native_and_reference_agree_in_distribution(num_masked, min_block):
    draws = 600
    a = _stats(_blockwise("native", draws, 14, 14, num_masked, min_block=min_block, seed=1))
    b = _stats(_blockwise("reference", draws, 14, 14, num_masked, min_block=min_block, seed=2))
    for key in a:
        se = math.sqrt((a[key].var() + b[key].var()).item() / draws) + 1e-9
        diff = abs(a[key].mean() - b[key].mean()).item()
        assert diff < 4.5 * se, f"{key}: native mean {a[key].mean():.3f} vs reference {b[key].mean():.3f} (se {se:.3f})"


def test_single_block_shape_follows_algorithm(backend):
    # With num_masked = min_block = 16 the first block has area 16 and log-uniform aspect in [0.3, 1/0.3];
    # it is accepted only if round(sqrt(16 r)) * round(sqrt(16 / r)) <= 16.
    m = kernels.blockwise_masks(800, 14, 14, 16, min_block=16, seed=7)
    s = _stats(m)
    assert abs(s["log_aspect"].mean().item()) < 0.08  # symmetric in h and w
    single = s["bbox_h"] * s["bbox_w"] == 16  # the 16 masked patches form one rectangle
    # a first try is a 4 x 4 block with probability ~0.2 (|log r| < 0.236 of the range +-1.204), and the only
    # area-16 rectangle the rounding rule can produce in the aspect range; 8 x 2 only arises from two blocks
    assert single.float().mean() > 0.15
    square = (s["bbox_h"][single] == 4) & (s["bbox_w"][single] == 4)
    assert square.float().mean() > 0.9


@pytest.mark.parametrize("image_size,mask_patch,model_patch,ratio", [(224, 32, 16, 0.6), (32, 8, 4, 0.6), (96, 32, 32, 0.5)])
def test_simmim_masks(backend, image_size, mask_patch, model_patch, ratio):
    m = kernels.simmim_masks(10, image_size, mask_patch, model_patch, ratio, seed=0)
    g = image_size // model_patch
    s = mask_patch // model_patch
    units = (image_size // mask_patch) ** 2
    assert m.shape == (10, g, g) and m.dtype == torch.bool
    assert (m.flatten(1).sum(1) == math.ceil(ratio * units) * s * s).all()
    unit = m[:, ::s, ::s]
    assert torch.equal(m, unit.repeat_interleave(s, 1).repeat_interleave(s, 2))


@pytest.mark.parametrize("grid", GRIDS[1:])
def test_spark_masks(backend, grid):
    h, w = grid
    m = kernels.spark_masks(12, h, w, 0.6, seed=1)
    assert m.shape == (12, h, w) and m.dtype == torch.bool
    assert (m.flatten(1).sum(1) == h * w - round(0.4 * h * w)).all()


def test_choose_k_is_uniform(backend):
    m = kernels.spark_masks(4000, 5, 5, 0.6, seed=0).flatten(1).float()
    freq = m.mean(0)
    p = 15 / 25
    se = math.sqrt(p * (1 - p) / 4000)
    assert (freq - p).abs().max() < 5 * se, freq


@pytest.mark.parametrize("n,ratio", [(196, 0.75), (13, 0.5), (1, 0.3)])
def test_random_masks(backend, n, ratio):
    ids_keep, ids_restore, mask = kernels.random_masks(7, n, ratio, seed=2)
    keep = int(n * (1 - ratio))
    assert ids_keep.shape == (7, keep) and ids_restore.shape == (7, n) and mask.shape == (7, n)
    assert ids_keep.dtype == ids_restore.dtype == torch.int64 and mask.dtype == torch.bool
    assert torch.equal(ids_restore.sort(1).values, torch.arange(n).expand(7, n))
    assert (mask.sum(1) == n - keep).all()
    assert not mask.gather(1, ids_keep).any()
    # ids_restore maps shuffled order back: kept tokens sit at positions < keep
    assert torch.equal(ids_restore.gather(1, ids_keep), torch.arange(keep).expand(7, keep))


@pytest.mark.parametrize(
    "call,arg",
    [
        (lambda: kernels.blockwise_masks(0, 14, 14, 75), "batch_size"),
        (lambda: kernels.blockwise_masks(2, 0, 14, 75), "grid_h"),
        (lambda: kernels.blockwise_masks(2, 14, -1, 75), "grid_w"),
        (lambda: kernels.blockwise_masks(2, 14, 14, 197), "num_masked"),
        (lambda: kernels.blockwise_masks(2, 14, 14, 75, min_block=0), "min_block"),
        (lambda: kernels.simmim_masks(2, 224, 32, 16, 1.0), "ratio"),
        (lambda: kernels.simmim_masks(2, 224, 32, 16, 0.0), "ratio"),
        (lambda: kernels.simmim_masks(2, 100, 32, 16, 0.6), "image_size"),
        (lambda: kernels.simmim_masks(2, 224, 32, 12, 0.6), "mask_patch_size"),
        (lambda: kernels.spark_masks(2, 7, 7, 1.5), "ratio"),
        (lambda: kernels.random_masks(2, 0, 0.5), "num_tokens"),
        (lambda: kernels.random_masks(2, 10, -0.1), "ratio"),
        (lambda: kernels.spark_masks(2, 7, 7, 0.6, seed=-1), "seed"),
    ],
)
def test_bad_arguments_name_the_argument(call, arg):
    with pytest.raises(ValueError, match=arg):
        call()
