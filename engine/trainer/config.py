"""Run configuration: built-in defaults < method defaults < YAML preset < command-line flags.

Every key of :data:`SPEC` is a flag (``weight_decay_end`` -> ``--weight-decay-end``). A YAML preset
holds top-level keys plus optional per-method sections (``dino: {...}``) applied only for that method.
Without ``--config`` the small CPU preset ``engine/configs/default.yaml`` is used.

Learning rate: ``--lr`` is absolute; otherwise ``lr = blr * batch_size * world_size * accum_steps / 256``
(the linear scaling rule) with ``--blr`` or the method's default base lr.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = CONFIG_DIR / "default.yaml"


class ConfigError(ValueError):
    """A bad configuration value; the CLI prints it on one line and exits with status 2."""


# key: (default, type, help). type None = string; bool keys become --x/--no-x.
SPEC: dict[str, tuple] = {
    "method": ("dino", str, "pre-training method: beit, beitv2, simmim, spark, dino; tokenizers: dvae, vqkd"),
    "model": ("vit_pico", str, "backbone: vit_femto/vit_pico/vit_nano (CPU), vit_tiny/small/base/large"),
    "data": (None, str, "image folder with train/ (and val/); default: the built-in digits dataset"),
    "image_size": (32, int, "input resolution (global crops)"),
    "patch_size": (None, int, "ViT patch size (default: the model's)"),
    "epochs": (10, int, "training epochs"),
    "batch_size": (64, int, "images per process per micro-batch"),
    "lr": (None, float, "absolute peak learning rate (overrides --blr)"),
    "blr": (None, float, "base lr; lr = blr * batch*world*accum / 256 (linear scaling rule)"),
    "warmup_epochs": (None, float, "linear lr warm-up epochs"),
    "min_lr": (None, float, "final lr of the cosine schedule"),
    "weight_decay": (None, float, "weight decay at the start of the cosine wd schedule"),
    "weight_decay_end": (None, float, "weight decay at the end (default: = --weight-decay)"),
    "clip_grad": (None, float, "global grad-norm clip (0 = off)"),
    "accum_steps": (1, int, "gradient accumulation micro-batches per optimizer step"),
    "precision": ("fp32", str, "fp32, bf16 or fp16 (autocast; GradScaler for fp16)"),
    "optimizer": ("adamw", str, "adamw, lamb (SparK's recipe) or sgd"),
    "beta1": (0.9, float, "AdamW/LAMB beta1"),
    "beta2": (0.999, float, "AdamW/LAMB beta2"),
    "output_dir": ("output/pretrain", str, "checkpoints, log.jsonl, tensorboard"),
    "resume": (None, str, "'auto' (last checkpoint of --output-dir, the default with a bare --resume) or a path"),
    "seed": (0, int, "random seed"),
    "save_every": (0, int, "also checkpoint every N optimizer steps (0: at epoch ends only)"),
    "eval_every": (0, int, "k-NN evaluation every N epochs (0: off)"),
    "device": (None, str, "cpu, cuda, cuda:1 (default: cuda when available)"),
    "max_steps": (0, int, "stop after N optimizer steps; schedules are shortened to N (0: epochs x steps)"),
    "stop_after": (0, int, "simulate a pre-emption: exit after N steps of this run, schedules unchanged"),
    "num_threads": (2, int, "data-loading threads"),
    "print_every": (10, int, "progress line every N steps"),
    "drop_path": (None, float, "stochastic depth rate"),
    "init_values": (None, float, "layer-scale init (0/None: off)"),
    "qv_bias": (None, bool, "q/v biases only (BEiT)"),
    "use_abs_pos_emb": (None, bool, "absolute position embedding"),
    "use_shared_rel_pos_bias": (None, bool, "one relative position bias shared by all layers"),
    "use_rel_pos_bias": (None, bool, "one relative position bias per layer"),
    "pool": (None, str, "feature pooling for evaluation: cls or mean"),
    "crop_scale": (None, str, "global crop scale range 'lo,hi'"),
    # masked image modelling
    "mask_ratio": (None, float, "fraction of masked units"),
    "mask_patch_size": (None, int, "SimMIM mask unit in pixels (default 32 at >=192 px, scaled down below)"),
    # DINO
    "out_dim": (None, int, "DINO prototypes (65536 in the paper)"),
    "head_hidden_dim": (None, int, "DINO head MLP width (2048)"),
    "bottleneck_dim": (None, int, "DINO head bottleneck (256)"),
    "norm_last_layer": (None, bool, "DINO: weight-norm gain fixed to 1"),
    "local_crops": (None, int, "DINO local crops"),
    "local_size": (None, int, "DINO local crop size"),
    "momentum_teacher": (None, float, "DINO teacher EMA momentum start (cosine to 1)"),
    "center_momentum": (None, float, "DINO centering momentum"),
    "warmup_teacher_temp": (None, float, "DINO teacher temperature at step 0"),
    "teacher_temp": (None, float, "DINO teacher temperature after warm-up"),
    "warmup_teacher_temp_epochs": (None, float, "DINO teacher temperature warm-up epochs"),
    "student_temp": (None, float, "DINO student temperature"),
    "freeze_last_layer": (None, int, "DINO: epochs with the last head layer frozen"),
    # BEiT / BEiT v2 / SparK and their tokenizers (dvae, vqkd)
    "tokenizer": (None, str, "beit/beitv2: tokenizer (a --method dvae/vqkd run, or a DALL-E encoder)"),
    "teacher": (None, str, "vqkd: frozen teacher checkpoint (default: a random ViT, not CLIP/DINO)"),
    "tokenizer_size": (None, int, "beit: tokenizer view size (default: patch grid x tokenizer cell)"),
    "vocab_size": (None, int, "dvae/vqkd codebook size (8192 in the papers)"),
    "codebook_dim": (None, int, "vqkd code dimension (32)"),
    "tokenizer_width": (None, int, "dvae conv width / vqkd decoder width"),
    "tokenizer_cell": (None, int, "dvae pixels per token side (8 = DALL-E; a power of 2)"),
    "decoder_depth": (None, int, "vqkd decoder blocks (3)"),
    "gumbel_temp": (None, float, "dvae Gumbel-softmax temperature at step 0"),
    "gumbel_temp_end": (None, float, "dvae Gumbel-softmax temperature at the end (cosine anneal)"),
    "kl_weight": (None, float, "dvae weight of KL(q || uniform)"),
    "num_mask_patches": (None, int, "beit/beitv2 masked patches (75 at 14x14, else round(mask_ratio*N))"),
    "early_layer": (None, int, "beitv2 [CLS]-aggregation source layer (9 of 12; scaled by depth)"),
    "decoder_width": (None, int, "spark decoder width at the smallest scale (768)"),
    # evaluation at the end of the run
    "final_knn": (True, bool, "print k-NN of the pre-trained vs a random encoder at the end"),
    "knn_k": (20, int, "k of the k-NN classifier"),
    "knn_t": (0.07, float, "temperature of the k-NN vote"),
}

GENERAL_FALLBACK = dict(blr=1.5e-4, warmup_epochs=1.0, min_lr=1e-6, weight_decay=0.05, clip_grad=3.0, drop_path=0.0,
                        pool="cls")


def build_parser(prog: str = "python -m engine.pretrain") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Self-supervised pre-training of a ViT.",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help=f"YAML preset (name in {CONFIG_DIR} or a path); default: default.yaml")
    for key, (default, typ, help_) in SPEC.items():
        flag = "--" + key.replace("_", "-")
        h = f"{help_} (default: {default})"
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=h)
        elif key == "resume":
            p.add_argument(flag, nargs="?", const="auto", help=h)
        else:
            p.add_argument(flag, type=typ, help=h)
    return p


def load_preset(name: str | None) -> dict:
    if name is None:
        path = DEFAULT_PRESET
    else:
        path = Path(name)
        if not path.is_file():
            cand = CONFIG_DIR / (name if name.endswith((".yaml", ".yml")) else name + ".yaml")
            if not cand.is_file():
                have = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
                raise ConfigError(f"--config: no preset or file {name!r} (presets: {have})")
            path = cand
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping at the top level")
    return data


def resolve(cli: dict, method_defaults_fn=None) -> dict:
    """Merge defaults, method defaults, preset and CLI values (CLI keys present only when given)."""
    preset = load_preset(cli.get("config"))
    cfg = {k: v[0] for k, v in SPEC.items()}
    method = cli.get("method", preset.get("method", cfg["method"]))
    cfg.update(GENERAL_FALLBACK)
    if method_defaults_fn is not None:
        cfg.update(method_defaults_fn(method))
    sections = {k: v for k, v in preset.items() if isinstance(v, dict)}
    unknown = [k for k in preset if k not in SPEC and k not in sections]
    if unknown:
        raise ConfigError(f"--config: unknown keys {unknown}")
    cfg.update({k: v for k, v in preset.items() if k not in sections})
    cfg.update(sections.get(method, {}))
    cfg.update({k: v for k, v in cli.items() if k != "config"})
    cfg["method"] = method
    cfg["config"] = cli.get("config") or str(DEFAULT_PRESET.name)
    if cfg.get("weight_decay_end") is None:
        cfg["weight_decay_end"] = cfg["weight_decay"]
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    def positive(key):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be an integer >= 1, got {cfg.get(key)!r}")

    for key in ("batch_size", "epochs", "accum_steps", "image_size", "num_threads"):
        positive(key)
    for key in ("max_steps", "stop_after", "save_every", "eval_every"):
        if cfg[key] < 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    if cfg["precision"] not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision must be fp32, bf16 or fp16, got {cfg['precision']!r}")
    from engine.trainer.optim import OPTIMIZERS

    if cfg.get("optimizer", "adamw") not in OPTIMIZERS:
        raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg['optimizer']!r}")
    for key in ("lr", "blr"):
        if cfg.get(key) is not None and cfg[key] <= 0:
            raise ConfigError(f"--{key} must be > 0, got {cfg[key]}")
    if cfg["data"] is not None and not Path(cfg["data"]).is_dir():
        raise ConfigError(f"--data: no such folder {cfg['data']}")
    if cfg["data"] is not None and not (Path(cfg["data"]) / "train").is_dir():
        raise ConfigError(f"--data: {cfg['data']} has no train/ sub-folder")
    if cfg.get("crop_scale") is not None and not isinstance(cfg["crop_scale"], (list, tuple)):
        try:
            lo, hi = (float(v) for v in str(cfg["crop_scale"]).split(","))
        except ValueError:
            raise ConfigError(f"--crop-scale: expected 'lo,hi', got {cfg['crop_scale']!r}") from None
        cfg["crop_scale"] = (lo, hi)


def peak_lr(cfg: dict, world_size: int = 1) -> float:
    from engine.trainer.schedules import scaled_lr

    if cfg.get("lr"):
        return float(cfg["lr"])
    return scaled_lr(float(cfg["blr"]), cfg["batch_size"], world_size, cfg["accum_steps"])
