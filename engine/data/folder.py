"""Image-folder index: file list, labels, cheap corruption check, per-epoch shuffling and per-rank sharding.

Layouts: ImageNet style ``root/<class>/*.jpg|jpeg|png`` (classes sorted by name -> labels 0..C-1) or a flat
folder of images with no labels (every label is -1). Nested class folders are searched recursively.

Corrupt files are detected up front, at index time, so an epoch never dies halfway: every candidate is opened
with PIL (header parse: format, size) and its tail is checked for the end marker (JPEG ``FFD9``, PNG
``IEND``),
which catches truncated files; ``check="full"`` also decodes every image (slow, for small or suspect
folders). Rejected files are skipped with one warning listing them and are counted in ``ImageFolder.skipped``.
(Files that break later, mid-epoch, are handled by the loader: see ``loader._Loader._torch_from_item``.)
Image sizes read here are what the augmentation parameter sampler needs for RandomResizedCrop. For large
folders
(>= ``CACHE_MIN_FILES`` images) the probe results are cached on disk keyed by path, byte size and mtime, so a
second scan of ImageNet costs a listing and a stat per file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

EXTENSIONS = (".jpg", ".jpeg", ".png")
_PNG_END = b"IEND\xaeB`\x82"


def _is_image(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS)


def _probe(path: str, full: bool) -> tuple[int, int] | str:
    """(width, height) of a readable image, or the reason it was rejected."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size < 16:
                return f"file too small ({size} bytes)"
            f.seek(max(0, size - 64))
            tail = f.read().rstrip(b"\x00\r\n ")
        with Image.open(path) as im:
            fmt, (w, h) = im.format, im.size
            if full:
                im.load()
        if fmt == "JPEG" and b"\xff\xd9" not in tail[-16:]:
            return "truncated JPEG (no end-of-image marker)"
        if fmt == "PNG" and not tail.endswith(_PNG_END):
            return "truncated PNG (no IEND chunk)"
        if fmt not in ("JPEG", "PNG", "MPO"):
            return f"unsupported format {fmt}"
        if w < 1 or h < 1:
            return f"empty image {w}x{h}"
        return int(w), int(h)
    except Exception as exc:  # noqa: BLE001 - any failure means "unreadable"
        return f"{type(exc).__name__}: {exc}"


CACHE_MIN_FILES = 10_000


def _cache_file(root: pathlib.Path, check: str) -> pathlib.Path:
    from .builtin import cache_root

    key = hashlib.sha1(f"{root.resolve()}|{check}|v1".encode()).hexdigest()[:20]
    return cache_root() / "index" / f"{key}.npz"


