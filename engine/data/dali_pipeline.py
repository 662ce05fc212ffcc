"""NVIDIA DALI graphs for the pre-training recipes and the evaluation transform.

Every pipeline reads from named ``fn.external_source`` nodes that :mod:`engine.data.loader` fills with
``feed_input`` before each ``schedule_run``: the encoded file bytes of the batch (``"encoded"``) plus, for
every view j, its per-sample augmentation parameters (``"v<j>_<name>"``) sampled in
:mod:`engine.data.augment`. One pipeline is built per loader and reused across epochs. The graph, per view
(``device="cpu"``: CPU decoder and operators, ``device_id=None`` allowed; ``device="gpu"``:
``decoders.image(device="mixed")`` -- nvJPEG, hardware decoder where present -- and
every following operator on the GPU)::

    decode (once per image, shared by all views)
      -> resize(roi = crop window, size = view size, antialias)            # RandomResizedCrop
      [-> resize(same roi, twin size, Lanczos)]                              # BEiT's tokenizer view
      [-> color_twist(brightness, contrast, saturation, hue)]                # jitter / grayscale
      [-> if blur:     gaussian_blur(sigma)]                                 # DALI conditionals: only drawn
      [-> if solarize: x >= 128 ? 255 - x : x]                               #   samples pay for the op
      -> crop_mirror_normalize(mirror = flip, mean/std, CHW float32)

The eval graph: decode -> resize(shorter side = int(S*256/224), bicubic, antialias) -> centre crop S ->
normalise. Importing this module does not import DALI; :func:`build_pretrain_pipeline` does.
"""

from __future__ import annotations

from .augment import IMAGENET_MEAN, IMAGENET_STD, Recipe, View, eval_resize


def _decode(encoded, dec_device):
    """RGB decode as PIL (and the torch fallback) sees the file: EXIF orientation NOT applied (crop windows are
    drawn from PIL's sizes), and fancy chroma upsampling as libjpeg-turbo does it (the mixed/nvJPEG decoder
    otherwise defaults to plain upsampling, so GPU batches would differ slightly from CPU ones)."""
    from nvidia.dali import fn, types

    return fn.decoders.image(encoded, device=dec_device, output_type=types.RGB, adjust_orientation=False,
                             jpeg_fancy_upsampling=True)


def _interp(types, name: str):
    return {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR, "lanczos": types.INTERP_LANCZOS3}[
        name
    ]


def _norm(norm: str) -> tuple[list[float], list[float]]:
    """mean, std in 0..255 units so that (x - mean) / std is the requested normalisation."""
    if norm == "imagenet":
        return [m * 255 for m in IMAGENET_MEAN], [s * 255 for s in IMAGENET_STD]
    # dVAE mapping x/255 * 0.8 + 0.1 == (x - m) / s with s = 255 / 0.8, m = -0.1 * s
    s = 255 / 0.8
    return [-0.1 * s] * 3, [s] * 3


def view_inputs(view: View) -> list[str]:
    """Names (in feed order) of the per-sample argument inputs a view's graph consumes."""
    names = ["roi_start", "roi_end", "flip"]
    if view.colour:
        names += ["brightness", "contrast", "saturation", "hue"]
    if view.blur_p > 0:
        names += ["blur", "sigma"]
    if view.solarize_p > 0:
        names += ["solarize"]
    return names


def view_feed(view: View, params: dict) -> dict:
    """Per-view batched numpy arrays (one dense array per input, sample i = row i) for :func:`view_inputs`
    from :func:`augment.sample_view` output. Dense arrays, not per-sample lists: DALI takes them in one copy,
    where lists cost a numpy array and a shape check per sample and input (the multi-crop recipe feeds ~90
    inputs per batch)."""
    import numpy as np

    crop = np.asarray(params["crop"])  # x0, y0, w, h
    start = np.ascontiguousarray(np.stack([crop[:, 1], crop[:, 0]], 1), dtype=np.float32)  # DALI roi is (y, x)
    end = start + np.stack([crop[:, 3], crop[:, 2]], 1).astype(np.float32)
    cols = {
        "roi_start": start,
        "roi_end": np.ascontiguousarray(end),
        "flip": np.ascontiguousarray(params["flip"], dtype=np.int32),
    }
    if view.colour:
        colour = np.asarray(params["colour"], dtype=np.float32)
        for j, k in enumerate(("brightness", "contrast", "saturation", "hue")):
            cols[k] = np.ascontiguousarray(colour[:, j])
    if view.blur_p > 0:
        cols["blur"] = np.ascontiguousarray(params["blur"], dtype=bool)
        cols["sigma"] = np.ascontiguousarray(params["sigma"], dtype=np.float32)
    if view.solarize_p > 0:
        cols["solarize"] = np.ascontiguousarray(params["solarize"], dtype=bool)
    return {k: cols[k] for k in view_inputs(view)}


