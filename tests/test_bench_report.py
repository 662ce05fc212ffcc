"""The bench report turns pytest-benchmark JSON into a markdown table and merges runs per device."""

import json

from bench import report


def _bench(kernel, provider, median, shape="S", dtype="float32", **extra):
    info = dict(kernel=kernel, provider=provider, shape=shape, dtype=dtype, device="cpu x86_64 2 cores",
                torch="2.13", triton="3.6", python="3.11", **extra)
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
    assert cells[3] == "1.00 ms, native-all-threads 500.0 us"
    assert cells[4] == "4.00 ms" and cells[5] == "faiss 2.00 ms"
    assert cells[6] == "4.00x" and cells[7] == "2.00x" and cells[8] == "2.0 GB/s"


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
    assert "| op | S | float32 | 1.00 ms | 2.00 ms | - | 2.00x |" in text
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
    assert cells[6] == "2.00x"
    assert cells[8] == "128 img/s, peak 3072 MiB (ref 5120 MiB)"


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
