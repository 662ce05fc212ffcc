"""Augmentation recipes of the five methods and the sampler of their random parameters.

One place for every recipe (the DALI pipelines and the torch fallback both execute exactly these):

=========  ==================================================================================================
method     recipe (S = image_size)
=========  ==================================================================================================
simmim     RandomResizedCrop(S, scale=(0.67, 1), ratio=(3/4, 4/3)) + horizontal flip p=0.5; ImageNet mean/std
spark      normalisation. Interpolation as in the official code: bilinear (SimMIM, torchvision's default),
           bicubic (SparK). Keys: ``images`` [B,3,S,S] float32, ``labels`` [B] int64.
beit       ColorJitter(0.4, 0.4, 0.4, hue 0) + flip + ONE RandomResizedCrop(scale=(0.08, 1)) resampled twice
           (unilm ``RandomResizedCropAndInterpolationWithTwoPic``): ``images`` [B,3,S,S] bicubic, ImageNet-
           normalised; ``tokenizer_images`` [B,3,T,T] (T = tokenizer_size, default S//2; Lanczos-3) in [0, 1]
           mapped x*0.8+0.1 (the DALL-E dVAE input mapping).
beitv2     ColorJitter(0.4, 0.4, 0.4, hue 0) + flip + RandomResizedCrop(S, scale=(0.2, 1), bicubic), ImageNet-
           normalised ``images`` (the VQ-KD tokenizer sees this same view; re-normalise for its teacher).
dino       ``crops``: 2 global views S (scale (0.4, 1)) then ``local_crops`` local views s (scale
           (0.05, 0.4)), every view its own RandomResizedCrop (bicubic) + flip p=0.5
           + ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8 + grayscale p=0.2 + Gaussian blur sigma~U(0.1, 2)
           with p = 1.0 (global 1) / 0.1 (global 2) / 0.5 (local) + solarisation (x >= 128 -> 255 - x)
           p=0.2 on global 2 only; ImageNet-normalised.
           Local size default: ``local_size = max(8, round(S * 96 / 224 / 8) * 8)`` -- 96 at S=224, 48 at 112,
           16 at 32 -- i.e. the paper's 96/224 ratio rounded to a multiple of 8 so patch-8/16 ViTs tile it.
eval       Resize shorter side to int(S * 256 / 224) (bicubic) + centre crop S; ImageNet-normalised.
=========  ==================================================================================================

``crop_scale`` overrides the RandomResizedCrop scale of single-view methods (and of DINO's global views),
``local_crops_scale`` that of DINO's local views (the original's ``--local_crops_scale``), ``color_jitter``
scales the jitter strengths of every recipe that has them (1 = published; 0 = no jitter).

A method names one of these recipes (any method may use any of them: the dVAE tokenizer trains on SimMIM's
view) with its options in its :class:`engine.data.DataRecipe` (``PretrainMethod.data_recipe``), or gives a
recipe of its own there. Recipe variants: :func:`recipe_variant` registers a name that carries options
(``"dino[color_jitter=0.5]"``); :func:`pretrain_recipe` resolves it to the base recipe and options.

Small images: the scales above are the published ones, for 192-224 px views of ImageNet photos. A view of a
small image carries far less detail, so below 192 px (the smallest resolution the originals pre-train at,
SimMIM's) every default scale range follows the image size: each bound ``s`` becomes ``s ** g`` with
``g = (S / 192) ** (1/3)`` (:func:`size_scaled`), i.e. the log of the kept area fraction shrinks with the cube
root of the size -- at 32 px DINO's global (0.4, 1) -> (0.60, 1) (the scale an independent small DINO found to
work on the built-in digits, where (0.4, 1) left too little of a digit), local (0.05, 0.4) -> (0.19, 0.60),
SimMIM/SparK (0.67, 1) -> (0.80, 1), BEiT (0.08, 1) -> (0.25, 1), BEiT v2 (0.2, 1) -> (0.41, 1). An
explicit ``crop_scale`` is used as given; DINO's local range then ends at the global lower bound. The Gaussian
blur's sigma is a length in pixels: its upper end follows the size in proportion to DINO's 224 px
(``2 * S / 224``, 0.29 px at 32), its lower end stays 0.1 px (no visible blur at any size).

Randomness: every parameter (crop window, flip, jitter factors, grayscale/blur/solarise draws, blur sigma) is
sampled here in numpy from one generator per batch keyed on (seed, epoch, shard, step), the views drawn
from it in order, and handed to DALI as per-sample argument inputs. DALI's own RNG is never used, so a batch
is a pure function of its key: runs are reproducible, a resumed run continues with the very same batch, and the torch fallback sees identical
parameters. RandomResizedCrop follows torchvision's algorithm (10 tries of area/log-ratio sampling, then a
centre crop with the ratio clamped), vectorised over the batch.

Colour jitter: torchvision applies brightness, contrast, saturation and hue in a random order, contrast around
the image's mean grey level; both backends here apply them in the fixed order of DALI's ``color_twist`` with
contrast around the middle grey (128), a pointwise map, so the shared-crop BEiT views stay consistent.
Grayscale
is saturation 0 (ITU-R 601 luma, as torchvision). Resampling: DALI resize with antialiasing; the torch
fallback
uses ``F.interpolate(antialias=True)`` (no Lanczos in torch: bicubic with antialias stands in for it).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RECIPES = ("simmim", "spark", "beit", "beitv2", "dino")  # the augmentation recipes (named after their method)
METHODS = RECIPES  # the former name: these are recipes, which any method may use (engine.data.DataRecipe)
INTERPOLATIONS = ("bicubic", "bilinear", "lanczos")
NORMS = ("imagenet", "dvae")


@dataclasses.dataclass(frozen=True)
class Twin:
    """A second output resampled from the same crop with the same colour/flip parameters (BEiT's
    dVAE view)."""

    key: str
    size: int
    interp: str = "lanczos"
    norm: str = "dvae"


@dataclasses.dataclass(frozen=True)
class View:
    """One random view: RandomResizedCrop + flip + optional colour/blur/solarise, then normalisation."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interp: str = "bicubic"
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    jitter_p: float = 0.0
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    norm: str = "imagenet"
    twin: Twin | None = None

    @property
    def colour(self) -> bool:
        return (self.jitter is not None and self.jitter_p > 0) or self.gray_p > 0