def pretrain_feed(recipe: Recipe, encoded: list, params: list[dict]) -> dict[str, list]:
    """The ``feed_input`` dict of one batch: ``encoded`` plus ``v<j>_<name>`` per view j."""
    feed = {"encoded": encoded}
    for j, (view, p) in enumerate(zip(recipe.views, params)):
        feed.update({f"v{j}_{k}": v for k, v in view_feed(view, p).items()})
    return feed


def build_pretrain_pipeline(
    recipe: Recipe, *, batch_size: int, num_threads: int, device: str, device_id: int | None, prefetch: int
):
    """A built DALI pipeline whose outputs are, per view, the view tensor then its twin (if any); its inputs
    are fed with :func:`pretrain_feed`."""
    from nvidia.dali import fn, pipeline_def, types

    views = recipe.views
    dec_device = "mixed" if device == "gpu" else "cpu"

    def solarize(x):
        flipped = 255 - x  # uint8 - int -> int32
        m = x >= 128
        return fn.cast(x * (1 - m) + flipped * m, dtype=types.UINT8)

    @pipeline_def(enable_conditionals=True)
    def graph():
        encoded = fn.external_source(name="encoded", batch=True)
        image = _decode(encoded, dec_device)
        outs = []
        for j, view in enumerate(views):
            args = {k: fn.external_source(name=f"v{j}_{k}", batch=True) for k in view_inputs(view)}
            sized = [(view.size, view.interp, view.norm)]
            if view.twin is not None:
                sized.append((view.twin.size, view.twin.interp, view.twin.norm))
            for size, interp, norm in sized:
                x = fn.resize(
                    image,
                    size=[size, size],
                    roi_start=args["roi_start"],
                    roi_end=args["roi_end"],
                    roi_relative=False,
                    interp_type=_interp(types, interp),
                    antialias=True,
                )
                if view.colour:
                    x = fn.color_twist(
                        x,
                        brightness=args["brightness"],
                        contrast=args["contrast"],
                        saturation=args["saturation"],
                        hue=args["hue"],
                    )
                if view.blur_p > 0:
                    if args["blur"]:  # DALI conditional: only the drawn samples are blurred
                        x = fn.gaussian_blur(x, sigma=args["sigma"])
                if view.solarize_p > 0:
                    if args["solarize"]:
                        x = solarize(x)
                mean, std = _norm(norm)
                outs.append(
                    fn.crop_mirror_normalize(
                        x, mirror=args["flip"], mean=mean, std=std, output_layout="CHW", dtype=types.FLOAT
                    )
                )
        return tuple(outs)

    pipe = graph(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=max(1, prefetch),
        seed=0,
    )
    pipe.build()
    return pipe


def build_eval_pipeline(
    *,
    image_size: int,
    batch_size: int,
    num_threads: int,
    device: str,
    device_id: int | None,
    prefetch: int = 2,
):
    """decode -> resize shorter side to int(S*256/224) (bicubic) -> centre crop S -> ImageNet normalise."""
    from nvidia.dali import fn, pipeline_def, types

    dec_device = "mixed" if device == "gpu" else "cpu"
    mean, std = _norm("imagenet")

    @pipeline_def
    def graph():
        enc = fn.external_source(name="encoded", batch=True)
        image = _decode(enc, dec_device)
        x = fn.resize(
            image, resize_shorter=eval_resize(image_size), interp_type=types.INTERP_CUBIC, antialias=True
        )
        return fn.crop_mirror_normalize(
            x,
            crop=(image_size, image_size),
            crop_pos_x=0.5,
            crop_pos_y=0.5,
            mean=mean,
            std=std,
            output_layout="CHW",
            dtype=types.FLOAT,
        )

    pipe = graph(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=max(1, prefetch),
        seed=0,
    )
    pipe.build()
    return pipe
