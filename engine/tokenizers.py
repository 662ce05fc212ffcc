"""Frozen image tokenizers for BEiT / BEiT v2 from files written by this engine.

``load_tokenizer(path)`` accepts

* a pre-training checkpoint (file, or its output folder) of ``--method dvae`` or ``--method vqkd``: the
  tokenizer's weights are the method's ``tokenizer.*`` entries and its architecture their extra state;
* a standalone file written by :func:`save_tokenizer` (``{"kind", "config", "state_dict"}``);
* a DALL-E dVAE *encoder* state dict in the public layout (``blocks.input.w``,
  ``blocks.group_1.block_1.res_path.conv_1.w`` ..., ``blocks.output.conv.w``), saved as a plain
  ``{name: tensor}`` file (e.g. ``torch.save(dall_e_encoder.state_dict(), "encoder.pt")``): see
  :mod:`engine.models.dalle_encoder`.

The returned :class:`Tokenizer` is frozen (no grad, eval mode, ``train()`` is a no-op) and maps the
tokenizer's input to ids ``int64 [B, h, w]`` in ``[0, vocab_size)``: dVAE (and DALL-E) take pixels mapped
``0.8 x + 0.1`` with ``h = H / cell``; VQ-KD takes ImageNet-normalised images with ``h = H / patch``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

TOKENIZER_KINDS = ("dvae", "vqkd", "dalle")


class Tokenizer(nn.Module):
    """A frozen tokenizer: ``forward(x) -> ids [B, h, w]``; ``kind``, ``vocab_size``, ``cell`` (pixels per
    token side) and ``input_space`` ("dvae": mapped [0.1, 0.9] pixels, "imagenet": normalised images)."""

    def __init__(self, kind: str, net: nn.Module, source: str = ""):
        super().__init__()
        if kind not in TOKENIZER_KINDS:
            raise ValueError(f"kind must be one of {TOKENIZER_KINDS}, got {kind!r}")
        self.kind, self.net, self.source = kind, net, source
        self.vocab_size = int(net.vocab_size)
        self.cell = int(net.cell if kind in ("dvae", "dalle") else net.patch_size)
        self.input_space = "imagenet" if kind == "vqkd" else "dvae"
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True):  # always frozen in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[2] % self.cell or x.shape[3] % self.cell:
            raise ValueError(
                f"tokenizer input: expected [B, 3, H, W] with H, W divisible by {self.cell}, got "
                f"{tuple(x.shape)}"
            )
        with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 ids: no near-tie flips
            return self.net.get_codebook_indices(x.float())

    def extra_repr(self) -> str:
        return f"kind={self.kind}, vocab_size={self.vocab_size}, cell={self.cell}, source={self.source!r}"


def _build(kind: str, config: dict) -> nn.Module:
    if kind == "dvae":
        from engine.models.dvae import DVAE

        return DVAE(**config)
    if kind == "vqkd":
        from engine.models.vqkd import VQKD

        return VQKD(**config)
    raise ValueError(f"tokenizer kind must be 'dvae' or 'vqkd', got {kind!r}")


def _from_state(kind: str, state_dict: dict, source: str) -> Tokenizer:
    config = state_dict.get("_extra_state")
    if not isinstance(config, dict):
        raise ValueError(
            f"{source}: the {kind} tokenizer weights carry no architecture (missing _extra_state)"
        )
    net = _build(kind, config)
    net.load_state_dict(state_dict)
    return Tokenizer(kind, net, source)


def save_tokenizer(tok: nn.Module, path: str | Path) -> Path:
    """Write a standalone tokenizer file (a :class:`Tokenizer`, a DVAE or a VQKD)."""
    net = tok.net if isinstance(tok, Tokenizer) else tok
    kind = type(net).__name__.lower()
    if kind not in ("dvae", "vqkd"):
        raise TypeError(f"tok: expected a Tokenizer, DVAE or VQKD, got {type(tok).__name__}")
    path = Path(path)
    torch.save({"kind": kind, "config": dict(net.config), "state_dict": net.state_dict()}, path)
    return path


def load_tokenizer(
    path: str | Path, kinds: tuple[str, ...] = TOKENIZER_KINDS, map_location="cpu"
) -> Tokenizer:
    """The frozen tokenizer stored at ``path`` (see the module docstring); ``kinds`` restricts what is
    accepted (beit: dvae or dalle; beitv2: vqkd)."""
    p = Path(path)
    if p.is_dir():
        from engine.trainer.checkpoint import LAST

        p = p / LAST
    if not p.is_file():
        raise FileNotFoundError(f"--tokenizer: no tokenizer checkpoint at {p}")
    from engine.trainer.checkpoint import CheckpointError, load

    try:
        state = load(p, map_location=map_location)
    except CheckpointError as exc:
        raise ValueError(f"--tokenizer {exc}") from None
    if not isinstance(state, dict):
        raise ValueError(f"--tokenizer {p}: expected a checkpoint dict, got {type(state).__name__}")
    if "model" in state and "method" in state:  # a pre-training checkpoint of this engine
        kind = state["method"]
        if kind not in ("dvae", "vqkd"):
            raise ValueError(
                f"--tokenizer {p}: a checkpoint of --method {kind}, not of a tokenizer "
                f"(train one with --method dvae or --method vqkd)"
            )
        sub = {k[len("tokenizer.") :]: v for k, v in state["model"].items() if k.startswith("tokenizer.")}
        tok = _from_state(kind, sub, str(p))
    elif "kind" in state and "state_dict" in state:
        kind = state["kind"]
        net = _build(kind, state["config"])
        net.load_state_dict(state["state_dict"])
        tok = Tokenizer(kind, net, str(p))
    elif any(k.startswith("blocks.group_1.") for k in state):
        from engine.models.dalle_encoder import DalleEncoder

        tok = Tokenizer("dalle", DalleEncoder.from_state_dict(state), str(p))
    else:
        raise ValueError(
            f"--tokenizer {p}: not a dvae/vqkd checkpoint of this engine, a save_tokenizer file or "
            f"a DALL-E encoder state dict"
        )
    if tok.kind not in kinds:
        raise ValueError(f"--tokenizer {p}: a {tok.kind} tokenizer, this method needs {' or '.join(kinds)}")
    return tok
