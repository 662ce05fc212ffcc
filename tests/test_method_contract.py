"""The method contract (issue 18): a new method is one file -- here, this test file. Its defaults, its option,
its data recipe and its mask function are declared by its class (engine/methods/base.py); it is registered with
``@register`` from here and trained through the command line, ``engine.pretrain.main`` in-process (a subprocess
would not see this registration). Nothing outside this file is edited to add it."""

import functools
import json
import math
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from engine import pretrain
from engine.methods import available_methods, get_method, register, unregister
from engine.methods.base import MASK_RATIO, PretrainMethod
from engine.trainer.config import Option, all_options, build_parser, resolve

NAME = "tiny_mpr"
REPO = Path(__file__).resolve().parents[1]
PATCH = 8


def patch_masks(batch_size: int, seed: int, *, grid: int, ratio: float) -> dict:
    """``ceil(ratio * grid^2)`` random patches masked per image (bool [B, grid, grid], True = masked)."""
    g = torch.Generator().manual_seed(seed)
    k = math.ceil(ratio * grid * grid)
    order = torch.rand(batch_size, grid * grid, generator=g).argsort(dim=1)
    mask = torch.zeros(batch_size, grid * grid, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return {"mask": mask.reshape(batch_size, grid, grid)}


class TinyConvNet(nn.Module):
    """Two 3x3 convolutions; ``forward`` gives mean-pooled features (what k-NN and the trainer's checks read)."""

    def __init__(self, width: int):
        super().__init__()
        self.config = {"arch": "tiny_conv", "width": width}
        self.num_features = width
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.GELU())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


class TinyMaskedPixels(PretrainMethod):
    """Masked pixel regression: the masked 8-px patches are zeroed and regressed (mean squared error on them)."""

    defaults = dict(blr=1e-3, weight_decay=0.0, warmup_epochs=0.0, clip_grad=1.0, mask_ratio=0.5, mpr_width=8,
                    pool="mean")
    options = (MASK_RATIO, Option("mpr_width", None, int, "tiny_mpr: width of the conv net", range=">=1"))
    recipe = "simmim"  # one RandomResizedCrop view with ImageNet normalisation

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.grid = int(self.c["image_size"]) // PATCH
        self.net = TinyConvNet(int(self.c["mpr_width"]))
        self.head = nn.Conv2d(self.net.num_features, 3, 1)

    def mask_fn(self):
        return functools.partial(patch_masks, grid=self.grid, ratio=float(self.c["mask_ratio"]))

    def encoder(self) -> nn.Module:
        return self.net

    def forward(self, batch: dict) -> dict:
        x, mask = batch["images"], batch["mask"]
        pix = mask.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2).unsqueeze(1).to(x.dtype)
        rec = self.head(self.net.features(x * (1 - pix)))
        loss = ((rec - x) ** 2 * pix).sum() / (3 * pix.sum()).clamp_min(1.0)
        return {"loss": loss, "masked_fraction": pix.mean()}


@pytest.fixture
def registered():
    register(NAME)(TinyMaskedPixels)
    yield TinyMaskedPixels
    unregister(NAME)  # the rest of the session sees the built-in methods only


def test_the_registered_method_declares_its_option(registered):
    assert NAME in available_methods() and get_method(NAME) is registered
    assert all_options()["mpr_width"] == registered.options[1]
    help_text = build_parser().format_help()
    assert "--mpr-width" in help_text and "options of --method tiny_mpr" in help_text and NAME in help_text
    cfg = resolve({"method": NAME, "mpr_width": 4}, method_defaults_fn=lambda m: get_method(m).defaults)
    assert cfg["mpr_width"] == 4 and cfg["_sources"]["mpr_width"] == "command line"
    assert cfg["blr"] == 1e-3 and cfg["_sources"]["blr"] == f"method {NAME}"
    from engine.trainer.config import ConfigError

    with pytest.raises(ConfigError, match="--mpr-width must be an integer >= 1"):
        resolve({"method": NAME, "mpr_width": 0}, method_defaults_fn=lambda m: get_method(m).defaults)
    recipe = registered(cfg).data_recipe()
    assert recipe.augment == "simmim" and recipe.mask_fn(2, 0)["mask"].shape == (2, 4, 4)


def test_the_registered_method_trains_through_the_command_line(registered, tmp_path, capsys):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = pretrain.main(["--method", NAME, "--mpr-width", "6", "--model", "vit_femto", "--image-size", "32",
                              "--batch-size", "16", "--max-steps", "3", "--output-dir", str(tmp_path),
                              "--num-threads", "1", "--print-every", "1", "--no-final-knn", "--device", "cpu"])
    finally:
        for s, h in handlers.items():  # main installs the pre-emption handlers: give pytest its own back
            signal.signal(s, h)
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"method {NAME}" in out and "trained 3/3 steps" in out
    saved = (tmp_path / "config.yaml").read_text()
    assert "mpr_width: 6  # command line" in saved and f"method: {NAME}  # command line" in saved
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert all(r["masked_fraction"] == pytest.approx(0.5) for r in records if "masked_fraction" in r)
    state = torch.load(tmp_path / "checkpoint-last.pt", weights_only=False)
    assert state["method"] == NAME and state["config"]["mpr_width"] == 6 and state["step"] == 3


def test_adding_the_method_edited_no_other_file():
    """The method lives in this file alone: no file of the engine names it."""
    out = subprocess.run(["git", "grep", "-l", NAME, "--", "engine", "tools", "bench", "README.md"], cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode not in (0, 1):
        pytest.skip(f"git grep unavailable: {out.stderr.strip()}")
    assert out.stdout.strip() == "", out.stdout
    assert NAME not in available_methods()  # unregistered again once its tests are done
