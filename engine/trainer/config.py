"""Run configuration: built-in defaults < method defaults < YAML preset < command-line flags.

Every key of :data:`SPEC` is a flag (``weight_decay_end`` -> ``--weight-decay-end``). A YAML preset
holds top-level keys plus optional per-method sections (``dino: {...}``) applied only for that method.
Without ``--config`` the small CPU preset ``engine/configs/default.yaml`` is used.

Learning rate: ``--lr`` is absolute; otherwise ``lr = blr * batch_size * world_size * accum_steps / 256``
(the linear scaling rule) with ``--blr`` or the method's default base lr.
"""

from __future__ import annotations

import argparse
import difflib
import math
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
    "overwrite": (False, bool, "start a new run in an --output-dir that holds a checkpoint (replaced at the first "
                               "save; the old log is dropped after the first good step)"),
    "skip_nonfinite": (0, int, "skip up to N optimizer steps whose loss or gradient norm is NaN/Inf (logged) "
                               "instead of stopping at the first"),
    "dist_timeout": (300.0, float, "seconds a collective may wait for a peer rank before the job fails (DDP)"),
    "seed": (0, int, "random seed"),
    "save_every": (0, int, "also checkpoint every N optimizer steps (0: at epoch ends only)"),
    "eval_every": (0, int, "k-NN evaluation every N epochs (0: off)"),
    "best_metric": (None, str, "keep checkpoint-best.pt of the evaluation with the highest value of this key"),
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
    "window_size": (None, int, "Swin window size in patches (default: the model's; SimMIM's recipe: 6 at 192 px)"),
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
    "use_bn_in_head": (None, bool, "DINO: BatchNorm1d after each hidden layer of the head (the original's "
                                   "--use_bn_in_head; images start apart at init)"),
    "local_crops_scale": (None, str, "DINO local crop scale range 'lo,hi' (default (0.05, 0.4) at >= 192 px, "
                                     "following the image size below)"),
    "color_jitter": (None, float, "colour-jitter strength factor of the recipe (1 = published; 0 = none)"),
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
    "kl_warmup_steps": (None, int, "dvae: the KL weight ramps linearly from 0 over this many updates (DALL-E: "
                                   "5000)"),
    "num_mask_patches": (None, int, "beit/beitv2 masked patches (75 at 14x14, else round(mask_ratio*N))"),
    "early_layer": (None, int, "beitv2 [CLS]-aggregation source layer (9 of 12; scaled by depth)"),
    "decoder_width": (None, int, "spark decoder width at the smallest scale (768)"),
    # evaluation at the end of the run
    "final_knn": (True, bool, "print k-NN of the pre-trained vs a random encoder at the end"),
    "knn_k": (20, int, "k of the k-NN classifier"),
    "knn_t": (0.07, float, "temperature of the k-NN vote"),
    # fine-tuning (python -m engine.finetune; --method finetune)
    "checkpoint": (None, str, "finetune: pre-trained weights: an engine.pretrain output folder or checkpoint, or an "
                              "engine.export .safetensors file"),
    "init": ("pretrained", str, "finetune: 'pretrained' (the --checkpoint weights) or 'random' (from scratch)"),
    "compare_random": (False, bool, "finetune: also fine-tune a randomly initialised copy, print both top-1"),
    "num_classes": (None, int, "finetune: classes of the head (default: those of the train folder)"),
    "train_fraction": (None, float, "finetune: fraction of every class of the train split used (few labels)"),
    "layer_decay": (None, float, "finetune: layer-wise lr decay (layer l of L gets lr * decay^(L+1-l))"),
    "head_init_scale": (None, float, "finetune: classifier init multiplied by this (BEiT's init_scale)"),
    "label_smoothing": (None, float, "finetune: label smoothing"),
    "mixup": (None, float, "finetune: mixup alpha (0: off)"),
    "cutmix": (None, float, "finetune: cutmix alpha (0: off)"),
    "mixup_prob": (None, float, "finetune: probability that a batch is mixed"),
    "mixup_switch_prob": (None, float, "finetune: probability of cutmix rather than mixup when both are on"),
    "randaug": (None, str, "finetune: RandAugment as timm's string (rand-m9-mstd0.5-inc1) or 'none'"),
    "reprob": (None, float, "finetune: random erasing probability"),
    "hflip": (None, float, "finetune: horizontal flip probability"),
    "loss": (None, str, "finetune: 'ce' (soft-target cross-entropy) or 'bce' (SparK's LAMB recipe)"),
}

GENERAL_FALLBACK = dict(blr=1.5e-4, warmup_epochs=1.0, min_lr=1e-6, weight_decay=0.05, clip_grad=3.0, drop_path=0.0,
                        pool="cls")


