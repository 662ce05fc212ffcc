"""One prepared GPU run, sized to a short device window: build, real-shape CUDA tests, headline benches, report.

    python -m bench.gpu OUT [--budget 500] [--dry-run] [--only STEP,...] [--build-cuda]
    bash bench/gpu_run.sh OUT                 # the same

Made for a bare H100/H200 with the GPU image (torch 2.11 + triton 3.6, Python 3.12, no DALI/faiss/flash-attn/
xformers) and about 10 minutes of commands, start-up included: the steps run in priority order, each under a
time cap and the run's overall ``--budget`` (seconds, default 500), so the important measurements come first
and a slow step cannot eat the rest. Everything goes into ``OUT`` as it happens (so a run cut short still
returns what it measured), as few files as possible (the device tool returns at most 8 files, 16 MiB each):

    OUT/gpu_run.log            every step's command and output, with times
    OUT/steps.json             per step: status (ok / failed / timeout / skipped), exit code, seconds, notes
    OUT/<gpu>.json, <gpu>.md   the bench rows (rewritten after every case) and their report with the targets
    OUT/plots.tar              the report's plots (at the end, when matplotlib is importable)
    OUT/static-sm90.md         the static check of every kernel (spills, shared memory, wgmma), made on this machine

Copy ``<gpu>.json``/``.md`` to ``bench/results/`` to commit them (``python -m bench.report OUT/<gpu>.json
--out bench/results/<gpu>.md`` re-renders them with the plots).

Steps (priority order):

1. ``env``            python/torch/triton/CUDA versions, the GPU, which optional peers are importable
2. ``build``          the C++ part of ``kernels._C`` (masks, the CPU sparse conv): built into a temp dir and moved
                      in atomically; there are no CUDA sources (``csrc/cuda``) today, and if there were, the CUDA
                      build is skipped with the reason logged unless ``--build-cuda`` (nvcc takes minutes)
2b. ``precompile``    ``python -m bench.static_gpu_check --sm 90`` on every core: ``OUT/static-sm90.md`` (spills,
                      shared memory, wgmma per kernel, with this machine's toolchain) and Triton's cache filled with
                      every kernel under the JIT's keys, so the steps after it mostly find their kernels compiled
                      (the log says how many they still compiled)
3. ``tests``          ``tests/test_gpu_real_shapes.py --device cuda``: every kernel at real shapes vs the reference
4. ``bench``          ``pytest bench/ -m "cuda and headline and not compile"``: the headline cases of every kernel
                      (attention at ViT-B, masked ops at BEiT, codebook at BEiT v2, every SparK layer fwd+bwd, the
                      encoders, DINO's loss), into OUT
4b. ``bench-train``   the same for ``bench/test_bench_train_step.py``: one step of every method, ours and reference
5. ``tests-ops``      every op's own test file on CUDA (``-m "cuda or interpreter"``), small shapes
6. ``bench-rest``     the other CUDA bench cases (other shapes, fwd-only sparse conv, timm peers)
7. ``bench-compile``  the ``torch.compile`` providers (tens of seconds to build each)
then ``report`` (plots.tar and the summary), which always runs.

``--dry-run`` runs the same plan on a CPU: steps 3 and 4 with tiny shapes and the Triton interpreter
(``GPU_PLAN_DRY_RUN=1``, ``BENCH_DRY_RUN=1``), steps 5-7 as ``--collect-only`` (their selections resolve), the
build only if ``kernels._C`` is missing. CI runs it (``.ci/gpu_plan_dry_run.sh``), so this plan cannot rot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OP_TESTS = ["tests/test_attention.py", "tests/test_nearest_code.py", "tests/test_ema_codebook_update.py",
            "tests/test_vector_quantizer.py", "tests/test_masked_token_scatter.py",
            "tests/test_gather_masked.py", "tests/test_masked_cross_entropy.py",
            "tests/test_sparse_conv2d.py", "tests/test_masked_batch_norm.py"]
PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
TRAIN = "bench/test_bench_train_step.py"
BENCH_OPTS = ["--benchmark-only", "--benchmark-max-time=0.2", "--benchmark-min-rounds=3", "-q", "-rfEs"]


@dataclasses.dataclass
class Step:
    name: str
    cap_s: float  # the most this step may take
    what: str
    reserve_s: float = 0.0  # left for the higher-priority steps after it (a slow step cannot starve them)


STEPS = [
    Step("env", 30, "versions, GPU, optional peers", 420),
    Step("build", 120, "kernels._C (C++; CUDA sources: none today)", 400),
    Step("precompile", 100, "every Triton kernel for sm_90 in parallel (static check; warms the JIT cache)", 360),
    Step("tests", 160, "real-shape CUDA correctness of every kernel", 240),
    Step("bench", 220, "headline bench cases of every kernel", 90),
    Step("bench-train", 160, "headline train step of every method (ours, reference)"),
    Step("tests-ops", 150, "each op's test file on CUDA"),
    Step("bench-rest", 200, "the other CUDA bench cases"),
    Step("bench-compile", 240, "torch.compile providers"),
]
MIN_CAP_S = 30.0  # a step still gets this much when the reserve would leave it less
REPORT_RESERVE_S = 15.0


class Run:
    def __init__(self, out: pathlib.Path, budget: float, dry: bool, build_cuda: bool):
        self.out, self.budget, self.dry, self.build_cuda = out, budget, dry, build_cuda
        self.t0 = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = out / "gpu_run.log"
        self.log_file = open(self.log_path, "a", buffering=1)  # noqa: SIM115 - closed in finish()
        self.steps: list[dict] = []

    # ------------------------------------------------------------------ plumbing
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def log(self, msg: str, echo: bool = True):
        line = f"[{self.elapsed():6.1f}s] {msg}"
        self.log_file.write(line + "\n")
        if echo:
            print(line, flush=True)

    def record(self, **entry):
        self.steps.append(entry)
        tmp = self.out / "steps.json.tmp"
        tmp.write_text(json.dumps({"dry_run": self.dry, "budget_s": self.budget, "steps": self.steps}, indent=1))
        tmp.replace(self.out / "steps.json")

    def env(self, **extra) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("TRITON_INTERPRET", None)
        if self.dry:
            env.update(TRITON_INTERPRET="1", BENCH_DRY_RUN="1", GPU_PLAN_DRY_RUN="1")
        env.update(extra)
        return env

    def sh(self, cmd: list[str], timeout: float, env: dict | None = None, echo: bool = False) -> tuple[int, str]:
        """Run ``cmd`` (own process group) with its output streamed into the log; (exit code or 'timeout', tail)."""
        self.log(f"$ {' '.join(cmd)}   (timeout {timeout:.0f}s)")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        tail: list[str] = []

        def pump():
            for line in proc.stdout:
                self.log_file.write(line)
                tail.append(line)
                del tail[:-40]
                if echo:
                    print(line, end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = "timeout"
        reader.join(timeout=5)
        return rc, "".join(tail)

    def run_step(self, step: Step, fn):
        # the caps are sized for the GPU; the dry run's interpreter on a small CPU is several times slower
        scale = 4.0 if self.dry else 1.0
        room = self.left() - REPORT_RESERVE_S
        cap = min(step.cap_s * scale, max(room - step.reserve_s * scale, min(MIN_CAP_S * scale, room)))
        if cap < 5:
            self.log(f"== {step.name}: skipped, {self.left():.0f}s left of the budget")
            self.record(name=step.name, status="skipped", rc=None, seconds=0, note="out of budget")
            return
        self.log(f"== {step.name} ({step.what}); cap {cap:.0f}s, {self.left():.0f}s left")
        t = time.monotonic()
        try:
            rc, note = fn(cap)
        except Exception as exc:  # noqa: BLE001 - a broken step must not stop the plan
            rc, note = "error", f"{type(exc).__name__}: {exc}"
        secs = time.monotonic() - t
        status = {0: "ok", 5: "ok (nothing selected)", "timeout": "timeout", "skipped": "skipped"}.get(
            rc, "failed")
        self.log(f"== {step.name}: {status} (rc {rc}) in {secs:.1f}s" + (f": {note.strip()[-300:]}" if note and
                                                                          status != "ok" else ""))
        self.record(name=step.name, status=status, rc=rc, seconds=round(secs, 1), cap_s=round(cap),
                    note=(note or "").strip()[-2000:])

    # ------------------------------------------------------------------ steps
    def step_env(self, cap):
        probe = r'''
import importlib.util, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import triton; print("triton", triton.__version__)
except Exception as e: print("triton: not importable:", e)
try:
    import pytest_benchmark; print("pytest-benchmark", pytest_benchmark.__version__)
except Exception as e: print("pytest-benchmark: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
          "memory_GiB", round(p.total_memory / 2**30, 1), "SMs", p.multi_processor_count)
for m in ["timm", "torchvision", "faiss", "spconv", "flash_attn", "xformers", "nvidia.dali", "yaml", "sklearn",
          "matplotlib", "numpy"]:
    try:
        ok = importlib.util.find_spec(m) is not None
    except Exception:
        ok = False
    print(f"  {m:12s}", "yes" if ok else "NO")
'''
        rc, tail = self.sh([sys.executable, "-c", probe], cap, echo=True)
        if shutil.which("nvidia-smi") and not self.dry:
            self.sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                     "--format=csv"], min(20, cap), echo=True)
        return rc, tail

    def step_build(self, cap):
        have_cu = any((ROOT / "csrc" / "cuda").glob("*.cu")) if (ROOT / "csrc" / "cuda").is_dir() else False
        if not have_cu:
            self.log("build: no CUDA sources (csrc/cuda/*.cu): kernels._C is the C++ extension only "
                     "(KERNELS_BUILD_CUDA=0); the GPU paths are the Triton kernels (JIT-compiled on first use)")
        elif not self.build_cuda:
            self.log("build: CUDA sources present, CUDA extension SKIPPED: an nvcc build takes minutes, which do not "
                     "fit this window (pass --build-cuda to build it); building the C++ part only")
        want_cuda = "1" if (have_cu and self.build_cuda) else "0"
        check = [sys.executable, "-c", "import kernels._C as c; print('kernels._C ok:', c.__file__)"]
        if self.dry:
            rc, tail = self.sh(check, 60)
            if rc == 0:
                self.log("build: kernels._C already importable (the CI install built it); dry run: not rebuilt")
                return 0, tail
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="kernels-build-"))
        env = self.env(KERNELS_BUILD_CUDA=want_cuda, MAX_JOBS=str(os.cpu_count() or 4))
        rc, tail = self.sh([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp / "lib"),
                            "--build-temp", str(tmp / "tmp")], cap - 10, env=env)
        if rc != 0:
            self.log("build: FAILED or too slow; the C++ ops (mask generators, CPU sparse conv) fall back to their "
                     "torch references, the CUDA measurements are unaffected")
            return rc, tail
        built = sorted((tmp / "lib" / "kernels").glob("_C*"))
        for so in built:  # atomic: a process importing kernels._C meanwhile sees the old file or the new one
            dst = ROOT / "kernels" / so.name
            shutil.copy2(so, dst.with_name(dst.name + ".tmp"))
            os.replace(dst.with_name(dst.name + ".tmp"), dst)
            self.log(f"build: installed {dst.relative_to(ROOT)}")
        shutil.rmtree(tmp, ignore_errors=True)
        return self.sh(check, 60)

    def triton_cache_entries(self) -> int:
        d = pathlib.Path(os.environ.get("TRITON_CACHE_DIR", ""))
        return sum(1 for _ in d.iterdir()) if d.is_dir() else 0

    def step_precompile(self, cap):
        """The static check's sm_90 sweep on all cores: the report, and Triton's cache filled under the JIT's keys."""
        cmd = [sys.executable, "-m", "bench.static_gpu_check", "--sm", "90", "--jobs", str(os.cpu_count() or 4),
               "--out", str(self.out / "static-sm90.md")]
        if self.dry:  # two compiles: the plumbing, not the sweep (the CI's AOT tests run the representative subset)
            cmd += ["--subset", "ci", "--ops", "masked_bn"]
        before = self.triton_cache_entries()
        rc, tail = self.sh(cmd, cap)
        self.cache_after_precompile = self.triton_cache_entries()
        self.log(f"precompile: {self.cache_after_precompile - before} new entries in Triton's cache "
                 f"({os.environ.get('TRITON_CACHE_DIR')}, {self.cache_after_precompile} in all)")
        return rc, tail

    def step_tests(self, cap):
        dev = "cpu" if self.dry else "cuda"
        return self.sh(PYTEST + ["tests/test_gpu_real_shapes.py", "--device", dev, "-q", "-rfEs",
                                 "--durations=10"], cap)

    def bench(self, cap, marker, paths=("bench/",), ignore=(), run_in_dry=False):
        cmd = PYTEST + list(paths) + [f"--ignore={i}" for i in ignore] + ["-m", marker, "--results-dir",
                                                                          str(self.out)] + BENCH_OPTS
        if self.dry and not run_in_dry:
            cmd += ["--collect-only"]
        return self.sh(cmd, cap)

    def log_cache_misses(self, step_name):
        """Kernels a step compiled that the precompile step had not: 0 means the static check's specialisation
        is the JIT's (autotune benchmarking and other shapes aside)."""
        base = getattr(self, "cache_after_precompile", None)
        if base is not None:
            now = self.triton_cache_entries()
            self.log(f"{step_name}: {now - base} kernels compiled beyond the precompiled ones (Triton cache entries)")
            self.cache_after_precompile = now

    def step_tests_ops(self, cap):
        cmd = PYTEST + OP_TESTS + ["--device", "cpu" if self.dry else "cuda", "-m", "cuda or interpreter", "-q",
                                   "-rfEs"]
        if self.dry:
            cmd += ["--collect-only"]
        return self.sh(cmd, cap)

    def report(self):
        """plots.tar from the results JSON, and the targets table echoed for the device tool's output tail."""
        from bench import report

        rows = [p for p in self.out.glob("*.json") if p.name != "steps.json"]
        if not rows:
            self.log("report: no bench rows were written")
            return
        for path in rows:
            groups, meta = report.load_rows(path)
            md = path.with_suffix(".md")
            report.write_report(groups, meta, md, plots=False)
            try:
                with tempfile.TemporaryDirectory() as d:
                    pngs = report.plot(groups, meta, pathlib.Path(d) / f"{path.stem}-plots")
                    if pngs:
                        import tarfile

                        with tarfile.open(self.out / "plots.tar", "w") as tar:
                            for png in pngs:
                                tar.add(png, arcname=f"{png.parent.name}/{png.name}")
            except ImportError:
                self.log("report: matplotlib is not importable: no plots.tar")
            self.log(f"report: {md.name} ({len(groups)} rows)")
            text = md.read_text()
            cut = text.find("## Targets of the kernel issues")
            if cut >= 0:
                print(text[cut:cut + 6000], flush=True)

    def finish(self):
        self.log(f"done in {self.elapsed():.0f}s of {self.budget:.0f}s; files in {self.out}: "
                 + ", ".join(sorted(p.name for p in self.out.iterdir())))
        for s in self.steps:
            print(f"  {s['name']:14s} {s['status']:22s} {s.get('seconds', 0):6.1f}s", flush=True)
        self.log_file.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=pathlib.Path, help="output folder (the device tool's $OUT)")
    p.add_argument("--budget", type=float, default=500.0, help="seconds for the whole run (default 500)")
    p.add_argument("--dry-run", action="store_true", help="the same plan on a CPU: tiny shapes, interpreter")
    p.add_argument("--only", default=None, help="comma-separated step names to run (default: all)")
    p.add_argument("--build-cuda", action="store_true", help="also build CUDA sources of kernels._C if any")
    args = p.parse_args(argv)
    run = Run(args.out.resolve(), args.budget, args.dry_run, args.build_cuda)
    run.log(f"GPU plan{' (DRY RUN on CPU)' if args.dry_run else ''}: budget {args.budget:.0f}s, output {run.out}")
    handlers = {
        "env": run.step_env,
        "build": run.step_build,
        "precompile": run.step_precompile,
        "tests": run.step_tests,
        "bench": lambda cap: run.bench(cap, "cuda and headline and not compile", ignore=(TRAIN,), run_in_dry=True),
        "bench-train": lambda cap: run.bench(cap, "cuda and headline and not compile", paths=(TRAIN,),
                                             run_in_dry=True),
        "tests-ops": run.step_tests_ops,
        "bench-rest": lambda cap: run.bench(cap, "cuda and not headline and not compile"),
        "bench-compile": lambda cap: run.bench(cap, "cuda and compile"),
    }
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - set(handlers)
    if unknown:
        raise SystemExit(f"unknown steps {sorted(unknown)}; steps: {', '.join(handlers)}")
    # one Triton cache for every step, so the precompiled kernels are found and misses can be counted
    os.environ.setdefault("TRITON_CACHE_DIR", str(pathlib.Path(tempfile.gettempdir()) / "bench-gpu-triton-cache"))
    try:
        for step in STEPS:
            if only is None or step.name in only:
                run.run_step(step, handlers[step.name])
                if step.name in ("tests", "bench", "bench-train"):
                    run.log_cache_misses(step.name)
    finally:
        try:
            run.report()
        except Exception as exc:  # noqa: BLE001 - the files written so far stay
            run.log(f"report: failed: {type(exc).__name__}: {exc}")
        run.finish()
    failed = [s["name"] for s in run.steps if s["status"] in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
