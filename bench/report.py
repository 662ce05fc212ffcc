"""Turn bench JSON (ours, or pytest-benchmark's ``--benchmark-json``) into a markdown table.

    pytest bench/ --benchmark-only --save-results          # merges into bench/results/<device>.{json,md}
    pytest bench/ --benchmark-only --results-dir OUT       # the same two files in OUT
    python -m bench.report FILE.json [--out X.md] [--plots-tar plots.tar]

With ``--save-results`` bench/conftest.py merges each run into ``bench/results/<device>.json`` (rows keyed by
kernel, shape, dtype, provider) and renders ``bench/results/<device>.md`` from it, so a partial run updates
only its own rows; without it a bench run writes nothing into the repository.

Rows are grouped by (kernel, shape, dtype); each provider's median is a column; ratios are given vs
the ``reference`` provider (or the reference time recorded in extra_info) and vs the fastest peer.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re

OURS = ("ours", "native", "triton", "cpp", "cuda", "dali")
FLOORS = ("three-gemms",)  # lower bounds shown beside the peers, not counted as the fastest peer
RESULTS = pathlib.Path(__file__).parent / "results"


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def load_rows(path: pathlib.Path):
    return rows_from_json(json.loads(path.read_text()))


def _key(b) -> tuple:
    info = b.get("extra_info", {})
    return (info.get("kernel"), info.get("shape"), info.get("dtype"), info.get("provider"))


def merge_into(path: pathlib.Path, data: dict) -> dict:
    """Merge a run's benchmarks into the per-device JSON at ``path``: rows of this run replace rows with the
    same (kernel, shape, dtype, provider); rows this run did not touch are kept."""
    fresh = [b for b in data.get("benchmarks", []) if "kernel" in b.get("extra_info", {})]
    old = json.loads(path.read_text()) if path.exists() else {"benchmarks": []}
    keys = {_key(b) for b in fresh}
    merged = dict(data)
    merged["benchmarks"] = [b for b in old["benchmarks"] if _key(b) not in keys] + fresh
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    tmp.replace(path)
    return merged


def device_slug(meta: dict) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(meta.get("device", "unknown")).lower().split("(")[0]).strip("-")


def rows_from_json(data: dict):
    groups: dict[tuple, dict] = collections.OrderedDict()
    meta = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "kernel" not in info:
            continue
        key = (info["kernel"], info.get("shape", ""), info.get("dtype") or "")
        g = groups.setdefault(key, {"providers": {}, "reference_extra": None, "extra": {}, "peak": {}, "call": {},
                                    "graph": {}, "notes": {}})
        g["providers"][info["provider"]] = b["stats"]["median"]
        if info.get("kernel_s") is not None and info.get("call_s") is not None:  # CUDA rows: end-to-end call
            g["call"][info["provider"]] = info["call_s"]
        if info.get("graph_s") is not None:
            g["graph"][info["provider"]] = info["graph_s"]
        if info.get("note"):
            g["notes"][info["provider"]] = info["note"]
        if info.get("peak_memory_bytes") is not None:  # bench.conftest.peak_memory of this provider's call
            g["peak"][info["provider"]] = info["peak_memory_bytes"]
        if info.get("reference_median_s") is not None:
            g["reference_extra"] = info["reference_median_s"]
        for k in ("achieved_GBps", "achieved_TFLOPs", "bytes_moved", "flops", "fraction_of_bandwidth",
                  "fraction_of_gemm_peak", "images_per_call"):
            if info.get(k) is not None and info["provider"] in OURS:
                g["extra"][k] = info[k]
        meta = {k: info.get(k) for k in ("device", "torch", "triton", "python")}
        meta["timing"] = info.get("timing") or meta.get("timing")
    meta["date"] = data.get("datetime", "")
    return groups, meta


def render(groups, meta) -> str:
    lines = [
        f"# Benchmark results: {meta.get('device')}",
        "",
        f"torch {meta.get('torch')}, triton {meta.get('triton')}, python {meta.get('python')}; run {meta.get('date')}.",
        "Medians from pytest-benchmark. `vs ref` = reference time / ours (higher is better); "
        "`vs peer` = fastest peer time / ours. Variants of ours (other thread counts, modes) follow the first time.",
        "`achieved` = bytes moved or FLOPs over our median, and its fraction of the copy bandwidth / large-GEMM rate "
        "measured in the same run; images/s for end-to-end steps; `peak` = CUDA allocator peak of one call (above "
        "the inputs for kernels, whole step for training steps), the reference's in brackets.",
        _timing_note(meta),
        "",
        "| kernel | shape | dtype | ours | ours end-to-end | reference | peers | vs ref | vs peer | achieved |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for (kernel, shape, dtype), g in groups.items():
        prov = g["providers"]
        ours_name = next((p for p in OURS if p in prov), None)
        ours = prov.get(ours_name) if ours_name else None
        ref = prov.get("reference", g["reference_extra"])
        variants = {p: t for p, t in prov.items() if p != ours_name and p.split("-")[0] in OURS}
        peers = {p: t for p, t in prov.items() if p.split("-")[0] not in OURS and p != "reference"}
        rivals = [t for p, t in peers.items() if p not in FLOORS]
        best_peer = min(rivals) if rivals else None
        vs_ref = f"{ref / ours:.2f}x" if ours and ref else "-"
        vs_peer = f"{best_peer / ours:.2f}x" if ours and best_peer else "-"
        peer_txt = ", ".join(f"{p} {_fmt_time(t)}" for p, t in peers.items()) or "-"
        ours_txt = ", ".join([_fmt_time(ours)] + [f"{p} {_fmt_time(t)}" for p, t in variants.items()])
        ach = []
        ex = g["extra"]
        if "achieved_GBps" in ex:
            frac = f" ({100 * ex['fraction_of_bandwidth']:.0f}% of copy)" if "fraction_of_bandwidth" in ex else ""
            ach.append(f"{ex['achieved_GBps']:.1f} GB/s{frac}")
        if "achieved_TFLOPs" in ex:
            frac = f" ({100 * ex['fraction_of_gemm_peak']:.0f}% of GEMM)" if "fraction_of_gemm_peak" in ex else ""
            ach.append(f"{ex['achieved_TFLOPs']:.2f} TFLOP/s{frac}")
        if "images_per_call" in ex and ours:
            ach.append(f"{ex['images_per_call'] / ours:.0f} img/s")
        peak = g.get("peak", {})
        if ours_name in peak:
            ref_peak = f" (ref {peak['reference'] / 2**20:.0f} MiB)" if "reference" in peak else ""
            ach.append(f"peak {peak[ours_name] / 2**20:.0f} MiB{ref_peak}")
        e2e = []
        if ours_name in g.get("call", {}):
            e2e.append(f"call {_fmt_time(g['call'][ours_name])}")
        if ours_name in g.get("graph", {}):
            e2e.append(f"graph {_fmt_time(g['graph'][ours_name])}")
        lines.append(
            f"| {kernel} | {shape} | {dtype} | {ours_txt} | {', '.join(e2e) or '-'} | {_fmt_time(ref)} | {peer_txt} | "
            f"{vs_ref} | {vs_peer} | {', '.join(ach) or '-'} |"
        )
        for p, note in g.get("notes", {}).items():
            notes.append(f"* {kernel} {shape} {dtype}, {p}: {note}")
    from bench import targets

    text = "\n".join(lines) + "\n"
    if notes:
        text += "\nNotes on the peers:\n\n" + "\n".join(dict.fromkeys(notes)) + "\n"
    return text + "\n" + targets.render(groups, meta, OURS)


def _timing_note(meta) -> str:
    if str(meta.get("device", "")).lower().startswith("cpu"):
        return "CPU rows: wall-clock medians of synchronous calls (`ours end-to-end` is the same there)."
    return ("CUDA rows: `ours`, reference and peers are device times (CUDA events over many calls after warm-up, L2 "
            "flushed before each call, as `triton.testing.do_bench`); `ours end-to-end` is one synchronous call as a "
            "Python caller sees it (`call`) and, for launch-bound calls, the CUDA-graph replay time (`graph`).")


def plot(groups, meta, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """One PNG per kernel: median time (log scale) per shape, one bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_kernel: dict[str, list] = collections.OrderedDict()
    for (kernel, shape, dtype), g in groups.items():
        by_kernel.setdefault(kernel, []).append((f"{shape} {dtype}".strip(), g["providers"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kernel, rows in by_kernel.items():
        providers = sorted({p for _, prov in rows for p in prov}, key=lambda p: (p.split("-")[0] not in OURS, p))
        fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(rows) + 2), 3.2))
        width = 0.8 / max(1, len(providers))
        for i, provider in enumerate(providers):
            xs = [j + i * width for j, (_, prov) in enumerate(rows) if provider in prov]
            ys = [prov[provider] * 1e3 for _, prov in rows if provider in prov]
            ax.bar(xs, ys, width=width, label=provider)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
        ax.set_xticklabels([label for label, _ in rows], rotation=20, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{kernel} on {meta.get('device')}", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{re.sub(r'[^a-z0-9_]+', '-', kernel.lower())}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(groups, meta, md_path: pathlib.Path, plots: bool = True) -> list[pathlib.Path]:
    """The markdown table and, next to it in ``<stem>-plots/``, one PNG per kernel (linked from the table)."""
    text = render(groups, meta)
    written = [md_path]
    if plots:
        try:
            pngs = plot(groups, meta, md_path.parent / f"{md_path.stem}-plots")
        except ImportError:  # matplotlib missing: the table alone
            pngs = []
        if pngs:
            text += "\n## Plots\n\n" + "\n".join(f"![{p.stem}]({p.parent.name}/{p.name})" for p in pngs) + "\n"
            written += pngs
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=pathlib.Path, help="pytest-benchmark --benchmark-json output")
    p.add_argument("--out", type=pathlib.Path, default=None, help="markdown file (default bench/results/<device>.md)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--plots-tar", type=pathlib.Path, default=None,
                   help="also pack the plots into this .tar (one file instead of a folder of PNGs)")
    args = p.parse_args(argv)
    groups, meta = load_rows(args.json)
    if not groups:
        raise SystemExit(f"{args.json}: no benchmark carries extra_info['kernel']; was it written by bench/?")
    out = args.out
    if out is None:
        out = RESULTS / f"{device_slug(meta)}.md"
    written = write_report(groups, meta, out, plots=not args.no_plots)
    for path in written:
        print(path)
    pngs = [w for w in written if w.suffix == ".png"]
    if args.plots_tar is not None and pngs:
        import tarfile

        with tarfile.open(args.plots_tar, "w") as tar:
            for png in pngs:
                tar.add(png, arcname=f"{png.parent.name}/{png.name}")
        print(args.plots_tar)


if __name__ == "__main__":
    main()
