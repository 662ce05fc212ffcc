"""Run configuration: built-in defaults < method defaults < YAML preset < command-line flags.

Every key is a flag (``weight_decay_end`` -> ``--weight-decay-end``) and a YAML key: the engine-wide keys of
:data:`SPEC` and the options each registered method declares (``PretrainMethod.options``). A YAML preset
holds top-level keys plus optional per-method sections (``dino: {...}``) applied only for that method, and
per-method-and-model sections (``simmim.swin_pico: {...}``) applied after it when that method runs that model
(a backbone whose recipe differs from the method's default one).
Without ``--config`` the small CPU preset ``engine/configs/default.yaml`` is used.

Learning rate: ``--lr`` is absolute; otherwise ``lr = blr * batch_size * world_size * accum_steps / 256``
(the linear scaling rule) with ``--blr`` or the method's default base lr.
"""

from __future__ import annotations

import argparse
import difflib
import math
from pathlib import Path
from typing import NamedTuple

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = CONFIG_DIR / "default.yaml"


class ConfigError(ValueError):
    """A bad configuration value; the CLI prints it on one line and exits with status 2."""


class Option(NamedTuple):
    """One configuration key: flag ``--name-with-dashes``, YAML key ``name``.

    ``type``: str, int, float or bool (bool keys become ``--x/--no-x``); ``default``: the value before method
    defaults, preset and command line (None: unset); ``range``: ``">=N"`` (integers) or an interval such as
    ``"(0,1]"`` / ``"[0,inf)"`` (floats); ``choices``: the allowed values. The engine-wide keys are
    :data:`SPEC`; a method declares its own in its class attribute ``options`` (:mod:`engine.methods.base`)."""

    name: str
    default: object
    type: type
    help: str
    range: str | None = None
    choices: tuple | None = None


