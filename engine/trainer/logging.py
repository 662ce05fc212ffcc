"""Metric logging: a progress line on stdout, JSON lines in ``output_dir/log.jsonl``, TensorBoard if present."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


_TIMING = ("data_s", "compute_s", "step_s", "eta_s", "max_mem_gib", "images_per_s")


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _bar(step: int, total: int, width: int) -> str:
    filled = int(width * step / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + "]"


class MetricLogger:
    def __init__(self, output_dir: str | Path | None, enabled: bool = True, print_every: int = 10,
                 stream=None, tensorboard: bool = True):
        self.enabled = enabled
        self.print_every = max(1, int(print_every))
        self.stream = stream or sys.stdout
        self.path = Path(output_dir) / "log.jsonl" if output_dir else None
        self.tb = None
        if enabled and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

                    self.tb = SummaryWriter(str(self.path.parent / "tb"))
                except Exception:  # tensorboard not installed: JSON lines only
                    self.tb = None
        self._t0 = time.perf_counter()
        self._images = 0
        self._last_len = 0

    def reset(self) -> None:
        if self.enabled and self.path is not None and self.path.exists():
            self.path.unlink()

    def truncate(self, step: int) -> None:
        """Keep only the records of steps <= ``step`` (a resumed run re-logs the steps after its checkpoint);
        rewritten atomically."""
        if not self.enabled or self.path is None or not self.path.exists():
            return
        kept = []
        with open(self.path) as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if int(rec.get("step", 0)) <= step:
                    kept.append(json.dumps(rec, sort_keys=True) + "\n")
        tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
        with open(tmp, "w") as fh:
            fh.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch") and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def progress(self, step: int, total: int, epoch: int, metrics: dict, images: int) -> None:
        """``epoch e step s/T loss .. lr .. | images/s .. data ..s compute ..s eta h:mm:ss [mem .. GiB]`` every
        ``print_every`` steps (and the last); on a terminal the line is also redrawn in place every step."""
        self._images += images
        if not self.enabled:
            return
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        due = not (step % self.print_every and step != total)
        if not due and not tty:
            return
        now = time.perf_counter()
        rate = self._images / max(now - self._t0, 1e-9)
        if due:
            self._t0, self._images = now, 0
        parts = [f"epoch {epoch}", f"step {step}/{total}"]
        for k in ("loss", "lr", "wd"):
            if k in metrics:
                parts.append(f"{k} {metrics[k]:.4g}")
        parts += [f"{k} {v:.4g}" for k, v in metrics.items()
                  if k not in ("loss", "lr", "wd") + _TIMING and isinstance(v, float)]
        parts.append(f"images/s {rate:.1f}")
        if "data_s" in metrics:
            parts.append(f"data {metrics['data_s']:.3f}s compute {metrics['compute_s']:.3f}s")
        if "eta_s" in metrics:
            parts.append(f"eta {format_seconds(metrics['eta_s'])}")
        if "max_mem_gib" in metrics:
            parts.append(f"mem {metrics['max_mem_gib']:.2f} GiB")
        line = "  ".join(parts)
        if tty:  # redraw in place; keep a line every print_every steps
            text = f"{_bar(step, total, 20)} {line}"
            pad = max(0, self._last_len - len(text))
            self._last_len = 0 if due else len(text)
            print("\r" + text + " " * pad, end="\n" if due else "", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
