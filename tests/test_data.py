"""engine.data: built-in dataset, folder index, DALI pipelines of every method, torch fallback, resume."""

import logging
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine import data
from engine.data import augment
from engine.data import folder as folder_mod
from engine.data import core as loader_core
from engine.data import torch_transforms as TT

HAVE_DALI = data.dali_available()[0]
BACKENDS = ["dali", "torch"] if HAVE_DALI else ["torch"]
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia.dali not importable")
MEAN = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
S = 32


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    return data.builtin_dataset(tmp_path_factory.mktemp("cache") / "digits-32", image_size=S)


@pytest.fixture(scope="session")
def ids_folder(tmp_path_factory):
    """61 classes of one image each, so a label identifies the image; non-square sizes."""
    root = tmp_path_factory.mktemp("ids")
    rng = np.random.default_rng(1)
    for i in range(61):
        (root / f"{i:03d}").mkdir()
        img = rng.integers(0, 256, size=(20 + i % 7, 24 + i % 5, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / f"{i:03d}" / "a.png")
    return root


def _pretrain(method, root, backend, **kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("image_size", S)
    kw.setdefault("num_threads", 1)
    if method == "dino":
        kw.setdefault("local_crops", 3)
    return data.build_pretrain_loader(method, root, backend=backend, **kw)


def _flat(batch):
    out = []
    for k in sorted(batch):
        v = batch[k]
        out += [(f"{k}{i}", t) for i, t in enumerate(v)] if isinstance(v, list) else [(k, v)]
    return out


def _assert_same(a, b):
    fa, fb = _flat(a), _flat(b)
    assert [k for k, _ in fa] == [k for k, _ in fb]
    for (k, x), (_, y) in zip(fa, fb):
        assert torch.equal(x, y), f"{k} differs"


def _normalised_ok(x, size):
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert x.dtype == torch.float32 and tuple(x.shape[1:]) == (3, size, size)
    assert torch.isfinite(x).all()
    assert (x >= lo - 1e-5).all() and (x <= hi + 1e-5).all(), "outside the ImageNet-normalised [0,1] range"
    assert x.std() > 0.1, "image carries no signal"


# ----------------------------------------------------------------------------------------------------------
# built-in and synthetic datasets


def test_builtin_dataset_layout_split_and_idempotence(digits):
    train = sorted(p for p in (digits / "train").rglob("*.png"))
    val = sorted(p for p in (digits / "val").rglob("*.png"))
    assert len(train) + len(val) == 1797
    assert sorted(os.listdir(digits / "train")) == [str(c) for c in range(10)]
    names_t, names_v = {p.name for p in train}, {p.name for p in val}
    assert not names_t & names_v, "train and val overlap"
    for c in range(10):  # stratified 80/20 per class
        nt, nv = len(os.listdir(digits / "train" / str(c))), len(os.listdir(digits / "val" / str(c)))
        assert abs(nv - 0.2 * (nt + nv)) <= 1
    with Image.open(train[0]) as im:
        assert im.mode == "RGB" and im.size == (S, S)
    # same content as sklearn: image 0 is a zero
    from sklearn.datasets import load_digits

    d = load_digits()
    first = next(p for p in train + val if p.name == "0000.png")
    assert first.parent.name == str(d.target[0])
    # idempotent, no temp dirs left behind
    mtime = first.stat().st_mtime_ns
    assert data.builtin_dataset(digits, image_size=S) == digits
    assert first.stat().st_mtime_ns == mtime
    assert [p.name for p in digits.parent.iterdir()] == [digits.name]


def test_builtin_dataset_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from engine.data import builtin

    assert builtin.cache_root() == tmp_path / "ssl-engine"
    with pytest.raises(ValueError, match="image_size"):
        data.builtin_dataset(image_size=4)
    squatter = tmp_path / "squat"
    (squatter / "x").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a complete built-in dataset"):
        data.builtin_dataset(squatter, image_size=8)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("squat")] == ["squat"]  # temp dir removed


def test_synthetic_dataset(tmp_path):
    root = data.synthetic_dataset(tmp_path / "syn", num_images=10, image_size=40, num_classes=3, seed=3)
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == 10 and sorted(os.listdir(root)) == ["0", "1", "2"]
    with Image.open(files[0]) as im:
        assert im.format == "JPEG" and 30 <= im.size[0] <= 40
    again = data.synthetic_dataset(tmp_path / "syn2", num_images=10, image_size=40, num_classes=3, seed=3)
    assert (root / "0" / "000000.jpg").read_bytes() == (again / "0" / "000000.jpg").read_bytes()


# ----------------------------------------------------------------------------------------------------------
# image-folder index


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        data.ImageFolder.scan(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        data.build_pretrain_loader("simmim", tmp_path / "empty", batch_size=2, image_size=S)
    (tmp_path / "txt" / "cls").mkdir(parents=True)
    (tmp_path / "txt" / "cls" / "a.txt").write_text("hi")
    with pytest.raises(ValueError, match="contains no images"):
        data.ImageFolder.scan(tmp_path / "txt")
    with pytest.raises(FileNotFoundError, match="missing"):
        data.build_eval_loader(tmp_path, "missing", batch_size=2, image_size=S)


def test_flat_folder_has_unknown_labels(tmp_path, ids_folder):
    for i in range(5):
        Image.open(ids_folder / f"{i:03d}" / "a.png").save(tmp_path / f"{i}.png")
    idx = data.ImageFolder.scan(tmp_path)
    assert len(idx) == 5 and idx.classes == [] and (idx.labels == -1).all()
    batch = next(iter(_pretrain("simmim", tmp_path, BACKENDS[0], batch_size=2)))
    assert batch["labels"].tolist() == [-1, -1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_files_are_skipped_and_counted(tmp_path, ids_folder, backend):
    for i in range(6):
        (tmp_path / "c").mkdir(exist_ok=True)
        Image.open(ids_folder / f"{i:03d}" / "a.png").convert("RGB").save(
            tmp_path / "c" / f"{i}.jpg", quality=90
        )
    good = (tmp_path / "c" / "0.jpg").read_bytes()
    (tmp_path / "c" / "garbage.jpg").write_bytes(os.urandom(500))
    (tmp_path / "c" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    png = (ids_folder / "000" / "a.png").read_bytes()
    (tmp_path / "c" / "truncated.png").write_bytes(png[:-20])
    (tmp_path / "c" / "zero.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 4 unreadable"):
        loader = _pretrain("simmim", tmp_path, backend, batch_size=3)
    assert loader.folder.num_skipped == 4 and len(loader.folder) == 6
    assert {pathlib.Path(p).name for p, _ in loader.folder.skipped} == {
        "garbage.jpg",
        "truncated.jpg",
        "truncated.png",
        "zero.png",
    }
    batches = list(loader)  # a whole epoch, no crash
    assert len(batches) == len(loader) == 2


def test_index_cache_reuses_probes_and_notices_changes(tmp_path, ids_folder, monkeypatch):
    import shutil

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "imgs"
    shutil.copytree(ids_folder, root)
    first = data.ImageFolder.scan(root, cache=True)
    assert list((tmp_path / "cache" / "ssl-engine" / "index").glob("*.npz"))
    calls = []
    real = folder_mod._probe
    monkeypatch.setattr(folder_mod, "_probe", lambda p, full: calls.append(p) or real(p, full))
    second = data.ImageFolder.scan(root, cache=True)
    assert calls == [] and second.files == first.files and np.array_equal(second.sizes, first.sizes)
    victim = root / "005" / "a.png"
    victim.write_bytes(victim.read_bytes()[:-30])  # truncated: new size and mtime
    with pytest.warns(UserWarning, match="skipped 1"):
        third = data.ImageFolder.scan(root, cache=True)
    assert calls == [str(victim)] and len(third) == 60 and third.skipped[0][0] == str(victim)


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_corrupted_after_indexing_does_not_end_the_epoch(tmp_path, ids_folder, backend):
    import shutil

    root = tmp_path / "imgs"
    shutil.copytree(ids_folder, root)
    loader = _pretrain("simmim", root, backend, batch_size=8, num_threads=0, seed=4)
    victim = 7  # label == image id in this folder
    (root / f"{victim:03d}" / "a.png").write_bytes(os.urandom(300))
    step = next(k for k, idx in enumerate(loader.plan(0)) if victim in idx.tolist())
    with pytest.warns(UserWarning, match="failed to decode mid-epoch"):
        batches = list(loader)
    assert len(batches) == len(loader) == 7
    labels = batches[step]["labels"].tolist()
    assert victim not in labels and len(set(labels)) == 7  # replaced by a copy of another sample of its batch
    dup = next(i for i, lab in enumerate(labels) if labels.count(lab) == 2)
    twins = [i for i, lab in enumerate(labels) if lab == labels[dup]]
    assert torch.equal(batches[step]["images"][twins[0]], batches[step]["images"][twins[1]])
    assert any(p.endswith(f"{victim:03d}/a.png") for p, _ in loader.folder.skipped)
    for k, b in enumerate(batches):  # every other batch is untouched
        if k != step:
            assert len(set(b["labels"].tolist())) == 8


# ----------------------------------------------------------------------------------------------------------
# recipes and parameter sampling


def test_recipes():
    assert data.default_local_size(224) == 96 and data.default_local_size(112) == 48
    assert data.default_local_size(32) == 16
    r = data.pretrain_recipe("dino", 224)
    assert len(r.views) == 10 and [v.size for v in r.views] == [224] * 2 + [96] * 8
    assert [v.blur_p for v in r.views[:3]] == [1.0, 0.1, 0.5] and [v.solarize_p for v in r.views[:3]] == [
        0,
        0.2,
        0,
    ]
    assert r.views[0].scale == (0.4, 1.0) and r.views[2].scale == (0.05, 0.4)
    assert data.pretrain_recipe("simmim", 192).views[0].scale == (0.67, 1.0)
    assert data.pretrain_recipe("simmim", 192).views[0].interp == "bilinear"
    assert data.pretrain_recipe("spark", 192).views[0].interp == "bicubic"
    assert all(v.interp == "bicubic" for v in r.views)
    beit = data.pretrain_recipe("beit", 224).views[0]
    assert beit.scale == (0.08, 1.0) and beit.twin.size == 112 and beit.jitter == (0.4, 0.4, 0.4, 0.0)
    assert data.pretrain_recipe("beitv2", 224).views[0].scale == (0.2, 1.0)
    assert data.pretrain_recipe("spark", 64, crop_scale=(0.5, 0.9)).views[0].scale == (0.5, 0.9)
    with pytest.raises(ValueError, match="method"):
        data.pretrain_recipe("mae", 224)
    with pytest.raises(ValueError, match="crop_scale"):
        data.pretrain_recipe("simmim", 224, crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="local_crops"):
        data.pretrain_recipe("dino", 224, local_crops=-1)


def test_random_resized_crop_sampler():
    rng = np.random.default_rng(0)
    n = 5000
    W = rng.integers(20, 400, n)
    H = rng.integers(20, 400, n)
    crop = augment.sample_rrc(rng, W, H, (0.08, 1.0), (3 / 4, 4 / 3))
    x0, y0, w, h = crop.T.astype(np.float64)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= W).all() and (y0 + h <= H).all()
    assert (w >= 1).all() and (h >= 1).all() and (x0 == np.floor(x0)).all()
    frac = w * h / (W * H)
    ok = (frac >= 0.06) & (frac <= 1.0)
    assert ok.mean() > 0.99
    ratio = w / h
    inside = (ratio > 0.7) & (ratio < 1.4)
    assert inside.mean() > 0.98
    # extreme aspect: every try fails -> centre crop with the ratio clamped
    crop = augment.sample_rrc(rng, np.array([400]), np.array([20]), (0.9, 1.0), (3 / 4, 4 / 3))
    x0, y0, w, h = crop[0]
    assert (w, h) == (27, 20) and x0 == np.floor((400 - 27) / 2) and y0 == 0


def test_dino_parameter_rates():
    r = data.pretrain_recipe("dino", 64, local_crops=2)
    n = 20000
    sizes = np.full((n, 2), 64)
    p = augment.sample_recipe(r, sizes, seed=0, epoch=0, shard_id=0, step=0)
    for view, params, blur in zip(r.views, p, (1.0, 0.1, 0.5, 0.5)):
        assert abs(params["blur"].mean() - blur) < 0.02
        assert abs(params["flip"].mean() - 0.5) < 0.02
        jittered = (params["colour"][:, [0, 1, 3]] != [1, 1, 0]).any(1)
        assert abs(jittered.mean() - 0.8) < 0.02
        assert abs((params["colour"][:, 2] == 0).mean() - 0.2) < 0.02
        assert (params["sigma"] >= 0.1).all() and (params["sigma"] <= 2.0).all()
        b, c, s, hue = params["colour"][jittered].T
        assert b.min() >= 0.6 and b.max() <= 1.4 and c.min() >= 0.6 and c.max() <= 1.4
        assert np.abs(hue).max() <= 36.0 + 1e-4 and np.abs(hue).max() > 30
    assert abs(p[1]["solarize"].mean() - 0.2) < 0.02
    assert not p[0]["solarize"].any() and not p[2]["solarize"].any()
    # keyed randomness: same key same draw, any other key a different draw
    q = augment.sample_recipe(r, sizes[:50], seed=0, epoch=0, shard_id=0, step=0)
    q2 = augment.sample_recipe(r, sizes[:50], seed=0, epoch=0, shard_id=0, step=1)
    q3 = augment.sample_recipe(r, sizes[:50], seed=0, epoch=1, shard_id=0, step=0)
    assert np.array_equal(
        q[0]["crop"], augment.sample_recipe(r, sizes[:50], seed=0, epoch=0, shard_id=0, step=0)[0]["crop"]
    )
    assert not np.array_equal(q[0]["crop"], q2[0]["crop"]) and not np.array_equal(q[0]["crop"], q3[0]["crop"])


# ----------------------------------------------------------------------------------------------------------
# DALI operators vs the torch fallback's re-implementation


def _dali_run(graph_fn, batch):
    from nvidia.dali import pipeline_def

    pipe = pipeline_def(graph_fn)(batch_size=len(batch), num_threads=1, device_id=None)
    pipe.build()
    return [np.array(o.as_tensor()) for o in pipe.run()]


@needs_dali
@pytest.mark.parametrize(
    "twist",
    [
        (1.3, 1.0, 1.0, 0.0),
        (1.0, 0.6, 1.0, 0.0),
        (1.0, 1.0, 0.3, 0.0),
        (1.0, 1.0, 1.0, 33.0),
        (0.8, 1.25, 1.4, -20.0),
        (1.1, 0.9, 0.0, 10.0),
    ],
)
def test_colour_twist_matches_dali(twist):
    from nvidia.dali import fn

    img = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    b, c, s, h = twist
    (out,) = _dali_run(
        lambda: fn.color_twist(
            fn.external_source(lambda: [img], batch=True, layout="HWC"),
            brightness=b,
            contrast=c,
            saturation=s,
            hue=h,
        ),
        [img],
    )
    ours = TT.colour_twist(torch.from_numpy(img).permute(2, 0, 1), b, c, s, h).permute(1, 2, 0).numpy()
    diff = np.abs(out[0].astype(int) - ours.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.3, (diff.max(), diff.mean())


@needs_dali
@pytest.mark.parametrize("sigma", [0.3, 1.1, 2.0])
def test_gaussian_blur_and_solarize_match_dali(sigma):
    from nvidia.dali import fn

    img = np.random.default_rng(1).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    (out,) = _dali_run(
        lambda: fn.gaussian_blur(fn.external_source(lambda: [img], batch=True, layout="HWC"), sigma=sigma),
        [img],
    )
    ours = TT.gaussian_blur(torch.from_numpy(img).permute(2, 0, 1), sigma).permute(1, 2, 0).numpy()
    diff = np.abs(out[0].astype(int) - ours.astype(int))
    assert diff.max() <= 1, diff.max()
    t = torch.tensor([[[0, 127, 128, 255]]], dtype=torch.uint8)
    assert TT.solarize(t).tolist() == [[[0, 127, 127, 0]]]


@needs_dali
@pytest.mark.parametrize("method", ["simmim", "beit", "beitv2", "dino", "eval"])
def test_gpu_graphs_trace_with_gpu_operators(method, monkeypatch):
    """No GPU here: trace the device="gpu" graphs without building them. DALI checks operator/device placement
    while tracing (a GPU node as a named argument, a GPU input to the mixed decoder, ... raise), and every
    output must live on the GPU."""
    from nvidia.dali import Pipeline

    from engine.data import dali_pipeline

    monkeypatch.setattr(Pipeline, "build", lambda self: None)
    if method == "eval":
        pipe = dali_pipeline.build_eval_pipeline(
            image_size=S, batch_size=4, num_threads=1, device="gpu", device_id=0
        )
        n_out = 1
    else:
        recipe = data.pretrain_recipe(method, S, local_crops=2)
        pipe = dali_pipeline.build_pretrain_pipeline(
            recipe, batch_size=4, num_threads=1, device="gpu", device_id=0, prefetch=2
        )
        n_out = len(recipe.views) + sum(v.twin is not None for v in recipe.views)
    outs = getattr(pipe, "_graph_out", None)
    if outs is not None:  # private attribute of DALI 2.x
        assert len(outs) == n_out and all(o.device == "gpu" for o in outs)


@needs_dali
@pytest.mark.cuda
@pytest.mark.parametrize("method", ["simmim", "spark", "beit", "beitv2", "dino", "eval"])
def test_gpu_pipelines_match_cpu(digits, method, device):
    """--device cuda: the GPU graphs (nvJPEG + GPU operators) give the CPU graphs' batches on the GPU."""
    if device.type != "cuda":
        pytest.skip("needs --device cuda")

    def first(dev):
        if method == "eval":
            return next(iter(data.build_eval_loader(digits, batch_size=16, image_size=S, device=dev)))
        return next(iter(_pretrain(method, digits, "dali", batch_size=16, local_crops=2, device=dev)))

    cpu, gpu = first("cpu"), first("cuda")
    fc, fg = _flat(cpu), _flat(gpu)
    assert [k for k, _ in fc] == [k for k, _ in fg]
    for (k, x), (_, y) in zip(fc, fg):
        assert y.device.type == "cuda" and y.shape == x.shape and y.dtype == x.dtype, k
        if k == "labels":
            assert torch.equal(x, y.cpu())
        else:
            assert (x - y.cpu()).abs().mean() < 0.02, (k, (x - y.cpu()).abs().mean())


# ----------------------------------------------------------------------------------------------------------
# the pipelines of every method


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["simmim", "spark", "beit", "beitv2", "dino"])
def test_pipeline_shapes_dtypes_ranges_labels(digits, method, backend):
    loader = _pretrain(method, digits, backend, batch_size=6)
    assert loader.backend == backend
    assert len(loader) == 1438 // 6
    batch = next(iter(loader))
    plan = loader.plan(0)
    labels = batch["labels"]
    assert labels.dtype == torch.int64 and labels.shape == (6,)
    assert torch.equal(labels, torch.from_numpy(loader.folder.labels[plan[0]]))
    if method == "dino":
        assert set(batch) == {"crops", "labels"}
        crops = batch["crops"]
        assert len(crops) == 2 + 3
        for i, c in enumerate(crops):
            _normalised_ok(c, S if i < 2 else 16)
        assert not torch.equal(crops[0], crops[1])
    else:
        _normalised_ok(batch["images"], S)
        expected = {"images", "labels"} | ({"tokenizer_images"} if method == "beit" else set())
        assert set(batch) == expected
    if method == "beit":
        t = batch["tokenizer_images"]
        assert t.shape == (6, 3, S // 2, S // 2) and t.dtype == torch.float32
        assert t.min() >= 0.1 - 1e-6 and t.max() <= 0.9 + 1e-6 and t.std() > 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_dino_crop_counts_and_sizes(digits, backend):
    loader = _pretrain("dino", digits, backend, batch_size=4, image_size=40, local_crops=5, local_size=24)
    crops = next(iter(loader))["crops"]
    assert [tuple(c.shape) for c in crops] == [(4, 3, 40, 40)] * 2 + [(4, 3, 24, 24)] * 5
    none = next(iter(_pretrain("dino", digits, backend, batch_size=4, local_crops=0)))["crops"]
    assert len(none) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_beit_views_come_from_the_same_crop(digits, backend):
    batch = next(iter(_pretrain("beit", digits, backend, batch_size=16)))
    patch_view = F.avg_pool2d(batch["images"] * STD + MEAN, 2)  # undo normalisation, downsample to 16
    tok_view = (batch["tokenizer_images"] - 0.1) / 0.8  # undo the dVAE mapping
    same = (patch_view - tok_view).abs().mean(dim=(1, 2, 3))
    other = (patch_view - tok_view.roll(1, 0)).abs().mean(dim=(1, 2, 3))
    mirrored = (patch_view - tok_view.flip(-1)).abs().mean(dim=(1, 2, 3))
    assert same.max() < 0.03, same
    assert other.min() > 3 * same.max() and (mirrored > 3 * same).sum() >= 14


@needs_dali
@pytest.mark.parametrize("method", ["simmim", "beit", "dino"])
def test_dali_and_torch_backends_agree(digits, method):
    a = next(iter(_pretrain(method, digits, "dali", batch_size=8, local_crops=2)))
    b = next(iter(_pretrain(method, digits, "torch", batch_size=8, local_crops=2)))
    fa, fb = _flat(a), _flat(b)
    assert [k for k, _ in fa] == [k for k, _ in fb]
    for (k, x), (_, y) in zip(fa, fb):
        assert x.shape == y.shape and x.dtype == y.dtype, k
        if k == "labels":
            assert torch.equal(x, y)
        else:  # same crop windows, flips and colour draws; only resampling kernels differ
            assert (x - y).abs().mean() < 0.02, (k, (x - y).abs().mean())


# ----------------------------------------------------------------------------------------------------------
# determinism, epochs, sharding, length, resume


@pytest.mark.parametrize("backend", BACKENDS)
def test_determinism_under_seed_and_epoch(digits, backend):
    def first(seed, epoch):
        loader = _pretrain("dino", digits, backend, batch_size=4, local_crops=2, seed=seed)
        loader.set_epoch(epoch)
        return next(iter(loader))

    a = first(0, 0)
    _assert_same(a, first(0, 0))
    for other in (first(1, 0), first(0, 1)):
        assert not torch.equal(a["crops"][0], other["crops"][0])
    loader = _pretrain("simmim", digits, backend, batch_size=4, seed=5)
    loader.set_epoch(3)
    e3 = next(iter(loader))
    loader.set_epoch(4)
    next(iter(loader))
    loader.set_epoch(3)
    _assert_same(e3, next(iter(loader)))


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sharding_disjoint_complete_equal_steps(ids_folder, backend, drop_last):
    B = 4
    seen = []
    for rank in range(2):
        loader = _pretrain(
            "simmim",
            ids_folder,
            backend,
            batch_size=B,
            shard_id=rank,
            num_shards=2,
            drop_last=drop_last,
            seed=3,
        )
        loader.set_epoch(2)
        labels = [b["labels"] for b in loader]
        assert len(labels) == len(loader)
        seen.append(torch.cat(labels).tolist())
    if drop_last:
        assert len(loader) == 61 // 8 and len(seen[0]) == len(seen[1]) == 7 * B
        assert not set(seen[0]) & set(seen[1])
        order = folder_mod.epoch_order(61, seed=3, epoch=2, shuffle=True)
        assert set(seen[0]) | set(seen[1]) == set(order[:56].tolist())
    else:
        assert len(loader) == 8 and len(seen[0]) == len(seen[1]) == 31
        assert set(seen[0]) | set(seen[1]) == set(range(61))
        assert len(seen[0]) + len(seen[1]) - 61 == 1  # the one padding sample
    # shuffled: a different order next epoch
    assert seen[0][:8] != sorted(seen[0][:8]) or seen[1][:8] != sorted(seen[1][:8])


def test_shard_plan_lengths_and_coverage():
    for n in (1, 5, 16, 61):
        for ns in (1, 2, 3):
            for B in (1, 4, 7):
                for drop_last in (True, False):
                    plans = [
                        folder_mod.shard_plan(
                            n,
                            batch_size=B,
                            shard_id=r,
                            num_shards=ns,
                            seed=1,
                            epoch=0,
                            shuffle=True,
                            drop_last=drop_last,
                        )
                        for r in range(ns)
                    ]
                    steps = folder_mod.num_steps(n, batch_size=B, num_shards=ns, drop_last=drop_last)
                    assert all(len(p) == steps for p in plans)
                    flat = np.concatenate([np.concatenate(p) for p in plans if p] or [np.zeros(0, int)])
                    if drop_last:
                        assert len(flat) == len(set(flat.tolist())) == steps * ns * B
                    else:
                        assert set(flat.tolist()) == set(range(n)) and len(flat) == -(-n // ns) * ns


@pytest.mark.parametrize("backend", BACKENDS)
def test_len_exact_and_partial_last_batch(ids_folder, backend):
    loader = _pretrain("spark", ids_folder, backend, batch_size=7, drop_last=False)
    sizes = [len(b["labels"]) for b in loader]
    assert len(sizes) == len(loader) == 9 and sizes[-1] == 61 - 8 * 7
    assert sorted(torch.cat([b["labels"] for b in loader]).tolist()) == list(range(61))
    one = _pretrain("simmim", ids_folder, backend, batch_size=32)  # a 1-step epoch (< prefetch)
    assert len(one) == 1 and len(list(one)) == 1 and len(list(one)) == 1  # padded first prefetch drained
    with pytest.raises(ValueError, match="0 steps"):
        _pretrain("simmim", ids_folder, backend, batch_size=40, num_shards=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_abandoned_pass_then_next_epoch(digits, backend):
    loader = _pretrain("simmim", digits, backend, batch_size=64, num_threads=1)
    for i, _ in enumerate(loader):  # leave epoch 0 after 2 batches, with iterations still in flight
        if i == 1:
            break
    assert loader.state_dict()["step"] == 2
    loader.set_epoch(1)
    got = list(loader)
    fresh = _pretrain("simmim", digits, backend, batch_size=64, num_threads=1)
    fresh.set_epoch(1)
    want = list(fresh)
    assert len(got) == len(want) == len(loader)
    for a, b in zip(got, want):
        _assert_same(a, b)
    loader.close()  # releases the pipeline; the next pass builds a new one and continues identically
    _assert_same(next(iter(loader)), want[0])


def _mask_fn(batch_size, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "mask": torch.rand(batch_size, 4, 4, generator=g) < 0.6,
        "mask_seed": torch.tensor(seed),
        "mask_thread": torch.tensor(threading.get_ident()),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_resume_yields_the_next_batch(digits, backend):
    kw = dict(batch_size=4, seed=7, mask_fn=_mask_fn)
    loader = _pretrain("beit", digits, backend, **kw)
    loader.set_epoch(1)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["step"] == 3
    expected = next(it)
    del it

    resumed = _pretrain("beit", digits, backend, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # a resumed trainer calls set_epoch with the same epoch: position is kept
    got = next(iter(resumed))
    got.pop("mask_thread"), expected.pop("mask_thread")
    _assert_same(expected, got)
    assert int(got["mask_seed"]) == resumed.mask_seed(1, 3)
    assert resumed.state_dict()["step"] == 4
    resumed.set_epoch(2)
    assert resumed.state_dict()["step"] == 0
    bad = dict(state, batch_size=5)
    with pytest.raises(ValueError, match="batch_size"):
        resumed.load_state_dict(bad)


@needs_dali
def test_masks_merged_reproducible_and_made_off_the_training_thread(digits):
    loader = _pretrain("simmim", digits, "dali", batch_size=5, mask_fn=_mask_fn)
    batches = [b for _, b in zip(range(3), loader)]
    for step, b in enumerate(batches):
        assert b["mask"].shape == (5, 4, 4) and b["mask"].dtype == torch.bool
        assert int(b["mask_seed"]) == loader.mask_seed(0, step)
        assert int(b["mask_thread"]) != threading.get_ident()
    assert len({int(b["mask_seed"]) for b in batches}) == 3
    with pytest.raises(TypeError, match="mask_fn"):
        _pretrain("simmim", digits, "dali", batch_size=5, mask_fn=3)


# ----------------------------------------------------------------------------------------------------------
# evaluation loader


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_loader_covers_everything_in_order(digits, backend):
    loader = data.build_eval_loader(
        digits, "val", batch_size=64, image_size=S, backend=backend, num_threads=1
    )
    batches = list(loader)
    assert len(batches) == len(loader) == 6 and len(batches[-1]["labels"]) == 359 - 5 * 64
    labels = torch.cat([b["labels"] for b in batches])
    assert torch.equal(labels, torch.from_numpy(loader.folder.labels))
    for b in batches:
        _normalised_ok(b["images"], S)
    again = list(data.build_eval_loader(digits, "val", batch_size=64, image_size=S, backend=backend))
    assert torch.equal(batches[2]["images"], again[2]["images"])
    # first image: resize to 36 (= int(32*256/224)) then centre crop 32, computed independently
    with Image.open(loader.folder.files[0]) as im:
        ref = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float()[None]
    ref = (
        F.interpolate(ref, size=(36, 36), mode="bicubic", antialias=True)
        .round()
        .clamp(0, 255)[:, :, 2:34, 2:34]
    )
    ref = (ref / 255 - MEAN) / STD
    assert (batches[0]["images"][:1] - ref).abs().mean() < 0.01


@needs_dali
def test_eval_backends_agree(digits):
    a = next(iter(data.build_eval_loader(digits, batch_size=32, image_size=24, backend="dali")))
    b = next(iter(data.build_eval_loader(digits, batch_size=32, image_size=24, backend="torch")))
    assert torch.equal(a["labels"], b["labels"]) and (a["images"] - b["images"]).abs().mean() < 0.005


# ----------------------------------------------------------------------------------------------------------
# fallback, errors, imports


def test_fallback_used_and_logged_when_dali_missing(digits, monkeypatch, caplog):
    monkeypatch.setattr(loader_core, "dali_available", lambda: (False, "ImportError: no module nvidia.dali"))
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        loader = data.build_pretrain_loader(
            "dino", digits, batch_size=3, image_size=S, local_crops=2, num_threads=0
        )
    assert loader.backend == "torch"
    assert "fallback" in caplog.text and "DALI unavailable" in caplog.text
    batch = next(iter(loader))
    assert [tuple(c.shape) for c in batch["crops"]] == [(3, 3, S, S)] * 2 + [(3, 3, 16, 16)] * 2
    with pytest.raises(ImportError, match="backend='dali'"):
        data.build_pretrain_loader("simmim", digits, batch_size=3, image_size=S, backend="dali")


def test_bad_arguments(digits):
    with pytest.raises(ValueError, match="method"):
        data.build_pretrain_loader("mae", digits, batch_size=2, image_size=S)
    with pytest.raises(ValueError, match="shard_id"):
        data.build_pretrain_loader("simmim", digits, batch_size=2, image_size=S, shard_id=2, num_shards=2)
    with pytest.raises(ValueError, match="batch_size"):
        data.build_pretrain_loader("simmim", digits, batch_size=0, image_size=S)
    with pytest.raises(ValueError, match="device"):
        data.build_pretrain_loader("simmim", digits, batch_size=2, image_size=S, device="tpu")
    with pytest.raises(ValueError, match="backend"):
        data.build_pretrain_loader("simmim", digits, batch_size=2, image_size=S, backend="pil")


def test_import_does_not_import_dali():
    code = (
        "import sys, engine.data\n"
        "assert 'nvidia.dali' not in sys.modules\n"
        "assert not __import__('torch').cuda.is_initialized()\nprint('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@needs_dali
def test_exif_rotated_jpeg_decodes_as_pil_sees_it(tmp_path):
    """Crop windows come from PIL's (un-rotated) sizes, so DALI must not apply the EXIF orientation either."""
    root = tmp_path / "exif" / "val" / "0"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        img = Image.fromarray(rng.integers(0, 255, (20, 40, 3), dtype=np.uint8).repeat(2, 0).repeat(2, 1))
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW" orientation tag
        img.save(root / f"{i}.jpg", exif=exif, quality=95)
    kw = dict(batch_size=4, image_size=24, num_threads=1)
    a = next(iter(data.build_eval_loader(tmp_path / "exif", "val", backend="dali", **kw)))
    b = next(iter(data.build_eval_loader(tmp_path / "exif", "val", backend="torch", **kw)))
    assert (a["images"] - b["images"]).abs().mean() < 0.05


def test_fallback_worker_path_returns_cpu_tensors(digits):
    """The torch fallback builds batches inside DataLoader workers: they must stay on the CPU even when the
    loader targets a GPU (a forked worker cannot touch CUDA); the main process moves them."""
    loader = data.build_pretrain_loader("simmim", digits, batch_size=8, image_size=S, backend="torch",
                                        num_threads=0, mask_fn=lambda n, seed: {"mask": torch.zeros(n, 4, 4)})
    loader._kind, loader.device = "gpu", torch.device("meta")  # pretend; "meta" makes any transfer visible
    batch = loader._torch_batch(0, np.arange(8))
    assert all(t.device.type == "cpu" for t in (batch["images"], batch["labels"], batch["mask"]))
    moved = loader._assemble([batch["images"]], dict(labels=batch["labels"], masks={"mask": batch["mask"]}))
    assert moved["labels"].device.type == "meta" and moved["mask"].device.type == "meta"
