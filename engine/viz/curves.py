"""Training curves from the trainer's JSON-lines log (``output_dir/log.jsonl``, :class:`MetricLogger`).

Each line is one record ``{"step", "epoch", "loss", "lr", "wd", ...}`` per optimizer step, plus evaluation
records (``knn_top1``...) after an epoch. Panels, every run of the picture in its own colour:

* loss per step (the raw values faint; a centred moving average over ``max(1, n // 50)`` steps on top);
* learning rate per step;
* throughput in images/s (raw faint, moving average on top), from a record's ``images_per_s`` (or ``throughput``) when the log has one, else
  optimizer steps/s from consecutive ``time`` stamps (seconds) when records carry them; a log with neither
  says so in the panel;
* evaluation metrics (k-NN / linear top-1) per step, when a run has any.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.viz.common import VizError, plot_figure, save_figure

LOG_NAME = "log.jsonl"
THROUGHPUT_KEYS = ("images_per_s", "throughput")
EVAL_KEYS = ("knn_top1", "linear_top1")


def log_path(source) -> Path:
    """The log of a log file, an output folder, or a checkpoint file (its folder's log)."""
    p = Path(source)
    if p.is_dir():
        p = p / LOG_NAME
    elif p.suffix == ".pt":
        p = p.parent / LOG_NAME
    if not p.is_file():
        raise VizError(f"no training log at {p} (engine.pretrain writes {LOG_NAME} next to its checkpoints)")
    return p


def read_log(source) -> list[dict]:
    """The records of a JSON-lines log. A truncated last line (a run killed mid-write) is ignored; any other
    bad line raises :class:`VizError` naming the file and line."""
    path = log_path(source)
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines):
                break
            raise VizError(f"{path}:{i}: not a JSON record ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise VizError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    if not any("loss" in r for r in records):
        raise VizError(f"{path}: no training records (no 'loss' in any line)")
    return records


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of the records holding a finite number under ``key``."""
    pts = [(r.get("step", i), r[key]) for i, r in enumerate(records)
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    pts = [(s, v) for s, v in pts if np.isfinite(v)]
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = zip(*pts)
    return np.asarray(s, dtype=float), np.asarray(v, dtype=float)


def throughput(records: list[dict]) -> tuple[np.ndarray, np.ndarray, str]:
    """``(steps, values, unit)``: images/s when logged, else steps/s from ``time`` stamps, else empty."""
    for key in THROUGHPUT_KEYS:
        s, v = series(records, key)
        if s.size:
            return s, v, "images/s"
    s, t = series([r for r in records if "loss" in r], "time")
    if s.size >= 2:
        ds, dt = np.diff(s), np.diff(t)
        ok = dt > 0
        return s[1:][ok], ds[ok] / dt[ok], "steps/s"
    return np.zeros(0), np.zeros(0), ""


def moving_average(v: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average with a shrinking window at the ends (same length as ``v``)."""
    if window <= 1 or v.size == 0:
        return v.copy()
    c = np.concatenate([[0.0], np.cumsum(v)])
    half = window // 2
    idx = np.arange(v.size)
    lo, hi = np.clip(idx - half, 0, v.size), np.clip(idx + half + 1, 0, v.size)
    return (c[hi] - c[lo]) / (hi - lo)


def run_label(source, taken: set) -> str:
    p = Path(source)
    folder = p if p.is_dir() else p.parent
    label = folder.name or str(folder)
    if label in taken:
        label = str(folder)
    taken.add(label)
    return label


def render(sources, out_dir, labels: list[str] | None = None, name: str = "curves.png") -> list[Path]:
    """Write one picture with the curves of every run in ``sources`` (logs, output folders or checkpoints)."""
    sources = list(sources)
    if not sources:
        raise VizError("curves: give at least one --log or --checkpoint")
    taken: set = set()
    runs = []
    for i, src in enumerate(sources):
        label = labels[i] if labels and i < len(labels) else run_label(src, taken)
        runs.append((label, read_log(src)))
    has_eval = any(series(recs, k)[0].size for _, recs in runs for k in EVAL_KEYS)
    n_panels = 4 if has_eval else 3
    title = "training curves: " + ", ".join(label for label, _ in runs)
    if len(title) > 110:
        title = title[:107] + "..."
    fig, axes = plot_figure(n_panels, title)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    units = set()
    for (label, recs), colour in zip(runs, colours):
        s, v = series([r for r in recs if "lr" in r or "loss" in r], "loss")
        if s.size:
            window = max(1, s.size // 50)
            if window > 1:
                axes[0].plot(s, v, color=colour, alpha=0.25, linewidth=0.8)
            axes[0].plot(s, moving_average(v, window), color=colour, linewidth=1.5, label=label,
                         marker="." if s.size < 30 else None)
        s, v = series(recs, "lr")
        if s.size:
            axes[1].plot(s, v, color=colour, linewidth=1.5, label=label, marker="." if s.size < 30 else None)
        s, v, unit = throughput(recs)
        if s.size:
            units.add(unit)
            window = max(1, s.size // 50)
            if window > 1:
                axes[2].plot(s, v, color=colour, alpha=0.25, linewidth=0.8)
            axes[2].plot(s, moving_average(v, window), color=colour, linewidth=1.5, label=label,
                         marker="." if s.size < 30 else None)
        if has_eval:
            for key, style in zip(EVAL_KEYS, ("-", "--")):
                s, v = series(recs, key)
                if s.size:
                    axes[3].plot(s, v, style, color=colour, marker="o", markersize=3, label=f"{label} {key}")
    axes[0].set_ylabel("loss", fontsize=8)
    axes[1].set_ylabel("learning rate", fontsize=8)
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axes[2].set_ylabel(" / ".join(sorted(units)) or "throughput", fontsize=8)
    if not units:
        axes[2].text(0.5, 0.5, "no throughput in the log\n(records carry no images_per_s or time)",
                     ha="center", va="center", fontsize=8, transform=axes[2].transAxes)
    if has_eval:
        axes[3].set_ylabel("top-1 (%)", fontsize=8)
    for ax in axes:
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0] and (len(runs) > 1 or ax is axes[-1] and has_eval):
            ax.legend(fontsize=7)
    return [save_figure(fig, Path(out_dir) / name)]
