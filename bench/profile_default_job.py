"""CPU profile of the default job: where the time of ``python -m engine.pretrain`` goes.

    python -m bench.profile_default_job [--steps 40] [--out bench/results/cpu.md]

Runs the default preset (no other arguments) for ``--steps`` optimizer steps under cProfile and
torch.profiler, then writes a markdown report: wall time per phase of a training step (data, forward,
backward, optimizer, EMA/hooks) from cProfile's cumulative times, and the torch operators with the most
self CPU time. The final k-NN evaluation is profiled separately as its own phase.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import tempfile
import time
from pathlib import Path

import torch

PHASES = {
    # phase: (module path suffix, function name) as cProfile reports them
    "data (next batch)": ("engine/trainer/loop.py", "_next_batch"),
    "forward (method)": ("torch/nn/modules/module.py", "_call_impl"),
    "backward": ("torch/_tensor.py", "backward"),
    "optimizer step": ("torch/amp/grad_scaler.py", "step"),
    "method after_step (EMA etc.)": ("engine/trainer/loop.py", "after_step"),
    "final k-NN eval": ("engine/pretrain.py", "final_knn"),
    "whole train loop": ("engine/trainer/loop.py", "fit"),
}


def _cumulative(stats: pstats.Stats, suffix: str, name: str) -> tuple[float, int]:
    total, calls = 0.0, 0
    for (filename, _line, func), (cc, nc, tt, ct, callers) in stats.stats.items():
        if func == name and filename.replace(os.sep, "/").endswith(suffix):
            total += ct
            calls += cc
    return total, calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu.md")
    args = p.parse_args(argv)

    from engine import pretrain

    out_dir = tempfile.mkdtemp(prefix="profile-default-job-")
    cli = ["--max-steps", str(args.steps), "--output-dir", out_dir]
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tprof:
        prof.enable()
        pretrain.main(cli)
        prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof, stream=io.StringIO())

    lines = [
        "# CPU profile of the default job",
        "",
        f"`python -m engine.pretrain --max-steps {args.steps}` (default preset) on {platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"wall {wall:.1f} s under the profilers (which add overhead). Regenerate: `python -m bench.profile_default_job`.",
        "",
        "## Phases (cProfile cumulative time)",
        "",
        "| phase | seconds | share of wall | calls |",
        "|---|---|---|---|",
    ]
    for phase, (suffix, name) in PHASES.items():
        secs, calls = _cumulative(stats, suffix, name)
        lines.append(f"| {phase} | {secs:.2f} | {100 * secs / wall:.0f}% | {calls} |")
    lines += [
        "",
        "Forward is every `nn.Module.__call__` from the top (nested calls counted once: the method's own call "
        "dominates), so read it as an upper bound.",
        "",
        "## Torch operators by self CPU time",
        "",
        "```",
        tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50),
        "```",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
