"""Measure every method's CPU preset: k-NN top-1 of the pre-trained encoder, of the same encoder at random init
and of raw pixels (the floor), over seeds, with wall and CPU minutes.

    python tools/measure_presets.py [--seeds 0 1] [--methods simmim dino beit beitv2 spark] [--out out/measure]
                                    [--data DIR] [--threads 2] [--extra="--epochs 40 --mask-patch-size 8"]

Each run is ``python -m engine.pretrain --method M --seed S`` (the ``M:`` section of
engine/configs/default.yaml; BEiT after ``--method dvae``, BEiT v2 after ``--method vqkd`` whose teacher is
the DINO run of the same seed when there is one), one job at a time; its last line
``knn_top1 pretrained=.. random_init=..`` is recorded in ``OUT/results.json`` as soon as it ends, so an
interrupted measurement continues where it stopped (``--redo`` runs everything again). Minutes are the wall
time of the run(s) and their CPU time (user + sys of the child processes) / 60 -- on a shared machine the CPU
time is the steadier figure; on 2 dedicated cores the wall time is about CPU / (1.6-1.9).
``--extra`` appends command-line flags to every method run (not to the tokenizer runs), to measure a candidate
setting against the preset with the same protocol. ``--table`` prints the markdown table of what is recorded.
``--probe`` (after the runs) adds, for every recorded run, extra numbers on the saved encoder and its random init
(seed + 1000, as the final line): the linear probe of ``engine.eval`` on the final features, and for ViTs the
k-NN on the mean-pooled tokens of every block passed through the encoder's final norm (the last block's is the
final line's feature; middle blocks as the linear probes of iGPT/BEiT). They are extra numbers: the k-NN line of
the run stays the headline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KNN = re.compile(r"knn_top1 pretrained=([\d.]+) random_init=([\d.]+)")
# method -> the tokenizer run it needs first
TOKENIZER = {"beit": "dvae", "beitv2": "vqkd"}
NAMES = {"simmim": "SimMIM", "dino": "DINO", "beit": "BEiT (+ dVAE)", "beitv2": "BEiT v2 (+ VQ-KD)", "spark": "SparK"}


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(args: list[str], log: Path, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
    t0, c0 = time.perf_counter(), _cpu_children()
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "engine.pretrain", *args], cwd=REPO, env=env, stdout=fh,
                              stderr=subprocess.STDOUT, check=False)
    out = {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu_children() - c0, "rc": proc.returncode,
           "log": str(log)}
    m = KNN.findall(log.read_text(errors="replace"))
    if m:
        out["pretrained"], out["random_init"] = float(m[-1][0]), float(m[-1][1])
    return out


def measure(method: str, seed: int, out: Path, data: str | None, threads: int, results: dict,
            extra_args: list[str] = ()) -> dict:
    common = ["--seed", str(seed), "--overwrite"] + (["--data", data] if data else [])
    rec = {"method": method, "seed": seed, "wall_s": 0.0, "cpu_s": 0.0}
    extra: list[str] = []
    tok = TOKENIZER.get(method)
    if tok is not None:
        tdir = out / f"{tok}-s{seed}"
        targs = ["--method", tok, "--output-dir", str(tdir), "--no-final-knn"] + common
        dino = results.get(f"dino-s{seed}")
        if tok == "vqkd" and dino and dino.get("rc") == 0:
            targs += ["--teacher", str(out / f"dino-s{seed}")]
            rec["teacher"] = f"dino-s{seed}"
        t = run(targs, out / f"{tok}-s{seed}.log", threads)
        rec["tokenizer"] = t
        rec["wall_s"] += t["wall_s"]
        rec["cpu_s"] += t["cpu_s"]
        if t["rc"] != 0:
            rec["rc"] = t["rc"]
            return rec
        extra = ["--tokenizer", str(tdir)]
    r = run(["--method", method, "--output-dir", str(out / f"{method}-s{seed}")] + extra + common + list(extra_args),
            out / f"{method}-s{seed}.log", threads)
    rec.update({k: v for k, v in r.items() if k not in ("wall_s", "cpu_s")})
    rec["wall_s"] += r["wall_s"]
    rec["cpu_s"] += r["cpu_s"]
    return rec


def probe(run_dir: Path, data: str | None, threads: int = 2) -> dict:
    """Extra numbers for one run (see ``--probe``): ``{"pretrained": {...}, "random_init": {...}}``."""
    import torch

    sys.path.insert(0, str(REPO))
    from engine.data import build_eval_loader, builtin_dataset
    from engine.eval import encoder_from_checkpoint, knn_classify, linear_probe, load_checkpoint, random_encoder_like

    torch.set_num_threads(threads)
    state = load_checkpoint(run_dir)
    enc, cfg = encoder_from_checkpoint(state)
    rnd = random_encoder_like(cfg, seed=int(cfg.get("seed") or 0) + 1000)
    root = data or cfg.get("data") or builtin_dataset(image_size=int(cfg["image_size"]))
    size = int(cfg["image_size"])

    @torch.no_grad()
    def feats(e, split):
        e.eval()
        depth = getattr(e, "depth", None)
        out: dict[str, list] = {}
        labels = []
        for b in build_eval_loader(str(root), split=split, batch_size=256, image_size=size, num_threads=threads,
                                   device="cpu"):
            x = b["images"]
            out.setdefault("final", []).append(e(x, pool="mean").float())
            if isinstance(depth, int) and hasattr(e, "norm"):
                _, layers = e.forward_features(x, return_layers=list(range(depth)))
                for i, t in enumerate(layers):
                    out.setdefault(f"block{i + 1}", []).append(e.norm(t)[:, 1:].mean(1).float())
            labels.append(torch.as_tensor(b["labels"]).long())
        return {k: torch.cat(v) for k, v in out.items()}, torch.cat(labels)

    res = {}
    for name, e in (("pretrained", enc), ("random_init", rnd)):
        (tr, trl), (te, tel) = feats(e, "train"), feats(e, "val")
        r = {f"knn_{k}": knn_classify(tr[k], trl, te[k], tel, k=int(cfg.get("knn_k") or 20),
                                      temperature=float(cfg.get("knn_t") or 0.07))["knn_top1"] for k in tr}
        r["linear_final"] = linear_probe(tr["final"], trl, te["final"], tel)["linear_top1"]
        res[name] = r
    return res


def probe_table(results: dict, methods: list[str]) -> str:
    lines = []
    for m in methods:
        runs = [(k, r) for k, r in sorted(results.items()) if k.startswith(f"{m}-s") and "probe" in r]
        if not runs:
            continue
        keys = list(runs[0][1]["probe"]["pretrained"])
        lines += [f"| {NAMES.get(m, m)} | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for k, r in runs:
            pr, rn = r["probe"]["pretrained"], r["probe"]["random_init"]
            lines.append(f"| {k} | " + " | ".join(f"{pr[c]:.1f}/{rn[c]:.1f}" for c in keys) + " |")
    return "\n".join(lines)


def _mean_spread(vals: list[float]) -> str:
    if not vals:
        return "-"
    m = sum(vals) / len(vals)
    half = (max(vals) - min(vals)) / 2
    return f"{m:.1f} ± {half:.1f}"


def table(results: dict, methods: list[str]) -> str:
    pix = results.get("raw_pixels", {}).get("knn_top1")
    lines = ["| method (CPU preset) | k-NN pre-trained | k-NN random init | gain | raw pixels | seeds | minutes wall "
             "(CPU-min) per run |", "|---|---|---|---|---|---|---|"]
    for m in methods:
        runs = [r for k, r in sorted(results.items()) if k.startswith(f"{m}-s") and "pretrained" in r]
        if not runs:
            continue
        pre = [r["pretrained"] for r in runs]
        rnd = [r["random_init"] for r in runs]
        gain = [a - b for a, b in zip(pre, rnd)]
        wall = sum(r["wall_s"] for r in runs) / len(runs) / 60
        cpu = sum(r["cpu_s"] for r in runs) / len(runs) / 60
        seeds = ", ".join(f"{r['pretrained']:.1f}/{r['random_init']:.1f}" for r in runs)
        lines.append(f"| {NAMES.get(m, m)} | {_mean_spread(pre)} | {_mean_spread(rnd)} | {_mean_spread(gain)} | "
                     f"{pix:.1f} | {seeds} | {wall:.1f} ({cpu:.1f}) |" if pix is not None else
                     f"| {NAMES.get(m, m)} | {_mean_spread(pre)} | {_mean_spread(rnd)} | {_mean_spread(gain)} | - | "
                     f"{seeds} | {wall:.1f} ({cpu:.1f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=["simmim", "dino", "beit", "beitv2", "spark"])
    p.add_argument("--out", default="out/measure")
    p.add_argument("--data", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--extra", default="", help="flags appended to every method run, e.g. --extra=\"--epochs 40\"")
    p.add_argument("--redo", action="store_true")
    p.add_argument("--table", action="store_true", help="only print the table of what is recorded")
    p.add_argument("--probe", action="store_true", help="after the runs: linear probe and per-block k-NN of each run "
                   "(pretrained/random), recorded as 'probe'")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_file = out / "results.json"
    results = json.loads(res_file.read_text()) if res_file.is_file() and not args.redo else {}

    def save():
        res_file.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")

    if args.table:
        print(probe_table(results, args.methods))
        print(table(results, args.methods))
        return 0
    if "raw_pixels" not in results:
        sys.path.insert(0, str(REPO))
        from engine.eval_pixels import raw_pixel_knn

        if args.data:
            data = args.data
        else:
            from engine.data import builtin_dataset

            data = builtin_dataset(image_size=32)
        results["raw_pixels"] = raw_pixel_knn(data, 32)
        save()
    order = sorted(args.methods, key=lambda m: m != "dino")  # DINO first: VQ-KD's teacher
    for seed in args.seeds:
        for m in order:
            key = f"{m}-s{seed}"
            if key in results and results[key].get("rc") == 0 and "pretrained" in results[key]:
                continue
            print(f"running {key} ...", flush=True)
            results[key] = measure(m, seed, out, args.data, args.threads, results, shlex.split(args.extra))
            results[key]["extra"] = args.extra
            save()
            r = results[key]
            print(f"  {key}: pretrained {r.get('pretrained')} random {r.get('random_init')} rc {r.get('rc')} "
                  f"wall {r['wall_s'] / 60:.1f} min cpu {r['cpu_s'] / 60:.1f} min", flush=True)
    if args.probe:
        for key, r in sorted(results.items()):
            if key.split("-s")[0] in args.methods and r.get("rc") == 0 and "probe" not in r:
                r["probe"] = probe(out / key, args.data, args.threads)
                save()
        print(probe_table(results, args.methods))
    print(table(results, args.methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