@dataclasses.dataclass(frozen=True)
class Recipe:
    method: str
    views: tuple[View, ...]
    keys: tuple[str, ...]  # output key of each view; "crops" collects views into a list (DINO)


def default_local_size(image_size: int) -> int:
    return max(8, int(round(image_size * 96 / 224 / 8)) * 8)


SCALE_REFERENCE_SIZE = 192  # published crop scales hold from here up
BLUR_REFERENCE_SIZE = 224  # DINO's blur radii (0.1, 2) px are for 224-px views


def size_scaled(scale, image_size: int) -> tuple[float, float]:
    """A published crop-scale range at ``image_size`` (module doc): ``s ** (S / 192) ** (1/3)`` below 192 px."""
    g = min(1.0, image_size / SCALE_REFERENCE_SIZE) ** (1.0 / 3.0)
    return (float(scale[0]) ** g, float(scale[1]) ** g)


def size_scaled_blur(image_size: int, sigma=(0.1, 2.0)) -> tuple[float, float]:
    """DINO's blur sigma range at ``image_size``: the upper end in proportion to 224 px, at least 0.1 px."""
    hi = float(sigma[1]) * min(1.0, image_size / BLUR_REFERENCE_SIZE)
    return (float(sigma[0]), max(float(sigma[0]), hi))


_VARIANTS: dict[str, tuple[str, dict]] = {}
RECIPE_OPTIONS = ("local_crops_scale", "color_jitter")


def recipe_variant(method: str, **options) -> str:
    """A recipe name for ``method`` with extra options (``None`` = the default), registered so that
    :func:`pretrain_recipe` (and so the loader) builds it: ``"dino"`` itself when no option is set, else e.g.
    ``"dino[color_jitter=0.5]"``."""
    if method not in RECIPES:
        raise ValueError(f"method must be one of {RECIPES}, got {method!r}")
    bad = sorted(set(options) - set(RECIPE_OPTIONS))
    if bad:
        raise ValueError(f"unknown recipe option(s) {bad}; known: {RECIPE_OPTIONS}")
    opts = {k: (tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else v)
            for k, v in sorted(options.items()) if v is not None}
    if not opts:
        return method
    name = method + "[" + ",".join(f"{k}={v}" for k, v in opts.items()) + "]"
    _VARIANTS[name] = (method, opts)
    return name