_RANGES: dict[str, str] = {
    # floats: interval notation
    "mask_ratio": "(0,1)", "drop_path": "[0,1)", "momentum_teacher": "[0,1]", "center_momentum": "[0,1]",
    "beta1": "[0,1)", "beta2": "[0,1)", "warmup_teacher_temp": "(0,inf)", "teacher_temp": "(0,inf)",
    "student_temp": "(0,inf)", "gumbel_temp": "(0,inf)", "gumbel_temp_end": "(0,inf)", "kl_weight": "[0,inf)",
    "min_lr": "[0,inf)", "weight_decay": "[0,inf)", "weight_decay_end": "[0,inf)", "clip_grad": "[0,inf)",
    "warmup_epochs": "[0,inf)", "warmup_teacher_temp_epochs": "[0,inf)", "init_values": "[0,inf)",
    "knn_t": "(0,inf)", "dist_timeout": "(0,inf)", "lr": "(0,inf)", "blr": "(0,inf)",
    # integers
    "batch_size": ">=1", "epochs": ">=1", "accum_steps": ">=1", "image_size": ">=1", "num_threads": ">=1",
    "patch_size": ">=1", "out_dim": ">=1", "head_hidden_dim": ">=1", "bottleneck_dim": ">=1", "local_size": ">=1",
    "vocab_size": ">=2", "codebook_dim": ">=1", "tokenizer_width": ">=1", "tokenizer_cell": ">=1",
    "decoder_depth": ">=1", "num_mask_patches": ">=1", "early_layer": ">=1", "decoder_width": ">=1",
    "knn_k": ">=1", "mask_patch_size": ">=1", "tokenizer_size": ">=1", "print_every": ">=1",
    "max_steps": ">=0", "stop_after": ">=0", "save_every": ">=0", "eval_every": ">=0", "local_crops": ">=0",
    "freeze_last_layer": ">=0", "skip_nonfinite": ">=0", "seed": ">=0",
    "color_jitter": "[0,inf)",
    "kl_warmup_steps": ">=0",
    # fine-tuning
    "layer_decay": "(0,1]", "head_init_scale": "(0,inf)", "label_smoothing": "[0,1)", "mixup": "[0,inf)",
    "cutmix": "[0,inf)", "mixup_prob": "[0,1]", "mixup_switch_prob": "[0,1]", "reprob": "[0,1]", "hflip": "[0,1]",
    "train_fraction": "(0,1]", "num_classes": ">=2",
}
_CHOICES = {"precision": ("fp32", "bf16", "fp16"), "pool": ("cls", "mean")}
_CHOICES.update({"init": ("pretrained", "random"), "loss": ("ce", "bce")})


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def help_defaults() -> dict:
    """Defaults as a bare ``python -m engine.pretrain`` sees them: SPEC < the default preset's top level."""
    out = {k: v[0] for k, v in SPEC.items()}
    try:
        with open(DEFAULT_PRESET) as fh:
            preset = yaml.safe_load(fh) or {}
        out.update({k: v for k, v in preset.items() if k in SPEC and not isinstance(v, dict)})
    except (OSError, yaml.YAMLError):
        pass
    return out


def build_parser(prog: str = "python -m engine.pretrain") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Self-supervised pre-training of a vision backbone.",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help=f"YAML preset (name in {CONFIG_DIR} or a path); default: default.yaml")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration and exit")
    shown = help_defaults()
    for key, (_, typ, help_) in SPEC.items():
        flag = _flag(key)
        h = f"{help_} (default: {shown[key]})"
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=h)
        elif key == "resume":
            p.add_argument(flag, nargs="?", const="auto", help=h)
        else:
            p.add_argument(flag, type=typ, help=h)
    return p


def load_preset(name: str | None) -> tuple[dict, Path]:
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
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"--config {path}: not valid YAML{at} ({getattr(exc, 'problem', None) or exc})") from None
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data, path


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(key: str, value, where: str):
    """``value`` of ``key`` in SPEC's type, or a ConfigError naming the key and where it came from."""
    default, typ, _ = SPEC[key]
    name = f"{where}{key}" if where else _flag(key)

    def bad(expected: str):
        return ConfigError(f"{name}: expected {expected}, got {value!r} ({type(value).__name__})")

    if value is None:
        if default is None or key in ("resume",):
            return None
        raise bad("a value (it has no 'unset' state)")
    if key == "crop_scale" and isinstance(value, (list, tuple)):
        if len(value) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise bad("'lo,hi' or a list of two numbers")
        return tuple(float(v) for v in value)
    if typ is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if typ is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad("a number") from None
        if not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{name}: expected a finite number, got {value}")
        return value
    if not isinstance(value, str):
        raise bad("a string")
    return value


