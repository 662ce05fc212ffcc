"""``python -m engine.finetune``: fine-tune a pre-trained encoder for classification, as the papers evaluate.

    python -m engine.finetune --checkpoint <engine.pretrain output or .safetensors> --data DIR [--config PRESET]
    python -m engine.finetune --checkpoint ... --init random          # the from-scratch baseline, same model
    python -m engine.finetune                                          # the CPU preset (below)

Presets (``--config``): ``finetune_beit_vit_base``, ``finetune_beitv2_vit_base``, ``finetune_simmim_vit_base``,
``finetune_simmim_swin_base`` (SimMIM Swin-B: 224 px, ``--window-size 7``, layer decay 0.9),
``finetune_spark_resnet50`` (the official recipes; each file lists its sources and deviations), and
``finetune_cpu``, the default: the default pre-training job's checkpoint (``python -m engine.pretrain`` writes
``output/pretrain``) fine-tuned on 10% of the labels of the built-in 32-px digits (a fixed per-class subset,
``--train-fraction``), then the same recipe from a random init (``--compare-random``, on in this preset), 800
steps each with a weight EMA (``--model-ema``) and a checkpoint + evaluation every 50 epochs (279 s for both
runs at load 1.4-3 on the shared 2 cores, 1 torch thread), ending with::

    finetune_top1 pretrained=82.5 random_init=72.1  (EMA: pretrained=82.2 random_init=71.9)     (seed 0)

(final-epoch top-1 on the val split, percent; seeds 1, 2: 76.9 vs 77.4, 76.6 vs 76.3 -- within seed noise; the
preset file lists the measurements and the raw-pixel k-NN floor, 94.4% with the same labels). ``--no-compare-random`` runs only ``--init``; the random-init run
goes to ``<output-dir>/random_init``.

It is a method of the same trainer as pre-training (``--method finetune``, :mod:`engine.methods.finetune`):
the same logging (``log.jsonl``, progress line, TensorBoard), checkpoints, ``--resume`` (exact), ``--overwrite``,
DDP (``torchrun --nproc_per_node N -m engine.finetune ...``), precision, pre-emption (exit 75) and exit codes.
Every epoch (``--eval-every``) the classifier is evaluated on ``val/`` (top-1/top-5, rank 0) and
``checkpoint-best.pt`` + ``best.json`` keep the best top-1. At the end the final and best top-1 are merged into
the *pre-training* checkpoint's ``eval.json`` under ``finetune/<preset>`` (``cpu`` for the CPU preset), where
``python -m engine.eval all --checkpoint <pre-training run>`` shows them as ``finetune_top1``.

Exit status: 0 success, 1 internal error, 2 bad arguments/configuration, 3 stopped on non-finite values,
4 data error, 5 checkpoint error (missing, unreadable, corrupted, not an encoder), 6 a peer rank stopped
answering, 75 pre-empted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from engine import exit_codes as codes
from engine.cli_common import (data_dir_or_exit, fail, find_resume_or_exit, fit_or_exit, one_line_errors,
                               report_preempted, write_run_config)
from engine.trainer.config import ConfigError, build_parser, dump_config, resolve

PROG = "python -m engine.finetune"
DEFAULT_PRESET = "finetune_cpu"
DEFAULT_OUTPUT = "output/finetune"


# ------------------------------------------------------------------------------------------------ evaluation
class Evaluator:
    """Top-1/top-5 (percent) and the cross-entropy of the whole classifier on ``data_dir/val``; the loader is
    built on the first call and reused. Passed to the trainer as ``eval_fn``: the trainer calls
    :meth:`evaluate_model` with the trained method and, with ``--model-ema``, with its EMA copy."""

    def __init__(self, method, data_dir, cfg: dict, device: torch.device):
        self.method, self.data_dir, self.cfg, self.device = method, data_dir, cfg, torch.device(device)
        self.loader = None

    def __call__(self, _encoder=None) -> dict:
        return self.evaluate_model(self.method)

    @torch.no_grad()
    def evaluate_model(self, method) -> dict:
        from engine.data import build_eval_loader
        from engine.eval import _loader_device
        from engine.trainer.loop import PRECISIONS

        if self.loader is None:
            self.loader = build_eval_loader(str(self.data_dir), split="val", batch_size=int(self.cfg["batch_size"]),
                                            image_size=int(self.cfg["image_size"]),
                                            num_threads=int(self.cfg["num_threads"]),
                                            device=_loader_device(self.device))
        was_training = method.training
        method.eval()
        amp = PRECISIONS.get(self.cfg.get("precision", "fp32"))
        top1 = top5 = n = 0
        loss = 0.0
        for batch in self.loader:
            x = batch["images"].to(self.device, non_blocking=True)
            y = torch.as_tensor(batch["labels"]).to(self.device).long()
            if amp is not None:
                with torch.autocast(device_type=self.device.type, dtype=amp):
                    logits = method.classify(x)
            else:
                logits = method.classify(x)
            logits = logits.float()
            loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            k = min(5, logits.shape[1])
            pred = logits.topk(k, dim=1).indices
            top1 += int((pred[:, 0] == y).sum())
            top5 += int((pred == y[:, None]).any(dim=1).sum())
            n += int(y.shape[0])
        method.train(was_training)
        return {"top1": 100.0 * top1 / max(n, 1), "top5": 100.0 * top5 / max(n, 1), "val_loss": loss / max(n, 1)}


# ------------------------------------------------------------------------------------------------ one run
def _preset_key(cfg: dict) -> str:
    name = Path(str(cfg.get("config") or DEFAULT_PRESET)).stem
    return "cpu" if name == DEFAULT_PRESET else name.removeprefix("finetune_")


def _backbone_spec(cfg: dict, source, resume):
    """The architecture to build: the pre-trained encoder's, else the resumed run's, else ``--model``'s."""
    from engine.methods.finetune import kind_of

    if source is not None:
        return source.backbone_spec()
    if resume is not None:
        from engine.trainer import checkpoint as ckpt

        spec = (ckpt.load(resume).get("config") or {}).get("backbone")
        if spec:
            return spec
    return {"kind": kind_of(None, cfg["model"]), "config": None, "source": None, "source_method": None}


