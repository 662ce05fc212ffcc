"""Evaluation of a frozen encoder: weighted k-NN and linear probing on pooled features.

k-NN (DINO protocol): features l2-normalised; for a test feature ``q`` the k most similar training
features ``x_i`` (cosine ``s_i``) vote for their labels with weight ``exp(s_i / T)``; the class with the
largest summed weight wins (k = 20, T = 0.07).

Linear probe: a linear classifier on frozen, standardised features (train-set mean/std), SGD with momentum
0.9, cosine learning rate, cross-entropy; reports top-1 on the evaluation split.

CLI::

    python -m engine.eval knn    --checkpoint PATH [--data DIR] [--pool cls|mean] [--k 20] [--temperature 0.07]
    python -m engine.eval linear --checkpoint PATH [--data DIR] [--epochs 100] [--lr 0.1]
    python -m engine.eval all    --checkpoint PATH [PATH ...]      # both, one table row per checkpoint

``all`` also shows ``finetune_top1`` (and ``finetune_top1_ema``) when the checkpoint's eval.json holds a fine-tuning result (written by
``python -m engine.finetune --checkpoint PATH``).

Each result is also merged into ``eval.json`` next to the checkpoint (key ``pretrained/<pool>`` or
``random_init/<pool>``), unless ``--no-save``.

``--checkpoint`` is a file written by ``engine.pretrain`` (or its output folder). ``--random-init`` evaluates
a randomly initialised encoder of the same architecture instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


# -------------------------------------------------------------------------------------------- features
@torch.no_grad()
def extract_features(encoder: nn.Module, loader, device: torch.device | str = "cpu", pool: str | None = None):
    """Pooled features ``[N, D]`` (float32, on CPU) and labels ``[N]`` of every batch of ``loader``."""
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for batch in loader:
        x = batch["images"].to(device, non_blocking=True)
        f = encoder(x, pool=pool) if pool is not None else encoder(x)
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(batch["labels"]).long().cpu())
    encoder.train(was_training)
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 512) -> dict[str, float]:
    """Weighted k-NN top-1/top-5 accuracy in percent (cosine similarity, weights exp(s/T))."""
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features: expected [N, D] and [M, D], got {tuple(train_feats.shape)} and "
                         f"{tuple(test_feats.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    num_classes = int(num_classes or int(max(train_labels.max(), test_labels.max())) + 1)
    k = min(k, train_feats.shape[0])
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    top1 = top5 = 0
    for start in range(0, test.shape[0], chunk):
        q = test[start:start + chunk]
        sim, idx = (q @ train.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        pred = votes.argsort(dim=1, descending=True)
        truth = test_labels[start:start + chunk].unsqueeze(1)
        top1 += int((pred[:, :1] == truth).sum())
        top5 += int((pred[:, : min(5, num_classes)] == truth).any(dim=1).sum())
    n = test.shape[0]
    return {"knn_top1": 100.0 * top1 / n, "knn_top5": 100.0 * top5 / n}


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, epochs: int = 100, lr: float = 0.1, batch_size: int = 256,
                 weight_decay: float = 0.0, seed: int = 0, num_classes: int | None = None) -> dict[str, float]:
    """Top-1 (percent) of a linear classifier trained on frozen standardised features."""
    num_classes = int(num_classes or int(max(train_labels.max(), test_labels.max())) + 1)
    mean, std = train_feats.mean(0, keepdim=True), train_feats.std(0, keepdim=True).clamp_min(1e-6)
    xtr, xte = (train_feats - mean) / std, (test_feats - mean) / std
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(xtr.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-xtr.shape[0] // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for _ in range(epochs):
        perm = torch.randperm(xtr.shape[0], generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            loss = F.cross_entropy(head(xtr[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        acc = (head(xte).argmax(1) == test_labels).float().mean().item() * 100.0
    return {"linear_top1": acc}


# -------------------------------------------------------------------------------------------- data + models
def feature_sets(encoder: nn.Module, data_dir, image_size: int, device="cpu", pool: str | None = None,
                 batch_size: int = 128, num_threads: int = 2, train_split: str = "train", test_split: str = "val"):
    from engine.data import build_eval_loader

    out = []
    for split in (train_split, test_split):
        loader = build_eval_loader(str(data_dir), split=split, batch_size=batch_size, image_size=image_size,
                                   num_threads=num_threads, device=_loader_device(device))
        out.append(extract_features(encoder, loader, device, pool))
    return out[0][0], out[0][1], out[1][0], out[1][1]


def _loader_device(device) -> str:
    """The loader's device string, keeping a CUDA index (``cuda:1`` decodes on GPU 1, not the current one)."""
    dev = torch.device(device)
    return str(dev) if dev.type == "cuda" else "cpu"


