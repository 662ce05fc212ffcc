"""One optimizer step of every method, end to end: ``Trainer.train_step`` (schedules, forward, backward, grad
clipping, AdamW, the method's hooks such as the DINO teacher EMA) on a synthetic batch of the method's own
layout (masks from the method's own mask generator).

Providers, side by side in one run:

* ``ours``: the engine as it dispatches by default (Triton kernels on CUDA, C++ kernels on CPU);
* ``reference``: the same step with every op forced to this engine's pure-PyTorch reference
  (``kernels.use_backend("reference")``): what the methods cost without our kernels;
* ``compile``: ``torch.compile`` of the method under the reference backend (CUDA only: compiling these
  models on a 2-core CPU takes minutes; skipped with the compiler's error when it fails).

CPU cases: the CPU presets of ``engine/configs/default.yaml`` (vit_pico / resnet_femto, 32 px, batch 32).
CUDA cases: the paper-sized presets (ViT-B/16 for SimMIM/BEiT/BEiT v2, ViT-S/16 with 2x224 + 8x96 crops and a
65536-d head for DINO, ResNet-50 for SparK, 224 px) in bf16, batch 64; the tokenizers of BEiT / BEiT v2 are
randomly initialised DALL-E-sized dVAE / ViT-B VQ-KD (their cost, not their quality, matters here).
Recorded: median step time, images/s and, on CUDA, peak allocated memory of one step. With timm installed,
the CUDA run adds a peer row per method: the same-sized timm backbone's own training step (see TIMM_PEERS).
"""

from __future__ import annotations

import pytest
import torch

from bench.conftest import COMPILE, DRY_RUN, GPU, peak_memory
from engine.methods import build_method, get_method
from engine.tokenizers import save_tokenizer
from engine.trainer import Trainer
from engine.trainer.config import resolve
from engine.trainer.distributed import DistInfo
from kernels import use_backend

METHODS = ["simmim", "beit", "beitv2", "spark", "dino"]
CUDA_PRESETS = {
    "simmim": "simmim_vit_base",
    "beit": "beit_vit_base",
    "beitv2": "beitv2_vit_base",
    "spark": "spark_resnet50",
    "dino": "dino_vit_small",
}
TOKENIZER_PRESETS = {  # method -> (tokenizer method, CPU preset, CUDA preset)
    "beit": ("dvae", None, "dvae_dalle"),
    "beitv2": ("vqkd", None, "vqkd_vit_base"),
}


def _cfg(method: str, cuda: bool, tmp: str, **over) -> dict:
    cli = {"method": method, "output_dir": tmp, "final_knn": False, "max_steps": 1000, "num_threads": 1}
    if cuda and not DRY_RUN:
        cli.update(config=CUDA_PRESETS.get(method), batch_size=64, precision="bf16")
    else:  # the CPU presets (also the CUDA cases under the GPU plan's dry run, smaller batch)
        cli.update(batch_size=8 if DRY_RUN else 32)
    cli.update(over)
    cli = {k: v for k, v in cli.items() if v is not None}
    return resolve(cli, method_defaults_fn=lambda m: get_method(m).defaults)


def _tokenizer_file(method: str, cuda: bool, tmp_path) -> str | None:
    if method not in TOKENIZER_PRESETS:
        return None
    kind, cpu_preset, cuda_preset = TOKENIZER_PRESETS[method]
    tok_cfg = _cfg(kind, cuda, str(tmp_path / kind), config=cuda_preset if cuda and not DRY_RUN else cpu_preset)
    tok = build_method(kind, tok_cfg).tokenizer
    return str(save_tokenizer(tok, tmp_path / f"{kind}.pt"))


def synthetic_batch(method, cfg: dict, device) -> dict:
    """A batch with the keys, shapes and value ranges the method's data pipeline produces."""
    B, S = int(cfg["batch_size"]), int(cfg["image_size"])
    kw = method.loader_kwargs()
    if cfg["method"] == "dino":
        from engine.data import default_local_size

        ls = int(kw.get("local_size") or default_local_size(S))
        crops = [torch.randn(B, 3, S, S) for _ in range(2)] + [torch.randn(B, 3, ls, ls) for _ in range(kw["local_crops"])]
        return {"crops": [c.to(device) for c in crops]}
    batch = {"images": torch.randn(B, 3, S, S)}
    if "mask_fn" in kw:
        batch.update(kw["mask_fn"](B, 0))
    if "tokenizer_size" in kw:
        t = int(kw["tokenizer_size"])
        batch["tokenizer_images"] = torch.rand(B, 3, t, t)
    return {k: v.to(device) for k, v in batch.items()}


class _OneBatchLoader:
    """What Trainer needs of a loader to be built (its length) and to checkpoint (never called here)."""

    def __len__(self):
        return 1000

    def state_dict(self):
        return {}