def _load_cache(path: pathlib.Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            names = bytes(z["names"]).decode().split("\n")
            reasons = json.loads(bytes(z["reasons"]).decode())
            stat, wh = z["stat"].tolist(), z["wh"].tolist()
        return {
            name: (st[0], st[1], reasons.get(str(i)) or (w[0], w[1]))
            for i, (name, st, w) in enumerate(zip(names, stat, wh))
        }
    except Exception:  # noqa: BLE001 - a missing or unreadable cache is rebuilt
        return {}


def _save_cache(path: pathlib.Path, rows: dict) -> None:
    names = list(rows)
    stat = np.array([rows[n][:2] for n in names], np.int64).reshape(-1, 2)
    wh = np.array([r[2] if not isinstance(r[2], str) else (-1, -1) for r in rows.values()], np.int64).reshape(
        -1, 2
    )
    reasons = {str(i): r[2] for i, r in enumerate(rows.values()) if isinstance(r[2], str)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                names=np.frombuffer("\n".join(names).encode(), np.uint8),
                stat=stat,
                wh=wh,
                reasons=np.frombuffer(json.dumps(reasons).encode(), np.uint8),
            )
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache dir only costs the next scan time
        warnings.warn(f"could not write the image-folder index cache {path}: {exc}", stacklevel=3)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _probe_all(root: pathlib.Path, paths: list[str], check: str, num_threads: int, use_cache: bool) -> list:
    full = check == "full"
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        if not use_cache:
            return list(pool.map(lambda p: _probe(p, full), paths, chunksize=64))
        cache_path = _cache_file(root, check)
        cached = _load_cache(cache_path)

        def one(p):
            st = os.stat(p)
            key = (st.st_size, st.st_mtime_ns)
            hit = cached.get(p)
            if hit is not None and hit[:2] == key:
                return key, hit[2], False
            return key, _probe(p, full), True

        results = list(pool.map(one, paths, chunksize=64))
    if any(fresh for _, _, fresh in results) or len(cached) != len(paths):
        _save_cache(cache_path, {p: (*key, res) for p, (key, res, _) in zip(paths, results)})
    return [res for _, res, _ in results]


@dataclasses.dataclass
class ImageFolder:
    """Index of one image folder. ``files``/``labels``/``sizes`` (W, H) are aligned; ``skipped`` holds
    ``(path, reason)`` for every rejected file."""

    root: pathlib.Path
    files: list[str]
    labels: np.ndarray
    sizes: np.ndarray
    classes: list[str]
    skipped: list[tuple[str, str]]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @classmethod
    def scan(
        cls, root: str | os.PathLike, check: str = "header", num_threads: int = 8, cache: bool | None = None
    ) -> ImageFolder:
        """Index ``root``. ``cache``: keep the per-file probe results (keyed by path, byte size and mtime) in
        ``<cache dir>/ssl-engine/index/``, so re-indexing a large folder only stats its files; None = only for
        folders of at least ``CACHE_MIN_FILES`` images."""
        if check not in ("header", "full"):
            raise ValueError(f"check must be 'header' or 'full', got {check!r}")
        root = pathlib.Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
        try:
            subdirs = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        except OSError as exc:
            raise PermissionError(f"image folder {str(root)!r} cannot be read ({exc.strerror or exc})") from None
        entries: list[tuple[str, int]] = []
        classes: list[str] = []
        unreadable: list[str] = []

        def walk_error(exc: OSError) -> None:
            unreadable.append(f"{exc.filename}: {exc.strerror or exc}")

        for name in subdirs:
            found = []
            for dirpath, dirnames, filenames in os.walk(root / name, onerror=walk_error):
                dirnames.sort()
                found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
            if found:
                entries += [(p, len(classes)) for p in found]
                classes.append(name)
        top = sorted(str(root / e.name) for e in os.scandir(root) if e.is_file() and _is_image(e.name))
        if not classes:
            entries = [(p, -1) for p in top]
        elif top:
            warnings.warn(
                f"{root}: {len(top)} images at the top level ignored (class-folder layout)", stacklevel=2
            )
        if unreadable:
            shown = "; ".join(unreadable[:3]) + (" ..." if len(unreadable) > 3 else "")
            raise PermissionError(f"image folder {str(root)!r}: {len(unreadable)} sub-folder(s) cannot be read "
                                  f"({shown}); fix their permissions or remove them")
        if not entries:
            raise ValueError(f"image folder {str(root)!r} contains no images ({', '.join(EXTENSIONS)})")
        paths = [p for p, _ in entries]
        use_cache = len(paths) >= CACHE_MIN_FILES if cache is None else bool(cache)
        probes = _probe_all(root, paths, check, num_threads, use_cache)
        files, labels, sizes, skipped = [], [], [], []
        for (path, label), res in zip(entries, probes):
            if isinstance(res, str):
                skipped.append((path, res))
            else:
                files.append(path)
                labels.append(label)
                sizes.append(res)
        if skipped:
            shown = "; ".join(f"{p}: {r}" for p, r in skipped[:5])
            warnings.warn(
                f"{root}: skipped {len(skipped)} unreadable image(s): {shown}"
                + (" ..." if len(skipped) > 5 else ""),
                stacklevel=2,
            )
        if not files:
            raise ValueError(f"image folder {str(root)!r}: all {len(paths)} images are unreadable")
        return cls(
            root,
            files,
            np.asarray(labels, np.int64),
            np.asarray(sizes, np.int64).reshape(-1, 2),
            classes,
            skipped,
        )


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The global sample order of one epoch: a permutation keyed on (seed, epoch), identical on every rank."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def shard_plan(
    n: int,
    *,
    batch_size: int,
    shard_id: int,
    num_shards: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    drop_last: bool,
) -> list[np.ndarray]:
    """Index batches of one rank for one epoch; every rank gets the same number of steps.

    drop_last=True: the first ``num_shards * steps * batch_size`` of the epoch order are dealt round-robin
    to the
    ranks (disjoint); the remainder (< num_shards * batch_size, a different subset every epoch) is left out.
    drop_last=False: the order is padded by wrapping round to a multiple of ``num_shards`` (as
    ``DistributedSampler`` does), so the ranks jointly cover every sample and only the padding repeats; the
    last
    batch of each rank may be partial.
    """
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, num_shards={num_shards}), got {shard_id}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = epoch_order(n, seed=seed, epoch=epoch, shuffle=shuffle)
    if drop_last:
        steps = n // (num_shards * batch_size)
        mine = order[: steps * num_shards * batch_size][shard_id::num_shards]
    else:
        total = -(-n // num_shards) * num_shards
        order = np.resize(order, total)  # wraps round
        mine = order[shard_id::num_shards]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def num_steps(n: int, *, batch_size: int, num_shards: int, drop_last: bool) -> int:
    """Steps per epoch of every rank (the length of :func:`shard_plan`)."""
    if drop_last:
        return n // (num_shards * batch_size)
    per_rank = math.ceil(n / num_shards)
    return math.ceil(per_rank / batch_size)
