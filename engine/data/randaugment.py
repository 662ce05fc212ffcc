"""RandAugment as the fine-tuning recipes use it (timm ``rand-m9-mstd0.5-inc1``), with keyed parameters, run by
DALI (:func:`dali_randaugment`, conditionals over NVIDIA DALI operators) or by PIL (:func:`pil_randaugment`, the
fallback; torchvision is not needed).

Policy (timm ``rand_augment_transform`` / ``RandAugment``): per image ``n`` layers (default 2); each layer picks
one of the 15 ops uniformly (with replacement), applies it with probability ``p`` (default 0.5) at magnitude
``M ~ N(m, mstd)`` clipped to [0, mmax] (default m 9, mstd 0.5, mmax 10; ``mstd`` > 100: ``U(0, m)``), and the
signed ops negate their level with probability 1/2. Levels -> arguments (``inc1``, the "increasing" set):

=======================  ===========================================  ==========================================
op                       argument at magnitude M (level l = M / 10)   image op
=======================  ===========================================  ==========================================
AutoContrast             --                                           per channel: (x - min) * 255 / (max - min)
Equalize                 --                                           per-channel histogram equalisation
Invert                   --                                           255 - x
Rotate                   +-30 l degrees                               affine about the centre (PIL ``rotate``)
Posterize(Increasing)    keep 4 - int(4 l) bits (inc0: int(4 l))      x & mask
Solarize(Increasing)     threshold 256 - int(256 l) (inc0: int(256 l))  x >= t -> 255 - x
SolarizeAdd              add min(128, int(110 l)) below 128           x < 128 -> min(255, x + a)
Color/Contrast/          factor max(0.1, 1 +- 0.9 l)                  PIL ImageEnhance: blend with grey / the
Brightness/Sharpness     (inc0: 1.8 l + 0.1)                          mean grey / black / the 3x3 SMOOTH blur
ShearX / ShearY          +-0.3 l                                      affine (1, s, 0, 0, 1, 0) / (1, 0, 0, s, 1, 0)
TranslateXRel / YRel     +-0.45 l of the width / height               affine translation
=======================  ===========================================  ==========================================

Affine ops map output pixel (x, y) to input ``(a x + b y + c, d x + e y + f)`` as PIL's ``Image.transform``
(pixel centres at +0.5 in both backends), bilinear, areas outside filled with the ImageNet mean colour
(124, 116, 104) as timm's ``create_transform`` does (DALI: ``warp_affine`` of ``x - mean`` with fill 0, plus
the mean). Deviations from timm, in both backends: bilinear rather than bicubic resampling in the affine ops
(DALI's ``warp_affine`` has no cubic filter), and ``Equalize`` uses OpenCV's lookup table (DALI's
``fn.equalize``; the fallback computes the same table) where PIL's ``ImageOps.equalize`` rounds its table
differently. The two backends agree exactly on the point ops, to +-1 grey level on AutoContrast, and on the
affine ops except near the edge of the filled area (mean |diff| ~1 grey level; tested).

Randomness: :func:`sample_randaugment` draws every choice (op, apply, magnitude, sign) in numpy from the
loader's generator keyed on (seed, epoch, rank, step) and turns it into per-sample arguments
(``op`` kind, a 2x3 affine ``mat``, a float ``f``, a uint8 ``u8`` per layer) that DALI receives as inputs --
DALI's own RandAugment (``nvidia.dali.auto_aug.rand_augment``) draws from DALI's RNG, which a resumed pipeline
restarts, so it would break exact resume and the equality with the fallback; its operators are what run here.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

# op kinds of the graph (one DALI branch each)
IDENTITY, AUTOCONTRAST, EQUALIZE, INVERT, AFFINE, POSTERIZE, SOLARIZE, SOLARIZE_ADD, COLOR, CONTRAST, \
    BRIGHTNESS, SHARPNESS = range(-1, 11)
KINDS = ("autocontrast", "equalize", "invert", "affine", "posterize", "solarize", "solarize_add", "color",
         "contrast", "brightness", "sharpness")

OPS_INCREASING = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
       "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
FILL = (124, 116, 104)  # round(255 * ImageNet mean): timm's img_mean fill of the affine ops
SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0  # PIL ImageFilter.SMOOTH


@dataclasses.dataclass(frozen=True)
class RandAugSpec:
    n: int = 2
    m: float = 9.0
    mstd: float = 0.5
    p: float = 0.5
    increasing: bool = True
    mmax: float = 10.0
    translate_pct: float = 0.45

    @property
    def ops(self) -> tuple[str, ...]:
        return OPS_INCREASING if self.increasing else OPS


def parse_randaug(text: str | None) -> RandAugSpec | None:
    """timm's config string (``rand-m9-mstd0.5-inc1``: sections ``m``, ``n``, ``p``, ``mstd``, ``mmax``, ``inc``)
    -> :class:`RandAugSpec`; ``None``/``""``/``"none"`` -> None (off). ValueError names a bad section."""
    if text is None or str(text).strip().lower() in ("", "none", "off"):
        return None
    parts = str(text).strip().split("-")
    if parts[0] != "rand":
        raise ValueError(f"randaug: expected a string like 'rand-m9-mstd0.5-inc1' or 'none', got {text!r}")
    kw: dict = {"increasing": False}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)([0-9.]+)", part)
        if not match:
            raise ValueError(f"randaug {text!r}: unknown section {part!r} (known: m<int>, n<int>, p<float>, "
                             "mstd<float>, mmax<int>, inc<0|1>)")
        key, val = match.groups()
        try:
            num = float(val)
        except ValueError:
            raise ValueError(f"randaug {text!r}: section {part!r} is not a number") from None
        if key == "mstd":
            kw["mstd"] = math.inf if num > 100 else num
        elif key == "mmax":
            kw["mmax"] = num
        elif key == "inc":
            kw["increasing"] = bool(int(num))
        elif key == "m":
            kw["m"] = num
        elif key == "n":
            kw["n"] = int(num)
        else:
            kw["p"] = num
    spec = RandAugSpec(**kw)
    if spec.n < 1 or not 0 <= spec.p <= 1 or spec.m < 0 or spec.mmax <= 0:
        raise ValueError(f"randaug {text!r}: need n >= 1, 0 <= p <= 1, m >= 0, mmax > 0")
    return spec


def _affine(a, b, c, d, e, f) -> np.ndarray:
    return np.array([[a, b, c], [d, e, f]], dtype=np.float64)


def rotation_matrix(degrees: float, width: int, height: int) -> np.ndarray:
    """PIL ``Image.rotate(degrees)``'s output -> input map (counter-clockwise about the image centre)."""
    angle = -math.radians(degrees)
    a, b, d, e = math.cos(angle), math.sin(angle), -math.sin(angle), math.cos(angle)
    cx, cy = width / 2.0, height / 2.0
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy
    return _affine(a, b, c, d, e, f)