def _train_step(method: str, provider: str, cuda: bool, tmp_path):
    device = GPU if cuda else torch.device("cpu")
    cfg = _cfg(method, cuda, str(tmp_path / "run"))
    tok = _tokenizer_file(method, cuda, tmp_path)
    if tok is not None:
        cfg["tokenizer"] = tok
    torch.manual_seed(0)
    m = build_method(method, cfg)
    trainer = Trainer(m, _OneBatchLoader(), cfg, DistInfo(device=device))
    if provider == "compile":
        trainer.model = torch.compile(trainer.method)
    batch = synthetic_batch(m, cfg, device)
    backend = None if provider == "ours" else "reference"

    def step():
        if backend is None:
            return trainer.train_step([batch], 0)
        with use_backend(backend):
            return trainer.train_step([batch], 0)

    return step, cfg


def _shape(cfg: dict) -> str:
    extra = f" +{cfg['local_crops']}x{cfg.get('local_size') or 'local'}" if cfg["method"] == "dino" else ""
    return f"{cfg['model']} B{cfg['batch_size']} S{cfg['image_size']}{extra}"


def _run(bench, method, provider, cuda, tmp_path, rounds):
    step, cfg = _train_step(method, provider, cuda, tmp_path)
    device = GPU if cuda else torch.device("cpu")
    try:
        step()  # warm-up outside the timing: allocator, autotuning, compilation
    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        if provider == "compile":
            pytest.skip(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        raise
    peak = peak_memory(step, device, above_baseline=False)
    dtype = torch.bfloat16 if cuda and not DRY_RUN else torch.float32
    bench(step, kernel=f"train_step_{method}", provider=provider, shape=_shape(cfg), dtype=dtype, device=device,
          rounds=rounds, images_per_call=int(cfg["batch_size"]), peak_memory_bytes=peak)


@pytest.mark.parametrize("provider", ["ours", "reference"])
@pytest.mark.parametrize("method", METHODS)
def test_train_step_cpu(bench, method, provider, tmp_path):
    if method == "spark" or provider == "ours":
        _run(bench, method, provider, False, tmp_path, rounds=5)
    else:  # on CPU "ours" dispatches the ViT methods' ops to the reference anyway: one row says it
        pytest.skip("on CPU the ViT methods' ops dispatch to the torch reference: identical to 'ours'")


@pytest.mark.cuda
@pytest.mark.parametrize("provider", [pytest.param("ours", marks=pytest.mark.headline, id="ours"),
                                      pytest.param("reference", marks=pytest.mark.headline, id="reference"), COMPILE])
@pytest.mark.parametrize("method", METHODS)
def test_train_step_cuda(bench, method, provider, tmp_path):
    if provider == "compile" and DRY_RUN:
        pytest.skip("torch.compile is not part of the dry run (minutes on a 2-core CPU)")
    _run(bench, method, provider, True, tmp_path, rounds=5)  # + the device timing: ~3 more steps


# timm peers: the same-sized public backbone (fused SDPA attention; BEiT's with its shared relative position
# bias as the attention mask) doing forward + backward + AdamW on the same images, with a trivial loss.
# Backbone only: no tokenizer, no MIM head, no mask token, no teacher -- a lower bound for a method built on it.
_BEIT_PT = dict(use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True)  # pre-training layout
TIMM_PEERS = {
    "simmim": ("beit_base_patch16_224", _BEIT_PT),
    "beit": ("beit_base_patch16_224", _BEIT_PT),
    "beitv2": ("beit_base_patch16_224", _BEIT_PT),
    "dino": ("vit_small_patch16_224", dict(dynamic_img_size=True)),
    "spark": ("resnet50", {}),  # dense convs on the masked image: what SparK's official code computes
}


@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
def test_train_step_cuda_timm_backbone(bench, method, tmp_path):
    timm = pytest.importorskip("timm", reason="timm is not installed")
    if DRY_RUN:
        pytest.skip("the timm peers are not part of the dry run")
    device = torch.device("cuda")
    cfg = _cfg(method, True, str(tmp_path / "run"))
    name, kwargs = TIMM_PEERS[method]
    net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    B, S = int(cfg["batch_size"]), int(cfg["image_size"])
    if method == "dino":
        from engine.data import default_local_size

        ls = int(cfg.get("local_size") or default_local_size(S))
        views = [torch.randn(2 * B, 3, S, S, device=device),
                 torch.randn(int(cfg["local_crops"]) * B, 3, ls, ls, device=device)]
    else:
        views = [torch.randn(B, 3, S, S, device=device)]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sum(net(v).float().square().mean() for v in views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    peak = peak_memory(step, device, above_baseline=False)
    bench(step, kernel=f"train_step_{method}", provider=f"timm-{name}-backbone", shape=_shape(cfg),
          dtype=torch.bfloat16, device=device, rounds=10, images_per_call=B, peak_memory_bytes=peak)