def run_one(cfg: dict, source, data_dir: Path, dist, prog: str) -> dict | int:
    """Fine-tune once (``cfg["init"]``: pretrained or random) into ``cfg["output_dir"]``; returns the results
    (``top1`` of the final epoch, ``best_top1``, ...) or the exit status of a pre-emption."""
    from engine.data.finetune_recipe import build_finetune_loader
    from engine.methods import build_method
    from engine.trainer import Trainer, seed_everything

    resume = find_resume_or_exit(cfg, prog)
    seed_everything(cfg["seed"] + dist.rank)
    try:
        loader = build_finetune_loader(data_dir, cfg, shard_id=dist.rank, num_shards=dist.world_size,
                                       device="gpu" if dist.device.type == "cuda" else "cpu")
    except (ValueError, OSError) as exc:
        fail(prog, f"data: {exc}", codes.DATA)
    if cfg.get("num_classes") is None:
        cfg["num_classes"] = loader.num_classes
        cfg["_sources"]["num_classes"] = f"the train folder ({loader.num_classes} classes)"
    elif int(cfg["num_classes"]) < loader.num_classes:
        fail(prog, f"--num-classes {cfg['num_classes']}: the train folder has {loader.num_classes} classes")
    cfg["backbone"] = _backbone_spec(cfg, source, resume)
    cfg["_sources"]["backbone"] = "--checkpoint" if source is not None else "--model"
    seed_everything(cfg["seed"] + dist.rank)  # the model's init does not depend on how the loader was built
    try:
        method = build_method("finetune", cfg)
    except (ValueError, TypeError) as exc:
        fail(prog, f"model: {exc}")
    notes = []
    if cfg["init"] == "pretrained" and resume is None:
        try:
            notes = method.load_pretrained(source.state_dict)
        except ValueError as exc:
            fail(prog, f"--checkpoint {source.path}: {exc}", codes.CHECKPOINT)
    evaluator = None
    if (Path(data_dir) / "val").is_dir():  # every --eval-every epochs (the loop) and once at the end
        evaluator = Evaluator(method, data_dir, cfg, dist.device)
    try:
        trainer = Trainer(method, loader, cfg, dist, eval_fn=evaluator)
    except ValueError as exc:
        fail(prog, str(exc))
    if dist.is_main:
        what = f"{cfg['init']} init" + (f" from {source.path} ({source.method or 'exported'})"
                                        if source is not None and cfg["init"] == "pretrained" else "")
        n_par = sum(p.numel() for p in method.parameters()) / 1e6
        print(f"finetune {what}  backbone {method.kind} ({n_par:.2f}M params, pool {method.pool})  classes "
              f"{method.num_classes}  train images {loader.num_samples}"
              + (f" ({cfg['train_fraction']:g} of each class)" if cfg.get("train_fraction") else "")
              + f"  steps {trainer.total_steps} ({trainer.steps_per_epoch}/epoch)  lr {trainer.lr:.3g}  layer decay "
              f"{method.layer_decay:g}  batch {cfg['batch_size']}x{dist.world_size}x{cfg['accum_steps']}  precision "
              f"{cfg['precision']}  device {dist.device}" + (f"  resume {resume}" if resume else ""), flush=True)
        for note in notes:
            print(f"note: {note}", flush=True)
    write_run_config(cfg, dist)
    summary = fit_or_exit(trainer, cfg, dist, prog, resume)
    if summary.get("preempted"):
        return report_preempted(trainer, summary, dist)
    out = {"steps": int(summary["step"]), "output_dir": str(cfg["output_dir"])}
    if evaluator is not None and dist.is_main:
        last = trainer.last_eval
        final = last[1] if last is not None and last[0] == trainer.step else trainer.evaluate()
        for suffix in ("", "_ema") if trainer.ema is not None else ("",):
            out.update({f"top1{suffix}": final[f"top1{suffix}"], f"top5{suffix}": final[f"top5{suffix}"]})
            best = Path(cfg["output_dir"]) / f"best{suffix}.json"
            if best.is_file():
                try:
                    out[f"best_top1{suffix}"] = float(json.loads(best.read_text())["value"])
                except (ValueError, KeyError):
                    pass
            out.setdefault(f"best_top1{suffix}", final[f"top1{suffix}"])
        ema = (f"; EMA top1 {out['top1_ema']:.2f} (best {out['best_top1_ema']:.2f})" if trainer.ema is not None
               else "")
        print(f"trained {summary['step']}/{summary['total_steps']} steps in {summary['seconds']:.1f}s; "
              f"top1 {out['top1']:.2f} (best {out['best_top1']:.2f}), top5 {out['top5']:.2f}{ema}; checkpoint "
              f"{trainer.last_checkpoint}", flush=True)
    elif dist.is_main:
        print(f"trained {summary['step']}/{summary['total_steps']} steps; checkpoint {trainer.last_checkpoint} "
              f"(no {Path(data_dir) / 'val'}: no top-1)", flush=True)
    return out