def _check_scale(crop_scale, name="crop_scale"):
    lo, hi = (float(v) for v in crop_scale)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"{name} must satisfy 0 < lo <= hi <= 1, got {crop_scale!r}")
    return (lo, hi)


def pretrain_recipe(
    method: str,
    image_size: int,
    *,
    local_crops: int = 8,
    local_size: int | None = None,
    tokenizer_size: int | None = None,
    crop_scale=None,
    local_crops_scale=None,
    color_jitter: float = 1.0,
) -> Recipe:
    """The :class:`Recipe` of ``method`` (or of a :func:`recipe_variant` name) at ``image_size`` (see the
    module docstring)."""
    if method in _VARIANTS:
        method, opts = _VARIANTS[method]
        local_crops_scale = opts.get("local_crops_scale", local_crops_scale)
        color_jitter = opts.get("color_jitter", color_jitter)
    if method not in RECIPES:
        raise ValueError(f"method must be one of {RECIPES}, got {method!r}")
    color_jitter = float(color_jitter)
    if not color_jitter >= 0:
        raise ValueError(f"color_jitter must be >= 0, got {color_jitter!r}")

    def jitter_of(published, p):
        j = tuple(color_jitter * x for x in published)
        return dict(jitter=j, jitter_p=p if color_jitter > 0 else 0.0)
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    S = image_size

    def scale_of(published):
        return _check_scale(crop_scale) if crop_scale is not None else size_scaled(published, S)

    if method in ("simmim", "spark"):
        scale = scale_of((0.67, 1.0))
        interp = "bilinear" if method == "simmim" else "bicubic"
        return Recipe(method, (View(S, scale, interp=interp),), ("images",))
    if method == "beit":
        t = tokenizer_size or S // 2
        if t < 1:
            raise ValueError(f"tokenizer_size must be >= 1, got {tokenizer_size!r}")
        scale = scale_of((0.08, 1.0))
        v = View(S, scale, **jitter_of((0.4, 0.4, 0.4, 0.0), 1.0), twin=Twin("tokenizer_images", t))
        return Recipe(method, (v,), ("images",))
    if method == "beitv2":
        scale = scale_of((0.2, 1.0))
        return Recipe(method, (View(S, scale, **jitter_of((0.4, 0.4, 0.4, 0.0), 1.0)),), ("images",))
    # dino
    if not isinstance(local_crops, int) or local_crops < 0:
        raise ValueError(f"local_crops must be an int >= 0, got {local_crops!r}")
    s = local_size or default_local_size(S)
    if s < 1:
        raise ValueError(f"local_size must be >= 1, got {local_size!r}")
    gscale = scale_of((0.4, 1.0))
    if local_crops_scale is not None:
        lscale = _check_scale(local_crops_scale, "local_crops_scale")
    else:
        lscale = (min(size_scaled((0.05, 0.4), S)[0], gscale[0]), gscale[0])
    common = dict(**jitter_of((0.4, 0.4, 0.2, 0.1), 0.8), gray_p=0.2, blur_sigma=size_scaled_blur(S))
    g1 = View(S, gscale, blur_p=1.0, **common)
    g2 = View(S, gscale, blur_p=0.1, solarize_p=0.2, **common)
    loc = View(s, lscale, blur_p=0.5, **common)
    return Recipe(method, (g1, g2) + (loc,) * local_crops, ("crops",) * (2 + local_crops))


# ----------------------------------------------------------------------------------------------------------
# parameter sampling


