"""The bench report turns pytest-benchmark JSON into a markdown table and merges runs per device."""

import json

from bench import report


def _bench(kernel, provider, median, shape="S", dtype="float32", **extra):
    info = dict(kernel=kernel, provider=provider, shape=shape, dtype=dtype, device="cpu x86_64 2 cores",
                torch="2.13", triton="3.6", python="3.11")
    info.update(extra)
    return {"stats": {"median": median}, "extra_info": info}


def test_render_ratios_and_variants():
    data = {"datetime": "today", "benchmarks": [
        _bench("op", "native", 1e-3, bytes_moved=2e6, achieved_GBps=2.0),
        _bench("op", "native-all-threads", 5e-4),
        _bench("op", "reference", 4e-3),
        _bench("op", "faiss", 2e-3),
        {"stats": {"median": 1.0}, "extra_info": {}},  # not from bench/: ignored
    ]}
    groups, meta = report.rows_from_json(data)
    text = report.render(groups, meta)
    row = [line for line in text.splitlines() if line.startswith("| op ")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[3] == "1.00 ms, native-all-threads 500.0 us" and cells[4] == "-"
    assert cells[5] == "4.00 ms" and cells[6] == "faiss 2.00 ms"
    assert cells[7] == "4.00x" and cells[8] == "2.00x" and cells[9] == "2.0 GB/s"


def test_merge_keeps_untouched_rows(tmp_path):
    path = tmp_path / "dev.json"
    report.merge_into(path, {"benchmarks": [_bench("a", "native", 1.0), _bench("b", "native", 2.0)]})
    merged = report.merge_into(path, {"benchmarks": [_bench("a", "native", 3.0)]})
    medians = {b["extra_info"]["kernel"]: b["stats"]["median"] for b in merged["benchmarks"]}
    assert medians == {"a": 3.0, "b": 2.0}
    assert json.loads(path.read_text()) == merged


def test_cli_writes_markdown(tmp_path):
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps({"benchmarks": [_bench("op", "native", 1e-3), _bench("op", "reference", 2e-3)]}))
    out = tmp_path / "out.md"
    report.main([str(raw), "--out", str(out)])
    text = out.read_text()
    assert "| op | S | float32 | 1.00 ms | - | 2.00 ms | - | 2.00x |" in text
    png = tmp_path / "out-plots" / "op.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![op](out-plots/op.png)" in text


