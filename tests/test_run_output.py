"""What a run leaves for the researcher (issue 20.3): config.yaml with sources, the timing/ETA fields in
log.jsonl and on the progress line, a redrawn bar only on a terminal."""

import io
import json

import yaml

from _train_helpers import run_pretrain
from engine.trainer.logging import MetricLogger, format_seconds


def test_run_writes_config_and_timing_fields(tmp_path):
    out = run_pretrain("--model", "vit_femto", "--batch-size", "16", "--max-steps", "3", "--print-every", "1",
                       "--no-final-knn", "--num-threads", "1", "--output-dir", str(tmp_path), "--lr", "1e-3")
    assert out.returncode == 0, out.stderr[-2000:]
    text = (tmp_path / "config.yaml").read_text()
    assert "lr: 0.001  # command line" in text and "model: vit_femto  # command line" in text
    cfg = yaml.safe_load(text)  # plain YAML: the comments are only comments
    assert cfg["lr"] == 1e-3 and cfg["method"] == "simmim" and "_sources" not in cfg
    records = [json.loads(x) for x in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        for key in ("loss", "lr", "grad_norm", "data_s", "compute_s", "step_s", "eta_s", "images_per_s"):
            assert key in r and r[key] >= 0, key
    assert records[-1]["eta_s"] == 0
    lines = [x for x in out.stdout.splitlines() if x.startswith("epoch ")]
    assert len(lines) == 3 and "eta 0:00:00" in lines[-1] and " data " in lines[0] and " compute " in lines[0]
    assert "\r" not in out.stdout  # not a terminal: plain lines


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal():
    metrics = {"loss": 1.0, "data_s": 0.01, "compute_s": 0.1, "eta_s": 3725.0}
    plain, tty = io.StringIO(), _Tty()
    for stream in (plain, tty):
        log = MetricLogger(None, print_every=2, stream=stream)
        for step in range(1, 5):
            log.progress(step, 4, 0, metrics, 8)
    assert plain.getvalue().count("\n") == 2 and "\r" not in plain.getvalue()
    assert tty.getvalue().count("\r") == 4 and tty.getvalue().count("\n") == 2 and "[#####" in tty.getvalue()
    assert "eta 1:02:05" in plain.getvalue() and format_seconds(59.6) == "0:01:00"


def test_best_checkpoint_follows_the_best_evaluation(tmp_path):
    from _train_helpers import make_cfg, make_trainer
    from engine.trainer import checkpoint as ckpt

    cfg = make_cfg(tmp_path, batch_size=256, max_steps=0, epochs=3, eval_every=1, best_metric="top1")
    tr = make_trainer(cfg)
    scores = iter([50.0, 70.0, 60.0])
    tr.eval_fn = lambda encoder: {"top1": next(scores)}
    tr.fit()
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["value"] == 70.0 and best["epoch"] == 1
    assert ckpt.load(tmp_path / "checkpoint-best.pt")["step"] == 2 * tr.steps_per_epoch
    assert ckpt.load(tmp_path / ckpt.LAST)["step"] == 3 * tr.steps_per_epoch
