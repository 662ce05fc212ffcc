"""One optimizer step (forward + backward + AdamW + method hooks) of SimMIM and DINO.

CPU cases use the tiny CPU backbone on 32-px inputs; the CUDA cases use ViT-B/16 at 224 px in bf16.
Throughput (images/s) is recorded in extra_info.
"""

import pytest
import torch

import kernels
from engine.methods import build_method


def _simmim(model, size, batch, device):
    cfg = dict(model=model, image_size=size, mask_ratio=0.6, drop_path=0.1, init_values=0.1, qv_bias=True,
               use_shared_rel_pos_bias=True, use_abs_pos_emb=False, pool="mean")
    m = build_method("simmim", cfg).to(device)
    patch = m.patch
    b = {"images": torch.randn(batch, 3, size, size, device=device),
         "mask": kernels.simmim_masks(batch, size, m.mask_patch, patch, 0.6, seed=0).to(device)}
    return m, b


def _dino(model, size, batch, device, out_dim, local):
    cfg = dict(model=model, image_size=size, out_dim=out_dim, head_hidden_dim=2048 if out_dim > 4096 else 256,
               bottleneck_dim=256 if out_dim > 4096 else 64, local_crops=local, drop_path=0.1, pool="cls",
               use_abs_pos_emb=True, warmup_teacher_temp_epochs=1)
    m = build_method("dino", cfg).to(device)
    ls = size * 96 // 224 // m.student.backbone.patch_size * m.student.backbone.patch_size
    crops = [torch.randn(batch, 3, size, size, device=device) for _ in range(2)]
    crops += [torch.randn(batch, 3, ls, ls, device=device) for _ in range(local)]
    return m, {"crops": crops}


def _step_fn(m, batch, dtype):
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    m.set_progress(0, 1, {"momentum": 0.996, "teacher_temp": 0.04})
    dev = next(m.parameters()).device

    def step():
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss = m(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        m.after_backward()
        opt.step()
        m.after_step()

    return step


CASES_CPU = [("simmim", "vit_pico", 32, 32), ("dino", "vit_pico", 32, 32)]


@pytest.mark.parametrize("method,model,size,batch", CASES_CPU)
def test_train_step_cpu(bench, method, model, size, batch):
    torch.manual_seed(0)
    m, b = _simmim(model, size, batch, "cpu") if method == "simmim" else _dino(model, size, batch, "cpu", 1024, 2)
    bench(_step_fn(m, b, None), kernel=f"train_step_{method}", provider="ours", shape=f"{model} B{batch} S{size}",
          dtype=torch.float32, device="cpu", rounds=5, images_per_call=batch)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["simmim", "dino"])
def test_train_step_cuda_vit_base(bench, method):
    torch.manual_seed(0)
    batch = 64
    if method == "simmim":
        m, b = _simmim("vit_base", 224, batch, "cuda")
    else:
        m, b = _dino("vit_base", 224, batch, "cuda", 65536, 8)
    bench(_step_fn(m, b, torch.bfloat16), kernel=f"train_step_{method}", provider="ours",
          shape=f"vit_base B{batch} S224", dtype=torch.bfloat16, device="cuda", rounds=10, images_per_call=batch)