def op_arguments(name: str, magnitude: float, negate: bool, width: int, height: int,
                 translate_pct: float = 0.45) -> tuple[int, np.ndarray | None, float, int]:
    """``(kind, affine matrix or None, float argument, uint8 argument)`` of one timm op at ``magnitude``."""
    level = magnitude / 10.0
    sign = -1.0 if negate else 1.0
    if name == "AutoContrast":
        return AUTOCONTRAST, None, 0.0, 0
    if name == "Equalize":
        return EQUALIZE, None, 0.0, 0
    if name == "Invert":
        return INVERT, None, 0.0, 0
    if name == "Rotate":
        return AFFINE, rotation_matrix(sign * level * 30.0, width, height), 0.0, 0
    if name in ("Posterize", "PosterizeIncreasing"):
        bits = int(level * 4)
        bits = 4 - bits if name == "PosterizeIncreasing" else bits
        if bits >= 8:
            return IDENTITY, None, 0.0, 0
        return POSTERIZE, None, 0.0, (0xFF << (8 - max(bits, 0))) & 0xFF
    if name in ("Solarize", "SolarizeIncreasing"):
        t = min(256, int(level * 256))
        return SOLARIZE, None, float(256 - t if name == "SolarizeIncreasing" else t), 0
    if name == "SolarizeAdd":
        return SOLARIZE_ADD, None, float(min(128, int(level * 110))), 0
    if name in ("Color", "Contrast", "Brightness", "Sharpness", "ColorIncreasing", "ContrastIncreasing",
                "BrightnessIncreasing", "SharpnessIncreasing"):
        if name.endswith("Increasing"):
            factor = max(0.1, 1.0 + sign * level * 0.9)
        else:
            factor = level * 1.8 + 0.1
        kind = {"Color": COLOR, "Contrast": CONTRAST, "Brightness": BRIGHTNESS,
                "Sharpness": SHARPNESS}[name.removesuffix("Increasing")]
        return kind, None, float(factor), 0
    if name == "ShearX":
        return AFFINE, _affine(1, sign * level * 0.3, 0, 0, 1, 0), 0.0, 0
    if name == "ShearY":
        return AFFINE, _affine(1, 0, 0, sign * level * 0.3, 1, 0), 0.0, 0
    if name == "TranslateXRel":
        return AFFINE, _affine(1, 0, sign * level * translate_pct * width, 0, 1, 0), 0.0, 0
    if name == "TranslateYRel":
        return AFFINE, _affine(1, 0, 0, 0, 1, sign * level * translate_pct * height), 0.0, 0
    raise ValueError(f"unknown RandAugment op {name!r}")