def resolve(cli: dict, method_defaults_fn=None, known_methods=None) -> dict:
    """Merge defaults, method defaults, preset and CLI values (CLI keys present only when given); every key
    is checked (unknown keys and sections, types, ranges) and its source recorded in ``cfg["_sources"]``."""
    if known_methods is None:
        from engine.methods import KNOWN_METHODS, available_methods

        known_methods = sorted(set(KNOWN_METHODS) | set(available_methods()))
    preset, preset_path = load_preset(cli.get("config"))
    cfg = {k: v[0] for k, v in SPEC.items()}
    sources = {k: "default" for k in cfg}
    method = cli.get("method", preset.get("method", cfg["method"]))
    cfg.update(GENERAL_FALLBACK)
    if method_defaults_fn is not None:
        defaults = method_defaults_fn(method)
        cfg.update(defaults)
        sources.update({k: f"method {method}" for k in defaults})
    sections = {}
    for k, v in preset.items():
        if isinstance(v, dict):
            if k not in known_methods:
                hint = _did_you_mean(k, known_methods) or (f" ({k!r} is an option, not a section)" if k in SPEC else "")
                raise ConfigError(f"--config {preset_path}: unknown section {k!r}{hint}; sections are method "
                                  f"names: {', '.join(known_methods)}")
            sections[k] = v
        elif k not in SPEC:
            raise ConfigError(f"--config {preset_path}: unknown key {k!r}{_did_you_mean(k, SPEC)}")
    for sec, values in sections.items():
        for k in values:
            if k not in SPEC or k == "method":
                raise ConfigError(f"--config {preset_path}: unknown key {k!r} in section {sec!r}"
                                  f"{_did_you_mean(k, SPEC)}")
    for k, v in preset.items():
        if k not in sections:
            cfg[k] = _coerce(k, v, f"--config {preset_path}: ")
            sources[k] = f"preset {preset_path.name}"
    for k, v in sections.get(method, {}).items():
        cfg[k] = _coerce(k, v, f"--config {preset_path}: {method}.")
        sources[k] = f"preset {preset_path.name} ({method}:)"
    for k, v in cli.items():
        if k in ("config", "print_config"):
            continue
        if k not in SPEC:
            raise ConfigError(f"unknown option {k!r}{_did_you_mean(k, SPEC)}")
        cfg[k] = _coerce(k, v, "")
        sources[k] = "command line"
    cfg["method"] = method
    cfg["config"] = cli.get("config") or str(DEFAULT_PRESET.name)
    if cfg.get("weight_decay_end") is None:
        cfg["weight_decay_end"] = cfg["weight_decay"]
        sources["weight_decay_end"] = "= weight_decay"
    validate(cfg)
    cfg["_sources"] = sources
    return cfg


def _check_range(key: str, value) -> None:
    rule = _RANGES.get(key)
    if rule is None or value is None:
        return
    if rule.startswith(">="):
        lo = int(rule[2:])
        if value < lo:
            raise ConfigError(f"{_flag(key)} must be an integer >= {lo}, got {value!r}")
        return
    lo_open, hi_open = rule[0] == "(", rule[-1] == ")"
    lo, hi = (float(x) for x in rule[1:-1].split(","))
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ConfigError(f"{_flag(key)} must be in {rule.replace('inf', '∞')}, got {value!r}")


def validate(cfg: dict) -> None:
    for key, value in cfg.items():
        if key in SPEC:
            _check_range(key, value)
    for key, allowed in _CHOICES.items():
        if cfg.get(key) is not None and cfg[key] not in allowed:
            raise ConfigError(f"{_flag(key)} must be {', '.join(allowed)}, got {cfg[key]!r}")
    from engine.trainer.optim import OPTIMIZERS

    if cfg.get("optimizer", "adamw") not in OPTIMIZERS:
        raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg['optimizer']!r}")
    if cfg["data"] is not None and not Path(cfg["data"]).is_dir():
        raise ConfigError(f"--data: no such folder {cfg['data']}")
    if cfg.get("crop_scale") is not None and not isinstance(cfg["crop_scale"], (list, tuple)):
        try:
            lo, hi = (float(v) for v in str(cfg["crop_scale"]).split(","))
        except ValueError:
            raise ConfigError(f"--crop-scale: expected 'lo,hi', got {cfg['crop_scale']!r}") from None
        cfg["crop_scale"] = (lo, hi)
    if cfg.get("crop_scale") is not None:
        lo, hi = cfg["crop_scale"]
        if not (0 < lo <= hi <= 1):
            raise ConfigError(f"--crop-scale: expected 0 < lo <= hi <= 1, got {lo},{hi}")


def dump_config(cfg: dict) -> str:
    """The resolved configuration as YAML, each value commented with its source."""
    sources = cfg.get("_sources", {})
    lines = ["# resolved configuration of python -m engine.pretrain (value  # source)"]
    for key in sorted(k for k in cfg if not k.startswith("_")):
        value = cfg[key]
        if isinstance(value, tuple):
            value = list(value)
        text = yaml.safe_dump({key: value}, default_flow_style=True, sort_keys=False).strip()
        if text.startswith("{") and text.endswith("}"):
            text = text[1:-1]
        src = sources.get(key)
        lines.append(f"{text}" + (f"  # {src}" if src else ""))
    return "\n".join(lines) + "\n"


def peak_lr(cfg: dict, world_size: int = 1) -> float:
    from engine.trainer.schedules import scaled_lr

    if cfg.get("lr"):
        return float(cfg["lr"])
    return scaled_lr(float(cfg["blr"]), cfg["batch_size"], world_size, cfg["accum_steps"])
