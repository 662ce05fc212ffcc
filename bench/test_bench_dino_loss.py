"""DINO's loss over the head's output dims: ours (``engine.methods.dino.dino_loss``) vs the per-pair anchor.

The anchor (the formulation of the public DINO code) recomputes ``log_softmax`` of a student crop for every
teacher view it is paired with: 2 x (n_crops - 1) log-softmaxes over [B, K]. Ours computes each crop's
log-softmax once and subtracts the paired crop's term from the sum over crops, so it reads the logits
about half as often. Both in fp32 (as DINO runs its loss), forward and forward+backward (grad of the student
logits).

GPU shape: B=128 per crop, 2 global + 8 local crops, K=65,536 (PERFORMANCE.md: ~740 MB fwd+bwd, ~220 us
floor on an H100). CPU shape: B=16, 2 + 2 crops, K=4,096.
bytes_moved: the minimal traffic: student [n_crops*B, K] + teacher [2*B, K] read (+ student grad written).
"""

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import COMPILE, DRY_RUN, GPU, sized
from engine.methods.dino import dino_loss

GPU_CASE = {**sized({"B": 128, "crops": 10, "K": 65536}, {"B": 4, "crops": 4, "K": 512}), "device": str(GPU)}
CPU = {"B": 16, "crops": 4, "K": 4096, "device": "cpu"}
CASES = [pytest.param(GPU_CASE, marks=[pytest.mark.cuda, pytest.mark.headline], id="gpu-vits-65536"),
         pytest.param(CPU, id="cpu-small")]
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


def per_pair_loss(student_out, teacher_out, center, n_crops, n_global, student_temp, teacher_temp):
    """The anchor: one log_softmax per (teacher view, student view) pair."""
    s = (student_out.float() / student_temp).chunk(n_crops)
    t = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1).detach().chunk(n_global)
    total, terms = 0.0, 0
    for it, q in enumerate(t):
        for iv, logits in enumerate(s):
            if iv == it:
                continue
            total = total + (-q * F.log_softmax(logits, dim=-1)).sum(-1).mean()
            terms += 1
    return total / terms


@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["ours", "reference", COMPILE])
@pytest.mark.parametrize("case", CASES)
def test_bench_dino_loss(bench, case, provider, phase):
    B, n, K, dev = case["B"], case["crops"], case["K"], torch.device(case["device"])
    g = torch.Generator(device="cpu").manual_seed(0)
    student = torch.randn(n * B, K, generator=g).to(dev).requires_grad_(phase != "fwd")
    teacher = torch.randn(2 * B, K, generator=g).to(dev)
    center = torch.randn(1, K, generator=g).to(dev) * 0.1
    args = (student, teacher, center, n, 2, STUDENT_TEMP, TEACHER_TEMP)
    fn = {"ours": dino_loss, "reference": per_pair_loss}.get(provider)
    if provider == "compile":
        if dev.type != "cuda" or DRY_RUN:
            pytest.skip("torch.compile provider is benchmarked on CUDA only")
        fn = torch.compile(per_pair_loss)
    torch.testing.assert_close(fn(*args), per_pair_loss(*args), rtol=1e-4, atol=1e-4)

    def call():
        if phase == "fwd":
            with torch.no_grad():
                return fn(*args)
        return torch.autograd.grad(fn(*args), [student])

    nbytes = (n * B * K + 2 * B * K) * 4 + (n * B * K * 4 if phase != "fwd" else 0)
    bench(call, kernel="dino_loss", provider=provider, shape=f"B{B} crops{n} K{K} {phase}", dtype=torch.float32,
          device=dev, bytes_moved=nbytes)
