"""Built-in real dataset (scikit-learn's handwritten digits) and synthetic JPEG folders.

``builtin_dataset`` turns the 1,797 8x8 grey digits bundled with scikit-learn (offline, no download) into an
ImageNet-style image folder of RGB PNGs upscaled to ``image_size``::

    <root>/train/<class>/<index>.png     80% of every class (stratified, seed 0)
    <root>/val/<class>/<index>.png       the other 20%

It is written once into ``$XDG_CACHE_HOME/ssl-engine/digits-<size>`` (``~/.cache`` when unset): the
files go to a temporary sibling directory that is renamed into place, so concurrent first calls (several
ranks, several test workers) never see a half-written folder.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import numpy as np

SPLIT_SEED = 0
VAL_FRACTION = 0.2
_DONE = ".complete"


def cache_root() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "ssl-engine"


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean ``is_val`` per sample: round(val_fraction * n_c) of every class, chosen at random."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_val = int(round(val_fraction * len(idx)))
        is_val[rng.permutation(idx)[:n_val]] = True
    return is_val


def builtin_dataset(root: str | os.PathLike | None = None, image_size: int = 32) -> pathlib.Path:
    """Materialise the scikit-learn digits as an image folder of ``image_size`` RGB PNGs; return its root.

    Pixels (0..16 grey levels) are scaled to 0..255 and upscaled with bicubic interpolation; the grey image is
    replicated to three channels. Class folders are named ``0`` .. ``9``. Idempotent: an existing complete
    folder is returned untouched.
    """
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    root = pathlib.Path(root) if root is not None else cache_root() / f"digits-{image_size}"
    if (root / _DONE).exists():
        return root
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    is_val = _stratified_split(labels, VAL_FRACTION, SPLIT_SEED)

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
    try:
        for i, (img, label) in enumerate(zip(images, labels)):
            split = "val" if is_val[i] else "train"
            folder = tmp / split / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            pil = (
                Image.fromarray(img, mode="L").resize((image_size, image_size), Image.BICUBIC).convert("RGB")
            )
            pil.save(folder / f"{i:04d}.png")
        (tmp / _DONE).write_text(
            f"sklearn digits, {len(labels)} images, size {image_size}, split seed {SPLIT_SEED}\n"
        )
        try:
            os.rename(tmp, root)
        except OSError as exc:
            # Someone else finished first (the target exists and is not empty): use theirs.
            if not (root / _DONE).exists():
                raise FileExistsError(
                    f"{str(root)!r} exists but is not a complete built-in dataset "
                    f"(no {_DONE} marker): remove it and call again"
                ) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def synthetic_dataset(
    root: str | os.PathLike,
    num_images: int = 256,
    image_size: int = 224,
    num_classes: int = 4,
    seed: int = 0,
    quality: int = 90,
) -> pathlib.Path:
    """Write ``num_images`` random-pattern JPEGs into ``<root>/<class>/<i>.jpg``; return ``root``.

    Each image is a smooth random colour field (low-resolution noise upscaled bilinearly) plus per-pixel
    noise, so
    JPEG decoding costs about what a natural photo of that size costs. Sizes vary by up to -25% around
    ``image_size`` per side so crops see varied aspect ratios. Deterministic in ``seed``.
    """
    from PIL import Image

    if num_images < 1 or num_classes < 1 or image_size < 8:
        raise ValueError(
            f"need num_images >= 1, num_classes >= 1, image_size >= 8; got {num_images}, "
            f"{num_classes}, {image_size}"
        )
    root = pathlib.Path(root)
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        h = int(image_size * rng.uniform(0.75, 1.0))
        w = int(image_size * rng.uniform(0.75, 1.0))
        low = rng.integers(0, 256, size=(max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR), dtype=np.int16)
        noise = rng.integers(-20, 21, size=(h, w, 3), dtype=np.int16)
        img = np.clip(field + noise, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / str(i % num_classes) / f"{i:06d}.jpg", quality=quality)
    return root