def save_finetune_results(source, cfg: dict, results: dict, data_dir) -> Path | None:
    """Merge the run's top-1 into the pre-training checkpoint's ``eval.json`` under ``finetune/<preset>``."""
    from engine.eval import results_file, save_results

    if source is None:
        return None
    key = f"finetune/{_preset_key(cfg)}"
    path = results_file(source.path)
    old = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text()).get(key, {}) or {}
        except ValueError:
            old = {}
    entry = dict(old, data=str(data_dir), train_fraction=cfg.get("train_fraction") or 1.0, seed=int(cfg["seed"]))
    for init, res in results.items():
        if "top1" not in res:
            continue
        name = "finetune" if init == "pretrained" else "random_init"
        entry.update({f"{name}_top1": res["top1"], f"{name}_best_top1": res["best_top1"],
                      f"{name}_steps": res["steps"], f"{name}_output_dir": res["output_dir"]})
        if "top1_ema" in res:
            entry.update({f"{name}_top1_ema": res["top1_ema"], f"{name}_best_top1_ema": res["best_top1_ema"]})
    return save_results(source.path, key, entry)


# ------------------------------------------------------------------------------------------------ main
def build_finetune_parser():
    """``build_parser`` with this command's name and, in ``--help``, the defaults a bare ``python -m
    engine.finetune`` resolves (the options' < the finetune method's defaults < the CPU preset), not
    engine.pretrain's."""
    import re

    from engine.methods.finetune import FineTune
    from engine.trainer.config import all_options, load_preset

    parser = one_line_errors(build_parser(prog=PROG))
    parser.description = __doc__.splitlines()[0].split(": ", 1)[1]
    options = all_options()
    shown = {k: o.default for k, o in options.items()}
    shown.update(FineTune.defaults)
    try:
        preset, _ = load_preset(DEFAULT_PRESET)
        shown.update({k: v for k, v in preset.items() if k in options and not isinstance(v, dict)})
    except ConfigError:
        pass
    for action in parser._actions:
        if action.dest in options and action.help:
            action.help = re.sub(r"\(default: .*\)$", f"(default: {shown[action.dest]})", action.help)
    return parser