def test_train_step_rows_show_images_per_second_and_peak_memory():
    data = {"benchmarks": [
        _bench("train_step_x", "ours", 0.5, images_per_call=64, peak_memory_bytes=3 * 2**30),
        _bench("train_step_x", "reference", 1.0, images_per_call=64, peak_memory_bytes=5 * 2**30),
    ]}
    text = report.render(*report.rows_from_json(data))
    row = next(line for line in text.splitlines() if line.startswith("| train_step_x "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[7] == "2.00x"
    assert cells[9] == "128 img/s, peak 3072 MiB (ref 5120 MiB)"


def test_targets_met_missed_and_not_measured():
    from bench import targets

    shape_cpu = "B4 160px rn50_l1_3x3 (64->64 @40) fwd"
    data = {"benchmarks": [
        _bench("sparse_conv2d", "ours", 1.0, shape=shape_cpu),
        _bench("sparse_conv2d", "ours-full", 1.6, shape=shape_cpu),  # 0.625x of full density: missed (<= 0.55)
        _bench("sparse_conv2d", "reference", 3.0, shape=shape_cpu),  # 3x faster than dense: met
        _bench("blockwise_masks", "native", 1.0, shape="B2048 14x14 75 masked"),
        _bench("blockwise_masks", "reference", 10.0, shape="B2048 14x14 75 masked"),  # 10x < 20x: missed
    ]}
    groups, meta = report.rows_from_json(data)
    rows = {(r["target"].issue, r["target"].metric, r["shape"].split(" float")[0]): r
            for r in targets.evaluate(groups, meta, report.OURS)}
    assert rows[(8, "variant:ours-full", shape_cpu)]["status"].startswith("MISSED (at 88%")
    assert rows[(8, "speedup", shape_cpu)]["status"] == "met"
    assert rows[(2, "speedup", "B2048 14x14 75 masked")]["status"] == "MISSED (at 50% of the target)"
    assert rows[(7, "time", "-")]["status"].startswith("not measured here (H100 target")
    assert "## Targets of the kernel issues" in report.render(groups, meta)


def test_cuda_rows_show_device_time_call_and_graph_and_floors():
    gpu = dict(device="NVIDIA H200")
    data = {"benchmarks": [
        _bench("op", "ours", 20e-6, kernel_s=20e-6, call_s=80e-6, graph_s=18e-6, timing="cuda-events+l2-flush", **gpu),
        _bench("op", "three-gemms", 10e-6, note="its own GEMMs", **gpu),
        _bench("op", "peer", 40e-6, **gpu),
    ]}
    text = report.render(*report.rows_from_json(data))
    assert "CUDA events over many calls" in text
    row = next(line for line in text.splitlines() if line.startswith("| op "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "20.0 us" and cells[4] == "call 80.0 us, graph 18.0 us"
    assert cells[8] == "2.00x"  # the fastest rival (40 us), not the three-GEMM floor
    assert "* op S float32, three-gemms: its own GEMMs" in text


def test_masked_ce_target_compares_with_its_own_gemms():
    from bench import targets

    shape = "B256 N196 D768 k75 V8192 fwd+bwd"
    data = {"benchmarks": [
        _bench("masked_cross_entropy", "ours", 1.2e-3, shape=shape, dtype="bfloat16", device="NVIDIA H200"),
        _bench("masked_cross_entropy", "three-gemms", 1.0e-3, shape=shape, dtype="bfloat16", device="NVIDIA H200"),
    ]}
    groups, meta = report.rows_from_json(data)
    rows = [r for r in targets.evaluate(groups, meta, report.OURS) if r["target"].metric == "vs:three-gemms"]
    assert len(rows) == 1 and rows[0]["measured"] == "0.83x"
    assert rows[0]["status"].startswith("MISSED (at 92%")


def test_cli_packs_plots_into_one_tar(tmp_path):
    import tarfile

    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps({"benchmarks": [_bench("op", "native", 1e-3), _bench("op2", "native", 2e-3)]}))
    report.main([str(raw), "--out", str(tmp_path / "r.md"), "--plots-tar", str(tmp_path / "plots.tar")])
    with tarfile.open(tmp_path / "plots.tar") as tar:
        assert sorted(tar.getnames()) == ["r-plots/op.png", "r-plots/op2.png"]


def test_kernel_time_procedure_on_cpu():
    """The do_bench-style procedure (estimate, warm-up, flushed per-call events) with wall-clock events."""
    import torch

    from bench import timing

    calls = []
    t = timing.kernel_time(lambda: calls.append(1), torch.device("cpu"), warmup_ms=1.0, rep_ms=2.0, max_reps=50)
    assert t.method == "wall-events" and 3 <= t.reps <= 50 and 0 <= t.p20_s <= t.median_s <= t.p80_s
    assert len(calls) >= t.reps + 2
    q = timing.kernel_time(lambda: None, torch.device("cpu"), quick=True)
    assert q.reps == 1
    assert timing.launch_bound(20e-6, None) and timing.launch_bound(1e-3, 3e-3) and not timing.launch_bound(1e-3, 1.1e-3)


def test_bench_run_writes_results_only_when_asked(tmp_path):
    """A plain bench run leaves bench/results untouched; --results-dir writes <device>.json/.md there; the
    pytest-benchmark --benchmark-json option works (a path in 5.3+, an open file before)."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    results = root / "bench" / "results"
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}
    case = "bench/test_bench_masks.py::test_mask_generator[native-native-1-spark_masks]"
    cmd = [sys.executable, "-m", "pytest", case, "--benchmark-only", "-q", "-p", "no:cacheprovider",
           "--benchmark-min-rounds=1", "--benchmark-max-time=0.01"]
    out = subprocess.run(cmd + ["--benchmark-json", str(tmp_path / "pb.json"), "--results-dir", str(tmp_path / "r")],
                         cwd=root, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert json.loads((tmp_path / "pb.json").read_text())["benchmarks"]
    (ours,) = (tmp_path / "r").glob("*.json")
    rows = json.loads(ours.read_text())["benchmarks"]
    assert [b["extra_info"]["kernel"] for b in rows] == ["spark_masks"]
    assert ours.with_suffix(".md").exists()
    after = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}
    assert after == before, "a bench run without --save-results changed bench/results"


def test_target_kernel_names_are_literal():
    """Target.kernel is compared with ==, not searched as a regex (shape is the regex): an escaped name such as
    'attention fwd\\+bwd' could never match the bench's 'attention fwd+bwd' rows."""
    from bench import targets

    bad = [t.what for t in targets.TARGETS if "\\" in t.kernel]
    assert not bad, bad