# the engine-wide keys (trainer, data, backbone, evaluation); a method's own keys are declared by the method
SPEC: dict[str, Option] = {o.name: o for o in (
    Option('method', 'dino', str, 'pre-training method (build_parser lists those registered)'),
    Option('model', 'vit_pico', str, 'backbone: vit_femto/vit_pico/vit_nano (CPU), vit_tiny/small/base/large'),
    Option('data', None, str, 'image folder with train/ (and val/); default: the built-in digits dataset'),
    Option('image_size', 32, int, 'input resolution (global crops)', range='>=1'),
    Option('patch_size', None, int, "ViT patch size (default: the model's)", range='>=1'),
    Option('epochs', 10, int, 'training epochs', range='>=1'),
    Option('batch_size', 64, int, 'images per process per micro-batch', range='>=1'),
    Option('lr', None, float, 'absolute peak learning rate (overrides --blr)', range='(0,inf)'),
    Option('blr', None, float, 'base lr; lr = blr * batch*world*accum / 256 (linear scaling rule)', range='(0,inf)'),
    Option('warmup_epochs', None, float, 'linear lr warm-up epochs', range='[0,inf)'),
    Option('min_lr', None, float, 'final lr of the cosine schedule', range='[0,inf)'),
    Option('weight_decay', None, float, 'weight decay at the start of the cosine wd schedule', range='[0,inf)'),
    Option('weight_decay_end', None, float, 'weight decay at the end (default: = --weight-decay)', range='[0,inf)'),
    Option('clip_grad', None, float, 'global grad-norm clip (0 = off)', range='[0,inf)'),
    Option('accum_steps', 1, int, 'gradient accumulation micro-batches per optimizer step', range='>=1'),
    Option('precision', 'fp32', str, 'fp32, bf16 or fp16 (autocast; GradScaler for fp16)', choices=('fp32', 'bf16', 'fp16')),
    Option('optimizer', 'adamw', str, "adamw, lamb (SparK's recipe) or sgd"),
    Option('beta1', 0.9, float, 'AdamW/LAMB beta1', range='[0,1)'),
    Option('beta2', 0.999, float, 'AdamW/LAMB beta2', range='[0,1)'),
    Option('output_dir', 'output/pretrain', str, 'checkpoints, log.jsonl, tensorboard'),
    Option('resume', None, str, "'auto' (last checkpoint of --output-dir, the default with a bare --resume) or a path"),
    Option('overwrite', False, bool, 'start a new run in an --output-dir that holds a checkpoint (replaced at the first save; the old log is dropped after the first good step)'),
    Option('skip_nonfinite', 0, int, 'skip up to N optimizer steps whose loss or gradient norm is NaN/Inf (logged) instead of stopping at the first', range='>=0'),
    Option('dist_timeout', 300.0, float, 'seconds a collective may wait for a peer rank before the job fails (DDP)', range='(0,inf)'),
    Option('seed', 0, int, 'random seed', range='>=0'),
    Option('save_every', 0, int, 'also checkpoint every N optimizer steps (0: at epoch ends only)', range='>=0'),
    Option('save_every_epochs', 1, int, 'checkpoint every N epochs (always at the end, before an evaluation that keeps the best, and on SIGTERM)', range='>=1'),
    Option('eval_every', 0, int, 'k-NN evaluation every N epochs (0: off)', range='>=0'),
    Option('best_metric', None, str, 'keep checkpoint-best.pt of the evaluation with the highest value of this key'),
    Option('device', None, str, 'cpu, cuda, cuda:1 (default: cuda when available)'),
    Option('max_steps', 0, int, 'stop after N optimizer steps; schedules are shortened to N (0: epochs x steps)', range='>=0'),
    Option('stop_after', 0, int, 'simulate a pre-emption: exit after N steps of this run, schedules unchanged', range='>=0'),
    Option('num_threads', 2, int, 'data-loading threads', range='>=1'),
    Option('print_every', 10, int, 'progress line every N steps', range='>=1'),
    Option('drop_path', None, float, 'stochastic depth rate', range='[0,1)'),
    Option('init_values', None, float, 'layer-scale init (0/None: off)', range='[0,inf)'),
    Option('qv_bias', None, bool, 'q/v biases only (BEiT)'),
    Option('use_abs_pos_emb', None, bool, 'absolute position embedding'),
    Option('use_shared_rel_pos_bias', None, bool, 'one relative position bias shared by all layers'),
    Option('use_rel_pos_bias', None, bool, 'one relative position bias per layer'),
    Option('pool', None, str, 'feature pooling for evaluation: cls or mean', choices=('cls', 'mean')),
    Option('crop_scale', None, str, "global crop scale range 'lo,hi'"),
    Option('window_size', None, int, "Swin window size in patches (default: the model's; SimMIM's recipe: 6 at 192 px)"),
    Option('final_knn', True, bool, 'print k-NN of the pre-trained vs a random encoder at the end'),
    Option('knn_k', 20, int, 'k of the k-NN classifier', range='>=1'),
    Option('knn_t', 0.07, float, 'temperature of the k-NN vote', range='(0,inf)'),
)}

GENERAL_FALLBACK = dict(blr=1.5e-4, warmup_epochs=1.0, min_lr=1e-6, weight_decay=0.05, clip_grad=3.0, drop_path=0.0,
                        pool="cls")


def _parse_range(rule: str):
    """``(">=", lo)`` or ``(lo, hi, lo_open, hi_open)`` of a range rule (ValueError when malformed)."""
    if rule.startswith(">="):
        return (">=", int(rule[2:]))
    if rule[0] not in "([" or rule[-1] not in ")]":
        raise ValueError(f"range {rule!r}: expected '>=N' or an interval such as '(0,1]'")
    lo, hi = (float(x) for x in rule[1:-1].split(","))
    return (lo, hi, rule[0] == "(", rule[-1] == ")")


