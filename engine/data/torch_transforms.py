"""The same recipes in plain torch ops, for the fallback loader (no torchvision needed).

Each function mirrors one DALI operator of :mod:`engine.data.dali_pipeline` on one image:
uint8 ``[3, H, W]`` tensors in, uint8 out (rounded and clamped like DALI's uint8 outputs), float32 at the end.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .augment import IMAGENET_MEAN, IMAGENET_STD, View, eval_resize

# ITU-R BT.601 RGB <-> YIQ, the colour space of DALI's hue/saturation twist.
_RGB2YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64
)
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)
_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "lanczos": "bicubic"}


# PIL modes of 16/32-bit integer grayscale images: ``convert("RGB")`` clips their values at 255 (a 16-bit
# PNG came out ~99.6% white), so they are scaled to 8 bits first.
_WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _to_rgb_u8(im) -> np.ndarray:
    """uint8 [H, W, 3] of a PIL image. 16-bit grayscale (PNG ``I;16*``, and ``I``, which older Pillow uses for
    16-bit PNGs; its values are clipped to 0..65535) keeps its most significant byte (``v >> 8``), exactly
    what PIL itself does when it reads 16-bit RGB(A) and gray+alpha PNGs into its 8-bit modes."""
    if im.mode in _WIDE_GRAY_MODES:
        wide = np.asarray(im).astype(np.int64)
        gray = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode(source) -> torch.Tensor:
    """Decode an image (a path, or its encoded bytes as a uint8 numpy array) to uint8 [3, H, W] RGB with
    PIL.

    16-bit PNGs become 8 bits by their high byte (``v >> 8``) in every colour type (PIL does it for RGB(A)
    and gray+alpha, :func:`_to_rgb_u8` for plain 16-bit grayscale). DALI's ``fn.decoders.image`` (default
    ``dtype=UINT8``) converts to uint8's dynamic range, ``v * 255 / 65535``, which can differ from ``v >> 8``
    by one level (DALI is not importable on the CPU test machine, so that side is taken from its docs)."""
    import io

    from PIL import Image

    if isinstance(source, np.ndarray):
        source = io.BytesIO(source.tobytes())
    with Image.open(source) as im:
        arr = _to_rgb_u8(im)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


def resized_crop(
    img: torch.Tensor, crop, size: int | tuple[int, int], interp: str = "bicubic"
) -> torch.Tensor:
    """Crop window ``(x0, y0, w, h)`` (pixels) resized to ``size`` with antialiasing."""
    x0, y0, w, h = (int(round(float(v))) for v in crop)
    out = (size, size) if isinstance(size, int) else tuple(size)
    patch = img[:, y0 : y0 + h, x0 : x0 + w].unsqueeze(0).float()
    return _to_u8(F.interpolate(patch, size=out, mode=_MODES[interp], antialias=True, align_corners=False)[0])


def colour_twist(
    img: torch.Tensor, brightness: float, contrast: float, saturation: float, hue: float
) -> torch.Tensor:
    """DALI ``color_twist``: hue rotation (degrees) and saturation scaling in YIQ, then
    ``brightness * (contrast * (x - 128) + 128)``, one clamp at the end."""
    a = math.radians(hue)
    rot = torch.tensor(
        [
            [1.0, 0.0, 0.0],
            [0.0, saturation * math.cos(a), saturation * math.sin(a)],
            [0.0, -saturation * math.sin(a), saturation * math.cos(a)],
        ],
        dtype=torch.float64,
    )
    m = (_YIQ2RGB @ rot @ _RGB2YIQ) * (brightness * contrast)
    offset = brightness * 128.0 * (1.0 - contrast)
    x = torch.einsum("ij,jhw->ihw", m.float(), img.float()) + offset
    return _to_u8(x)


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian, window 2*ceil(3 sigma)+1 (DALI's default), reflect-101 borders."""
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, img.shape[-1] - 1, img.shape[-2] - 1)
    if radius < 1:
        return img
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = img.float().unsqueeze(1)  # [3, 1, H, W]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return _to_u8(x[:, 0])


def solarize(img: torch.Tensor) -> torch.Tensor:
    return torch.where(img >= 128, 255 - img, img)


def normalise(img: torch.Tensor, norm: str, flip: bool) -> torch.Tensor:
    x = img.float() / 255.0
    if norm == "imagenet":
        x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    else:
        x = x * 0.8 + 0.1
    return x.flip(-1) if flip else x


def apply_view(img: torch.Tensor, view: View, params: dict, i: int) -> list[torch.Tensor]:
    """The view (and its twin) of sample ``i`` of a batch, given :func:`augment.sample_view` parameters."""
    sized = [(view.size, view.interp, view.norm)]
    if view.twin is not None:
        sized.append((view.twin.size, view.twin.interp, view.twin.norm))
    outs = []
    for size, interp, norm in sized:
        x = resized_crop(img, params["crop"][i], size, interp)
        if view.colour:
            x = colour_twist(x, *(float(v) for v in params["colour"][i]))
        if view.blur_p > 0 and params["blur"][i]:
            x = gaussian_blur(x, float(params["sigma"][i]))
        if view.solarize_p > 0 and params["solarize"][i]:
            x = solarize(x)
        outs.append(normalise(x, norm, bool(params["flip"][i])))
    return outs


def eval_transform(img: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize shorter side to int(S*256/224) (bicubic, antialias), centre crop S, ImageNet-normalise."""
    _, h, w = img.shape
    r = eval_resize(image_size)
    if h <= w:
        nh, nw = r, max(1, int(round(w * r / h)))
    else:
        nh, nw = max(1, int(round(h * r / w))), r
    x = _to_u8(
        F.interpolate(
            img.unsqueeze(0).float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False
        )[0]
    )
    # DALI's crop_pos 0.5 rounds the half-pixel offset up: floor((n - S) / 2 + 0.5)
    top, left = int(math.floor((nh - image_size) / 2 + 0.5)), int(math.floor((nw - image_size) / 2 + 0.5))
    return normalise(x[:, top : top + image_size, left : left + image_size], "imagenet", False)