_IDENTITY_MAT = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)


def sample_randaugment(rng: np.random.Generator, spec: RandAugSpec, n: int, width: int, height: int) -> dict:
    """Per-sample arguments of ``n`` images of ``width x height``: for each layer ``l``, ``ra<l>_op`` int32 [n]
    (kind, -1 = nothing), ``ra<l>_mat`` float32 [n, 2, 3], ``ra<l>_f`` float32 [n], ``ra<l>_u8`` uint8 [n]."""
    ops = spec.ops
    L = spec.n
    choice = rng.integers(0, len(ops), size=(n, L))
    apply = rng.random((n, L)) <= spec.p
    if spec.mstd == math.inf:
        mag = rng.uniform(0.0, spec.m, size=(n, L))
    elif spec.mstd > 0:
        mag = rng.normal(spec.m, spec.mstd, size=(n, L))
    else:
        mag = np.full((n, L), float(spec.m))
    mag = np.clip(mag, 0.0, spec.mmax)
    negate = rng.random((n, L)) > 0.5
    out: dict = {}
    for layer in range(L):
        kind = np.full(n, IDENTITY, dtype=np.int32)
        mat = np.tile(_IDENTITY_MAT, (n, 1, 1))
        f = np.zeros(n, dtype=np.float32)
        u8 = np.zeros(n, dtype=np.uint8)
        for i in range(n):
            if not apply[i, layer]:
                continue
            k, m_, fv, uv = op_arguments(ops[choice[i, layer]], float(mag[i, layer]), bool(negate[i, layer]),
                                         width, height, spec.translate_pct)
            kind[i], f[i], u8[i] = k, fv, uv
            if m_ is not None:
                mat[i] = m_
        out.update({f"ra{layer}_op": kind, f"ra{layer}_mat": mat, f"ra{layer}_f": f, f"ra{layer}_u8": u8})
    return out


def input_names(spec: RandAugSpec | None) -> list[str]:
    if spec is None:
        return []
    return [f"ra{layer}_{k}" for layer in range(spec.n) for k in ("op", "mat", "f", "u8")]


# ----------------------------------------------------------------------------------------------------- PIL
def _pil_op(img, kind: int, mat, f: float, u8: int):
    from PIL import Image, ImageEnhance, ImageOps

    if kind == IDENTITY:
        return img
    if kind == AUTOCONTRAST:
        return ImageOps.autocontrast(img)
    if kind == EQUALIZE:
        return _equalize_opencv(img)
    if kind == INVERT:
        return ImageOps.invert(img)
    if kind == AFFINE:
        m = np.asarray(mat, dtype=np.float64).reshape(-1).tolist()
        return img.transform(img.size, Image.AFFINE, tuple(m), resample=Image.BILINEAR, fillcolor=FILL)
    if kind == POSTERIZE:
        lut = [i & int(u8) for i in range(256)] * 3
        return img.point(lut)
    if kind == SOLARIZE:
        return ImageOps.solarize(img, float(f))
    if kind == SOLARIZE_ADD:
        add = int(f)
        lut = [min(255, i + add) if i < 128 else i for i in range(256)] * 3
        return img.point(lut)
    if kind == COLOR:
        return ImageEnhance.Color(img).enhance(float(f))
    if kind == CONTRAST:
        return ImageEnhance.Contrast(img).enhance(float(f))
    if kind == BRIGHTNESS:
        return ImageEnhance.Brightness(img).enhance(float(f))
    if kind == SHARPNESS:  # ImageEnhance.Sharpness blends with ImageFilter.SMOOTH
        return ImageEnhance.Sharpness(img).enhance(float(f))
    raise ValueError(f"unknown op kind {kind}")


def _equalize_opencv(img):
    """Per-channel histogram equalisation with OpenCV's ``equalizeHist`` lookup table, which DALI's
    ``fn.equalize`` follows (PIL's ``ImageOps.equalize`` rounds its table differently)."""
    from PIL import Image

    arr = np.asarray(img, dtype=np.uint8)
    out = np.empty_like(arr)
    for c in range(arr.shape[2]):
        ch = arr[:, :, c]
        hist = np.bincount(ch.reshape(-1), minlength=256)
        first = int(np.argmax(hist > 0))
        total = ch.size
        if hist[first] == total:
            out[:, :, c] = first
            continue
        scale = 255.0 / (total - hist[first])
        lut = np.zeros(256, dtype=np.float64)
        lut[first + 1:] = np.cumsum(hist[first + 1:]) * np.float32(scale)
        out[:, :, c] = np.clip(np.rint(lut), 0, 255).astype(np.uint8)[ch]
    return Image.fromarray(out, mode="RGB")