def method_option_groups() -> list[tuple[str, list[Option]]]:
    """``[(method name, the options it declares first)]`` over every registered method (built-ins imported),
    pre-training methods first; an option several methods declare must be declared identically."""
    from engine.methods import registered_methods

    seen: dict[str, tuple[Option, str]] = {}
    groups = []
    for cls in registered_methods():
        own = []
        for opt in cls.options:
            if not isinstance(opt, Option):
                raise TypeError(f"method {cls.name!r}: options must be engine.trainer.config.Option, got {opt!r}")
            if opt.name in SPEC:
                raise ValueError(f"method {cls.name!r} declares option {opt.name!r}, an engine-wide key")
            if opt.name in seen:
                if seen[opt.name][0] != opt:
                    raise ValueError(f"option {opt.name!r} is declared differently by methods "
                                     f"{seen[opt.name][1]!r} and {cls.name!r}")
                continue
            if opt.range is not None:
                _parse_range(opt.range)
            seen[opt.name] = (opt, cls.name)
            own.append(opt)
        if own:
            groups.append((cls.name, own))
    return groups


def all_options() -> dict[str, Option]:
    """Every key a configuration may hold: :data:`SPEC` and the options of every registered method."""
    out = dict(SPEC)
    for _, opts in method_option_groups():
        out.update({o.name: o for o in opts})
    return out


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def help_defaults(options: dict[str, Option] | None = None) -> dict:
    """Defaults as a bare ``python -m engine.pretrain`` sees them: the options' < the default preset's top level."""
    options = all_options() if options is None else options
    out = {k: o.default for k, o in options.items()}
    try:
        with open(DEFAULT_PRESET) as fh:
            preset = yaml.safe_load(fh) or {}
        out.update({k: v for k, v in preset.items() if k in options and not isinstance(v, dict)})
    except (OSError, yaml.YAMLError):
        pass
    return out


def _add_flag(parser, opt: Option, shown) -> None:
    h = f"{opt.help} (default: {shown})"
    if opt.type is bool:
        parser.add_argument(_flag(opt.name), action=argparse.BooleanOptionalAction, help=h)
    elif opt.name == "resume":
        parser.add_argument(_flag(opt.name), nargs="?", const="auto", help=h)
    else:
        parser.add_argument(_flag(opt.name), type=opt.type, help=h)


def build_parser(prog: str = "python -m engine.pretrain") -> argparse.ArgumentParser:
    """The flags of every option: :data:`SPEC`, then one group per method with the options it declares."""
    p = argparse.ArgumentParser(prog=prog, description="Self-supervised pre-training of a vision backbone.",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help=f"YAML preset (name in {CONFIG_DIR} or a path); default: default.yaml")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration and exit")
    groups = method_option_groups()
    shown = help_defaults({**SPEC, **{o.name: o for _, opts in groups for o in opts}})
    from engine.methods import available_methods

    for key, opt in SPEC.items():
        if key == "method":  # the methods registered in this process
            opt = opt._replace(help=f"pre-training method: {', '.join(available_methods())} (dvae, vqkd: tokenizers)")
        _add_flag(p, opt, shown[key])
    for name, opts in groups:
        group = p.add_argument_group(f"options of --method {name}")
        for opt in opts:
            _add_flag(group, opt, shown[opt.name])
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


def _coerce(key: str, value, where: str, options: dict[str, Option]):
    """``value`` of ``key`` in its option's type, or a ConfigError naming the key and where it came from."""
    default, typ = options[key].default, options[key].type
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


def known_models() -> list[str]:
    """Every backbone name ``--model`` accepts (ViT, Swin, ResNet, ConvNeXt), for per-model preset sections."""
    from engine.models.convnext import CONVNEXT_CONFIGS
    from engine.models.resnet import RESNET_CONFIGS
    from engine.models.swin import swin_model_names
    from engine.models.vit import model_names

    return [*model_names(), *swin_model_names(), *RESNET_CONFIGS, *CONVNEXT_CONFIGS]