def main(argv=None) -> int:
    parser = build_finetune_parser()
    args = vars(parser.parse_args(argv))
    if args.get("method", "finetune") != "finetune":
        fail(PROG, f"--method {args['method']}: {PROG} runs --method finetune; pre-train with python -m "
                   "engine.pretrain")
    args["method"] = "finetune"
    args.setdefault("config", DEFAULT_PRESET)
    from engine.methods import UnknownMethodError, get_method

    try:
        cfg = resolve(args, method_defaults_fn=lambda m: get_method(m).defaults)
    except (ConfigError, UnknownMethodError) as exc:
        fail(PROG, str(exc))
    from engine.data.finetune_recipe import recipe_from_config

    try:
        recipe_from_config(cfg)  # a bad --randaug / augmentation value fails now, as a usage error
    except ValueError as exc:
        fail(PROG, f"--{exc}" if str(exc).startswith("randaug") else str(exc))
    if cfg["_sources"].get("output_dir") == "default":
        cfg["output_dir"], cfg["_sources"]["output_dir"] = DEFAULT_OUTPUT, f"default of {PROG}"
    if args.get("print_config"):
        print(dump_config(cfg), end="")
        return codes.OK
    from engine.methods.finetune import load_source
    from engine.trainer import init_distributed
    from engine.trainer.checkpoint import CheckpointError
    from engine.trainer.distributed import barrier, cleanup

    source = None
    if cfg["checkpoint"]:
        try:
            source = load_source(cfg["checkpoint"])
        except FileNotFoundError as exc:
            hint = ""
            if cfg["_sources"].get("checkpoint", "").startswith("preset"):
                preset = Path(str(cfg["config"])).stem.removeprefix("finetune_")
                hint = ("; run python -m engine.pretrain first (it writes output/pretrain), or give --checkpoint"
                        if preset == "cpu" else f"; the preset expects the run of python -m engine.pretrain --config "
                                                f"{preset} there, or give --checkpoint")
            fail(PROG, f"{exc}{hint}", codes.CHECKPOINT)
        except CheckpointError as exc:
            fail(PROG, str(exc), codes.CHECKPOINT)
    elif cfg["init"] == "pretrained":
        fail(PROG, "--checkpoint: give the pre-trained run (an engine.pretrain output folder or checkpoint, or an "
                   "engine.export .safetensors file), or --init random for the from-scratch baseline")
    try:
        dist = init_distributed(cfg["device"], timeout_s=cfg["dist_timeout"])
    except ValueError as exc:
        fail(PROG, str(exc))
    data_dir = data_dir_or_exit(cfg, dist, PROG)
    runs = [(cfg["init"], cfg["output_dir"])]
    if cfg.get("compare_random") and cfg["init"] == "pretrained":
        runs.append(("random", str(Path(cfg["output_dir"]) / "random_init")))
    results = {}
    for init, out_dir in runs:
        rcfg = dict(cfg, init=init, output_dir=out_dir, _sources=dict(cfg["_sources"]))
        if init != cfg["init"]:
            rcfg["_sources"].update(init="--compare-random", output_dir="--compare-random")
            if cfg["resume"]:
                rcfg["resume"] = "auto"  # continues its own folder's run (a fresh start if it has none)
        res = run_one(rcfg, source, data_dir, dist, PROG)
        if isinstance(res, int):
            return res
        results[init] = res
    if dist.is_main:
        path = save_finetune_results(source, cfg, results, data_dir)
        if path is not None and any("top1" in r for r in results.values()):
            print(f"results {path} (finetune/{_preset_key(cfg)})", flush=True)
        def line(key):
            return " ".join(f"{'pretrained' if init == 'pretrained' else 'random_init'}={res[key]:.1f}"
                            for init, res in results.items() if key in res)

        if line("top1"):
            ema = line("top1_ema")
            print("finetune_top1 " + line("top1") + (f"  (EMA: {ema})" if ema else ""), flush=True)
    barrier()
    cleanup()
    return codes.OK


if __name__ == "__main__":
    sys.exit(main())