def batch_rng(seed: int, epoch: int, shard_id: int, step: int, stream: int = 0) -> np.random.Generator:
    """The generator of one (seed, epoch, shard, step, stream) key; independent across keys."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(shard_id), int(step), int(stream)])


def sample_rrc(
    rng: np.random.Generator, widths: np.ndarray, heights: np.ndarray, scale, ratio, tries: int = 10
) -> np.ndarray:
    """RandomResizedCrop windows ``[n, 4]`` = (x0, y0, w, h) in pixels, torchvision's algorithm vectorised.

    For each image: area fraction ~ U(scale), aspect ~ exp(U(log ratio)); w = round(sqrt(a*A*r)),
    h = round(sqrt(a*A/r)); the first of ``tries`` draws with 0 < w <= W and 0 < h <= H is taken, its corner
    uniform over the valid integer positions; when all fail, a centre crop of the whole image with the aspect
    clamped to ``ratio``.
    """
    W = np.asarray(widths, np.float64)[:, None]
    H = np.asarray(heights, np.float64)[:, None]
    n = W.shape[0]
    area = W * H
    target = area * rng.uniform(scale[0], scale[1], size=(n, tries))
    logr = rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, tries))
    r = np.exp(logr)
    w = np.round(np.sqrt(target * r))
    h = np.round(np.sqrt(target / r))
    ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    u = rng.random((n, 2))
    first = np.argmax(ok, axis=1)
    rows = np.arange(n)
    any_ok = ok[rows, first]
    w_sel, h_sel = w[rows, first], h[rows, first]
    W1, H1 = W[:, 0], H[:, 0]
    x0 = np.floor(u[:, 0] * (W1 - w_sel + 1))
    y0 = np.floor(u[:, 1] * (H1 - h_sel + 1))
    # fallback: centre crop, aspect clamped to ratio
    in_ratio = W1 / H1
    fw = np.where(in_ratio < ratio[0], W1, np.where(in_ratio > ratio[1], np.round(H1 * ratio[1]), W1))
    fh = np.where(in_ratio < ratio[0], np.round(W1 / ratio[0]), H1)
    fx, fy = np.floor((W1 - fw) / 2), np.floor((H1 - fh) / 2)
    out = np.stack(
        [
            np.where(any_ok, x0, fx),
            np.where(any_ok, y0, fy),
            np.where(any_ok, w_sel, fw),
            np.where(any_ok, h_sel, fh),
        ],
        axis=1,
    )
    return out.astype(np.float32)


def sample_view(rng: np.random.Generator, view: View, widths: np.ndarray, heights: np.ndarray) -> dict:
    """Per-sample parameters of ``view`` for a batch: numpy arrays of length n (crop: [n, 4]).

    ``colour`` is [n, 4] = (brightness, contrast, saturation, hue in degrees), identity where jitter was not
    drawn and saturation 0 where grayscale was drawn; ``blur`` is a bool mask and ``sigma`` its sigma.
    """
    n = len(widths)
    crop = sample_rrc(rng, widths, heights, view.scale, view.ratio)
    flip = rng.random(n) < view.flip_p
    colour = np.tile(np.array([1.0, 1.0, 1.0, 0.0], np.float32), (n, 1))
    if view.jitter is not None:
        b, c, s, h = view.jitter
        on = rng.random(n) < view.jitter_p
        draw = np.stack(
            [
                rng.uniform(max(0.0, 1 - b), 1 + b, n),
                rng.uniform(max(0.0, 1 - c), 1 + c, n),
                rng.uniform(max(0.0, 1 - s), 1 + s, n),
                rng.uniform(-h, h, n) * 360.0,
            ],
            axis=1,
        )
        colour[on] = draw[on]
    if view.gray_p > 0:
        colour[rng.random(n) < view.gray_p, 2] = 0.0
    blur = rng.random(n) < view.blur_p
    sigma = rng.uniform(view.blur_sigma[0], view.blur_sigma[1], n).astype(np.float32)
    solarize = rng.random(n) < view.solarize_p
    return {
        "crop": crop,
        "flip": flip,
        "colour": colour.astype(np.float32),
        "blur": blur,
        "sigma": sigma,
        "solarize": solarize,
    }


def sample_recipe(
    recipe: Recipe, sizes: np.ndarray, *, seed: int, epoch: int, shard_id: int, step: int
) -> list:
    """Parameters of every view of ``recipe`` for a batch with image sizes ``sizes`` [n, 2] = (W, H)."""
    rng = batch_rng(seed, epoch, shard_id, step, stream=1)
    return [sample_view(rng, v, sizes[:, 0], sizes[:, 1]) for v in recipe.views]


def eval_resize(image_size: int) -> int:
    """Shorter side before the centre crop: int(S * 256 / 224), as BEiT/DeiT/timm (256 at 224)."""
    return int(image_size * 256 / 224)