def pil_randaugment(img, params: dict, i: int, layers: int):
    """The fallback: sample ``i``'s layers (from :func:`sample_randaugment`) applied to a uint8 ``[3, H, W]``
    torch tensor with PIL; returns a uint8 ``[3, H, W]`` tensor."""
    import torch
    from PIL import Image

    pil = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy(), mode="RGB")
    for layer in range(layers):
        pil = _pil_op(pil, int(params[f"ra{layer}_op"][i]), params[f"ra{layer}_mat"][i],
                      float(params[f"ra{layer}_f"][i]), int(params[f"ra{layer}_u8"][i]))
    return torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------------- DALI
def dali_randaugment(x, inputs: dict, layers: int, size: int, device: str):
    """The DALI graph piece: ``x`` uint8 HWC (``size x size``), ``inputs`` the external-source nodes named by
    :func:`input_names`; to be called inside a ``pipeline_def(enable_conditionals=True)`` graph."""
    for layer in range(layers):
        x = _dali_layer(x, inputs[f"ra{layer}_op"], inputs[f"ra{layer}_mat"], inputs[f"ra{layer}_f"],
                        inputs[f"ra{layer}_u8"], size, device)
    return x


def _dali_layer(x, op, mat, f, u8, size, device):
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    gpu = device == "gpu"

    def dev(node):  # a per-sample CPU input used in arithmetic with (GPU) image data
        return node.gpu() if gpu else node

    def to_u8(v):
        return fn.cast(dmath.clamp(dmath.floor(v), 0.0, 255.0), dtype=types.UINT8)  # PIL truncates blends

    mean = types.Constant(np.asarray(FILL, np.float32), dtype=types.FLOAT)
    if op == AFFINE:
        xf = fn.cast(x, dtype=types.FLOAT) - mean
        xf = fn.warp_affine(xf, matrix=mat, fill_value=0.0, interp_type=types.INTERP_LINEAR, inverse_map=True)
        x = fn.cast(dmath.clamp(xf + mean, 0.0, 255.0), dtype=types.UINT8)
    elif op == INVERT:
        x = fn.cast(255 - fn.cast(x, dtype=types.INT32), dtype=types.UINT8)
    elif op == POSTERIZE:
        x = x & dev(u8)
    elif op == SOLARIZE:
        keep = x < dev(f)
        x = fn.cast(keep * x + (keep ^ True) * (255 - fn.cast(x, dtype=types.INT32)), dtype=types.UINT8)
    elif op == SOLARIZE_ADD:
        xi = fn.cast(x, dtype=types.INT32)
        low = xi < 128
        x = fn.cast(dmath.clamp(xi + low * fn.cast(dev(f), dtype=types.INT32), 0, 255), dtype=types.UINT8)
    elif op == BRIGHTNESS:
        x = to_u8(fn.cast(x, dtype=types.FLOAT) * dev(f))
    elif op == COLOR:
        grey = fn.cast(fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY), dtype=types.FLOAT)
        x = to_u8(grey + dev(f) * (fn.cast(x, dtype=types.FLOAT) - grey))
    elif op == CONTRAST:
        grey = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
        centre = dmath.floor(fn.reductions.mean(grey, axes=[0, 1, 2], keep_dims=True) + 0.5)
        x = to_u8(centre + dev(f) * (fn.cast(x, dtype=types.FLOAT) - centre))
    elif op == SHARPNESS:
        conv = getattr(fn, "filter", None) or fn.experimental.filter  # moved out of experimental in DALI 1.x/2.x
        blur = fn.cast(conv(x, types.Constant(SMOOTH)), dtype=types.FLOAT)
        inner = np.zeros((size, size, 1), np.float32)
        inner[1:-1, 1:-1] = 1.0  # PIL keeps the 1-px border of the input in its SMOOTH image
        inner = types.Constant(inner, dtype=types.FLOAT)
        xf = fn.cast(x, dtype=types.FLOAT)
        blur = blur * inner + xf * (1.0 - inner)
        x = to_u8(blur + dev(f) * (xf - blur))
    elif op == AUTOCONTRAST:
        xf = fn.cast(x, dtype=types.FLOAT)
        lo = fn.reductions.min(xf, axis_names="HW", keep_dims=True)
        hi = fn.reductions.max(xf, axis_names="HW", keep_dims=True)
        span = hi - lo
        ok = span > 0
        scale = 255.0 / (span + (ok ^ True))
        x = to_u8(ok * ((xf - lo) * scale) + (ok ^ True) * xf)
    elif op == EQUALIZE:
        x = fn.equalize(x)
    return x