def resolve(cli: dict, method_defaults_fn=None, known_methods=None) -> dict:
    """Merge defaults, method defaults, preset and CLI values (CLI keys present only when given); every key
    is checked (unknown keys and sections, types, ranges) and its source recorded in ``cfg["_sources"]``.
    The keys are those of :func:`all_options` (engine-wide and every registered method's)."""
    if known_methods is None:
        from engine.methods import available_methods

        known_methods = available_methods()
    options = all_options()
    preset, preset_path = load_preset(cli.get("config"))
    cfg = {k: o.default for k, o in options.items()}
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
            sec_method, dot, sec_model = k.partition(".")
            if sec_method not in known_methods:
                hint = _did_you_mean(sec_method, known_methods) or (f" ({k!r} is an option, not a section)"
                                                                     if k in options else "")
                raise ConfigError(f"--config {preset_path}: unknown section {k!r}{hint}; sections are method "
                                  f"names ({', '.join(known_methods)}) or method.model (e.g. simmim.swin_pico)")
            if dot:
                models = known_models()
                if sec_model not in models:
                    raise ConfigError(f"--config {preset_path}: section {k!r}: unknown model {sec_model!r}"
                                      f"{_did_you_mean(sec_model, models)}; models: {', '.join(models)}")
            sections[k] = v
        elif k not in options:
            raise ConfigError(f"--config {preset_path}: unknown key {k!r}{_did_you_mean(k, options)}")
    for sec, values in sections.items():
        for k in values:
            if k not in options or k == "method":
                raise ConfigError(f"--config {preset_path}: unknown key {k!r} in section {sec!r}"
                                  f"{_did_you_mean(k, options)}")
    for k, v in preset.items():
        if k not in sections:
            cfg[k] = _coerce(k, v, f"--config {preset_path}: ", options)
            sources[k] = f"preset {preset_path.name}"
    for k, v in sections.get(method, {}).items():
        cfg[k] = _coerce(k, v, f"--config {preset_path}: {method}.", options)
        sources[k] = f"preset {preset_path.name} ({method}:)"
    model = cli.get("model", cfg.get("model"))
    for k, v in sections.get(f"{method}.{model}", {}).items():
        if k == "model":
            raise ConfigError(f"--config {preset_path}: section '{method}.{model}' may not set 'model'")
        cfg[k] = _coerce(k, v, f"--config {preset_path}: {method}.{model}.", options)
        sources[k] = f"preset {preset_path.name} ({method}.{model}:)"
    for k, v in cli.items():
        if k in ("config", "print_config"):
            continue
        if k not in options:
            raise ConfigError(f"unknown option {k!r}{_did_you_mean(k, options)}")
        cfg[k] = _coerce(k, v, "", options)
        sources[k] = "command line"
    cfg["method"] = method
    cfg["config"] = cli.get("config") or str(DEFAULT_PRESET.name)
    if cfg.get("weight_decay_end") is None:
        cfg["weight_decay_end"] = cfg["weight_decay"]
        sources["weight_decay_end"] = "= weight_decay"
    validate(cfg, options)
    cfg["_sources"] = sources
    return cfg


def _check_range(key: str, value, rule: str | None) -> None:
    if rule is None or value is None:
        return
    parsed = _parse_range(rule)
    if parsed[0] == ">=":
        lo = parsed[1]
        if value < lo:
            raise ConfigError(f"{_flag(key)} must be an integer >= {lo}, got {value!r}")
        return
    lo, hi, lo_open, hi_open = parsed
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ConfigError(f"{_flag(key)} must be in {rule.replace('inf', '∞')}, got {value!r}")


def validate(cfg: dict, options: dict[str, Option] | None = None) -> None:
    options = all_options() if options is None else options
    for key, value in cfg.items():
        if key in options:
            _check_range(key, value, options[key].range)
    for key, opt in options.items():
        if opt.choices and cfg.get(key) is not None and cfg[key] not in opt.choices:
            raise ConfigError(f"{_flag(key)} must be {', '.join(opt.choices)}, got {cfg[key]!r}")
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