def knn_eval(encoder: nn.Module, data_dir, image_size: int, device="cpu", pool: str | None = None, k: int = 20,
             temperature: float = 0.07, batch_size: int = 128, num_threads: int = 2) -> dict[str, float]:
    trf, trl, tef, tel = feature_sets(encoder, data_dir, image_size, device, pool, batch_size, num_threads)
    return knn_classify(trf, trl, tef, tel, k=k, temperature=temperature)


def load_checkpoint(path: str | Path, check_finite: bool = True) -> dict:
    """A pre-training checkpoint (file or output folder), checksum-verified; with ``check_finite`` its
    weights must be finite. Raises FileNotFoundError, or CheckpointError (one line naming the file)."""
    from engine.trainer import checkpoint as ckpt

    path = Path(path)
    if path.is_dir():
        path = path / ckpt.LAST
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: no checkpoint at {path}")
    try:
        state = ckpt.load(path)
    except ckpt.CheckpointError as exc:
        raise ckpt.CheckpointError(f"--checkpoint {exc}") from None
    if "config" not in state or "model" not in state:
        raise ckpt.CheckpointError(f"--checkpoint {path}: not a checkpoint of engine.pretrain (no 'config'/'model' "
                                   "entries)")
    if check_finite:
        try:
            ckpt.check_finite(state, path)
        except ckpt.CheckpointError as exc:
            raise ckpt.CheckpointError(f"--checkpoint {exc}") from None
    return state


def encoder_from_checkpoint(state: dict, random_init: bool = False, seed: int = 0) -> tuple[nn.Module, dict]:
    """Rebuild the method of a pre-training checkpoint, load its weights, return ``(encoder, config)``."""
    from engine.methods import build_method

    cfg = state["config"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        method = build_method(cfg["method"], cfg)
    if not random_init:
        method.load_state_dict(state["model"])
    return method.encoder(), cfg


def random_encoder_like(cfg: dict, seed: int = 12345) -> nn.Module:
    """A freshly initialised encoder of the same method/architecture (global RNG untouched)."""
    from engine.methods import build_method

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_method(cfg["method"], cfg).encoder()


# -------------------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m engine.eval", description="k-NN / linear-probe evaluation of a pre-trained encoder")
    sub = p.add_subparsers(dest="protocol", required=True, parser_class=_Parser)
    for name in ("knn", "linear", "all"):
        s = sub.add_parser(name, help={"all": "k-NN and linear probe, one table"}.get(name))
        s.add_argument("--checkpoint", required=True, nargs="+",
                       help="checkpoint file(s) or output folder(s) of engine.pretrain")
        s.add_argument("--data", help="image folder with train/ and val/ (default: the run's data or built-in)")
        s.add_argument("--pool", choices=("cls", "mean"), help="feature pooling (default: the run's)")
        s.add_argument("--device", default=None)
        s.add_argument("--batch-size", type=int, default=128)
        s.add_argument("--num-threads", type=int, default=2)
        s.add_argument("--random-init", action="store_true", help="evaluate a randomly initialised encoder")
        s.add_argument("--no-save", action="store_true", help="do not write eval.json next to the checkpoint")
        if name in ("knn", "all"):
            s.add_argument("--k", type=int, default=20)
            s.add_argument("--temperature", type=float, default=0.07)
        if name in ("linear", "all"):
            s.add_argument("--epochs", type=int, default=100)
            s.add_argument("--lr", type=float, default=0.1)
            s.add_argument("--weight-decay", type=float, default=0.0)
    return p


def results_file(checkpoint: str | Path) -> Path:
    """``eval.json`` beside the checkpoint (in its output folder)."""
    p = Path(checkpoint)
    return (p if p.is_dir() else p.parent) / "eval.json"


def save_results(checkpoint, key: str, results: dict) -> Path:
    """Merge ``{key: results}`` into the checkpoint's eval.json (atomic rewrite; other keys kept)."""
    import json
    import os

    path = results_file(checkpoint)
    data = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    data[key] = results
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def format_table(rows: list[dict]) -> str:
    """A plain-text table: one row per checkpoint, one column per metric."""
    cols = ["checkpoint"] + sorted({k for r in rows for k in r if k != "checkpoint"})
    cells = [[str(r.get(c, "")) if not isinstance(r.get(c), float) else f"{r[c]:.2f}" for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def finetune_columns(checkpoint, random_init: bool = False) -> dict:
    """The fine-tuning top-1 that ``engine.finetune`` merged into the checkpoint's eval.json (keys
    ``finetune/<preset>``): ``{"finetune_top1": v}``, one ``finetune_top1[<preset>]`` column per preset when
    there are several; ``finetune_top1_ema`` likewise when the run kept a weight EMA; the random-init baseline's
    values for ``--random-init`` rows."""
    import json

    path = results_file(checkpoint)
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        data = {}
    prefix = "random_init" if random_init else "finetune"
    columns = {}
    presets = [k for k, v in data.items() if k.startswith("finetune/") and isinstance(v, dict)]
    for suffix in ("", "_ema"):  # the weight EMA's top-1 (--model-ema) as its own column, when recorded
        field = f"{prefix}_top1{suffix}"
        found = {k.split("/", 1)[1]: v[field] for k, v in sorted(data.items())
                 if k in presets and isinstance(v.get(field), (int, float))}
        if len(found) == 1 and len(presets) == 1:
            columns[f"finetune_top1{suffix}"] = float(next(iter(found.values())))
        else:
            columns.update({f"finetune_top1{suffix}[{name}]": float(v) for name, v in found.items()})
    return columns


def evaluate_checkpoint(args, checkpoint, device, parser) -> dict:
    from engine import exit_codes
    from engine.trainer.checkpoint import CheckpointError

    try:
        state = load_checkpoint(checkpoint)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    except CheckpointError as exc:
        parser.exit(exit_codes.CHECKPOINT, f"{parser.prog}: error: {exc}\n")
    encoder, cfg = encoder_from_checkpoint(state, random_init=args.random_init)
    encoder = encoder.to(device)
    data = args.data or cfg.get("data")
    if data is None:
        from engine.data import builtin_dataset

        data = builtin_dataset(image_size=int(cfg["image_size"]))
    if not Path(data).is_dir():
        parser.error(f"--data: no such folder {data}")
    if not (Path(data) / "val").is_dir():
        parser.error(f"--data {data}: evaluation needs a val/ sub-folder (and train/)")
    pool = args.pool or cfg.get("pool") or "cls"
    try:
        trf, trl, tef, tel = feature_sets(encoder, data, int(cfg["image_size"]), device, pool, args.batch_size,
                                          args.num_threads)
    except (OSError, ValueError) as exc:
        parser.exit(exit_codes.DATA, f"{parser.prog}: error: data: {exc}\n")
    res: dict = {}
    if args.protocol in ("knn", "all"):
        res.update(knn_classify(trf, trl, tef, tel, k=args.k, temperature=args.temperature))
    if args.protocol in ("linear", "all"):
        res.update(linear_probe(trf, trl, tef, tel, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay))
    res["step"] = int(state.get("step", 0))
    if not args.no_save:
        key = ("random_init" if args.random_init else "pretrained") + f"/{pool}"
        old = {}
        f = results_file(checkpoint)
        if f.is_file():
            import json

            try:
                old = json.loads(f.read_text()).get(key, {})
            except ValueError:
                old = {}
        save_results(checkpoint, key, {**old, **res, "data": str(data)})
    return res


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    from engine.trainer.distributed import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    rows = []
    for checkpoint in args.checkpoint:
        res = evaluate_checkpoint(args, checkpoint, device, parser)
        extra = finetune_columns(checkpoint, args.random_init) if args.protocol == "all" else {}
        rows.append({"checkpoint": str(checkpoint), **res, **extra})
        if not args.no_save:
            print(f"results {results_file(checkpoint)}")
    if len(rows) > 1 or args.protocol == "all":
        print(format_table(rows))
    else:  # one line, last: what scripts parse
        print(" ".join(f"{k}={v:.2f}" for k, v in rows[0].items() if isinstance(v, float)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
