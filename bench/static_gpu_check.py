"""Static GPU checks a CPU can make: every Triton kernel and launch config compiled as the JIT would build it.

    python -m bench.static_gpu_check                 # full sweep, sm_90 and sm_80 -> bench/results/static-sm90.md
    python -m bench.static_gpu_check --subset ci --ops attention --check --no-report --json -   (what tests run)

For each kernel and each launch configuration its launcher picks at the real shapes (the autotuner's every
config for the codebook lookup), the arguments are built as the launcher passes them -- real sizes, strides and
scalars, 16-byte-aligned pointers -- and handed to the JIT's own binder (``create_function_from_signature`` +
``JITFunction._pack_args`` of ``triton/runtime/jit.py``), so the signature carries exactly the JIT's
specialisation: integers equal to 1 become constants, integers and pointers divisible by 16 get
``tt.divisibility=16`` (``BaseBackend.parse_attr`` of ``triton/backends/compiler.py``). The old AOT tests used
plain ``i32`` everywhere and so compiled a different kernel from the one the GPU runs.

Each kernel is compiled for ``GPUTarget("cuda", 90, 32)`` (and 80) and checked:

* shared memory within the per-block limit (227 KiB on H100, 163 KiB on A100);
* registers and spills (the bundled ``ptxas -v``); a spill is a failure, autotune configs included (the
  launchers prune their candidate lists per architecture, so every config they can launch is checked);
* tensor-core use in the SASS (the bundled ``cuobjdump -sass``): ``HGMMA`` = wgmma (sm_90 warpgroup MMA),
  ``HMMA`` = mma.sync. Expected per dot: wgmma on sm_90 for bf16/fp16/tf32 operands when the dot's M tile is a
  multiple of 64 with a multiple of 4 warps, mma.sync otherwise (and on sm_80), none for IEEE fp32 dots (FMA).
  The report gives the verdict per kernel; mismatches are listed (not failures: a kernel author's decision).

``--subset ci`` is the representative subset the ahead-of-time tests run on 2 CPU cores (tests/_aot.py).

On the GPU machine the GPU plan (``python -m bench.gpu``) runs the sm_90 sweep first, in parallel over the
cores: the compiled kernels land in Triton's cache under the keys the JIT computes, so the tests and benches
that follow find them compiled (the plan logs how many kernels they still had to compile).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # the real compiler, not the interpreter (set before triton is imported)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from bench.shapes import SPARK_CONV_LAYERS as LAYERS  # noqa: E402 (Cin, Cout, kernel, stride, depthwise, input stride)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMEM_LIMIT = {80: 166912, 90: 232448}  # max shared memory per block (bytes, opt-in): A100, H100/H200
SMS = {80: 108, 90: 132}  # SM counts of A100 / H100 SXM (launchers size some grids by them)
BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
I64, U8, I32 = torch.int64, torch.uint8, torch.int32
OPS = ("attention", "window_attention", "codebook", "masked_token_scatter", "gather_masked", "masked_cross_entropy",
       "sparse_conv", "masked_bn")


class Ptr:
    """A pointer argument as the JIT sees a tensor: its dtype and address (16-byte aligned unless offset)."""

    def __init__(self, dtype, offset_bytes: int = 0):
        self.dtype = dtype
        self._ptr = (1 << 20) + offset_bytes

    def data_ptr(self):
        return self._ptr


@dataclasses.dataclass
class Case:
    op: str
    kernel: str  # "module:function"
    label: str
    args: list
    kwargs: dict
    expect: str = "none"  # sm_90 tensor-core expectation: "wgmma", "mma" or "none"
    no_spill: bool = True
    ci: bool = False
    sms: tuple = (90, 80)

    @property
    def kernel_name(self) -> str:
        return self.kernel.split(":")[1]


def _tc(dtype, precision: str | None = None) -> bool:
    """Do the dot operands go to tensor cores (bf16/fp16, or fp32 with TF32)?"""
    if dtype in (BF16, FP16):
        return True
    return dtype == FP32 and precision == "tf32"


def _expect(tc: bool, min_m: int, warps: int) -> str:
    if not tc:
        return "none"
    return "wgmma" if (min_m >= 64 and min_m % 64 == 0 and warps % 4 == 0) else "mma"


def _contig(*shape):
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return tuple(reversed(out))


# ------------------------------------------------------------------------------------------------------------
# attention (kernels/attn/attention_triton.py: attention_forward / attention_backward)

ATT = "kernels.attn.attention_triton"
# (label, B, H, N, d, dtype, fp32 matmul precision, bias kinds)
ATT_CASES = [
    ("vitb", 256, 12, 197, 64, BF16, None, ("shared", "none", "per-batch")),
    ("vitb", 256, 12, 197, 64, FP16, None, ("shared",)),
    ("vitb-tf32", 256, 12, 197, 64, FP32, "tf32", ("shared",)),
    ("vitb-ieee", 256, 12, 197, 64, FP32, "ieee", ("shared",)),
    ("d32", 256, 8, 197, 32, FP16, None, ("shared",)),
    ("d128", 256, 6, 197, 128, BF16, None, ("shared",)),
    ("d128-tf32", 256, 6, 197, 128, FP32, "tf32", ("none",)),
    ("dino-n37", 1024, 6, 37, 64, BF16, None, ("none",)),
    ("dino-n50", 1024, 6, 50, 64, BF16, None, ("none", "shared")),  # shared: the dbias band in registers
    ("n1024", 8, 4, 1024, 64, BF16, None, ("shared",)),
]


def attention_cases() -> list[Case]:
    from kernels.attn import attention_triton as tk

    cases = []
    cuda = torch.device("cuda")
    for label, B, H, N, d, dt, prec, kinds in ATT_CASES:
        precision = prec or "tf32"  # the launchers' dot_precision(): tf32 unless fp32 under "highest"
        tc = _tc(dt, precision)
        name = str(dt).replace("torch.", "")
        q = Ptr(dt)
        f32 = Ptr(FP32)
        cs = _contig(B, H, N, d)  # q/k/v/dO/out viewed [B, H, N, d] (same specialisation as the qkv views)
        scale = d**-0.5
        for sm in (90, 80):
            cap = (sm // 10, sm % 10)
            old = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("highest" if precision == "ieee" else "high")  # what _blocks reads
            try:
                fcfgs = tk.forward_configs(N, d, dt, cuda, capability=cap)
                bcfg = tk._blocks(N, d, dt, cuda, True, capability=cap)
            finally:
                torch.set_float32_matmul_precision(old)
            for kind in kinds:
                has_bias = kind != "none"
                # a bias shared over the batch reaches the kernels prepared (times log2e; bf16 for bf16 inputs)
                bias_log2 = kind == "shared"
                bias = (Ptr(BF16 if dt == BF16 else FP32) if bias_log2 else Ptr(FP32)) if has_bias else q
                sbias = {"shared": (0, N * N, N, 1), "per-batch": (H * N * N, N * N, N, 1), "none": (0, 0, 0, 0)}[kind]
                tag = f"{label} {name} N{N} d{d} bias={kind}"
                # forward: every autotune candidate (BLOCK_N is shared, so are the peeled tile counts)
                bn = fcfgs[0]["BLOCK_N"]
                peel = tk.peel_tiles(dt, fcfgs[0]["BLOCK_D"])  # the launchers' rule (fwd and dQ)
                for ci_, fcfg in enumerate(fcfgs):
                    opts = {"num_warps": fcfg["num_warps"], "num_stages": fcfg["num_stages"]}
                    blocks = {k: fcfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}
                    cand = f" candidate {ci_}: M{blocks['BLOCK_M']} w{opts['num_warps']}" if len(fcfgs) > 1 else ""
                    cases.append(Case(
                        "attention", f"{ATT}:_attention_fwd_kernel", tag + cand,
                        [q, q, q, bias, q, f32, *cs, *cs, *cs, *sbias, *cs, H, N, N, scale * tk.LOG2E],
                        dict(HAS_BIAS=has_bias, BIAS_LOG2=bias_log2, PRESCALE_Q=dt == FP32, PEEL=peel,
                             FULL_TILES=tk.full_tiles(N, bn, peel),
                             HAS_TAIL=N % bn != 0, HEAD_DIM=d, PRECISION=precision, UPCAST=False, **blocks, **opts),
                        _expect(tc, blocks["BLOCK_M"], opts["num_warps"]), sms=(sm,),
                        ci=(sm == 90 and label == "vitb" and dt == BF16 and kind == "shared")
                        or (sm == 90 and label == "vitb-ieee")))
                # backward: dQ (+ delta), then dK/dV (+ dbias, batch-grouped for a shared bias)
                bopts = {"num_warps": bcfg["num_warps"], "num_stages": bcfg["num_stages"]}
                bblocks = {k: bcfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}
                bm, bn = bblocks["BLOCK_M"], bblocks["BLOCK_N"]
                cases.append(Case(
                    "attention", f"{ATT}:_attention_bwd_dq_kernel", tag,
                    [q, q, q, bias, q, q, f32, f32, q, *cs, *cs, *cs, *sbias, *cs, *cs, *cs, H, N, N, scale,
                     scale * tk.LOG2E],
                    dict(HAS_BIAS=has_bias, BIAS_LOG2=bias_log2, PEEL=peel, FULL_TILES=tk.full_tiles(N, bn, peel),
                         HAS_TAIL=N % bn != 0, HEAD_DIM=d, PRECISION=precision, UPCAST=False, **bblocks, **bopts),
                    _expect(tc, bm, bopts["num_warps"]), sms=(sm,),
                    ci=(sm == 90 and label == "vitb" and dt == BF16 and kind == "shared")))
                modes = {"shared": (2, 0), "per-batch": (1,), "none": (0,)}[kind]
                for mode in modes:
                    kcfg = tk.dkdv_blocks(bcfg, N, mode == 2, cuda, capability=cap)
                    kblocks = {k: kcfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}
                    k_tiles = math.ceil(N / kblocks["BLOCK_N"])
                    per_group, groups = 1, B
                    if mode == 2:
                        groups = tk._batch_groups(k_tiles * H, B, cuda, sms=SMS[sm])
                        per_group = math.ceil(B / groups)
                        groups = math.ceil(B / per_group)
                    db_strides = {0: (0, 0, 0, 0), 1: _contig(B, H, N, N), 2: _contig(groups, H, N, N)}[mode]
                    cases.append(Case(
                        "attention", f"{ATT}:_attention_bwd_dkdv_kernel",
                        f"{tag} dbias_mode={mode}" + (f" group={per_group}" if mode == 2 else "")
                        + f" {kblocks['BLOCK_N']}x{kblocks['BLOCK_M']}",
                        [q, q, q, bias, q, f32, f32, q, q, f32, *cs, *cs, *cs, *sbias, *cs, *cs, *cs, *db_strides,
                         B, H, N, N, scale, scale * tk.LOG2E],
                        dict(HAS_BIAS=has_bias, BIAS_LOG2=bias_log2, DBIAS_MODE=mode, GROUP=per_group,
                             Q_TILES=math.ceil(N / kblocks["BLOCK_M"]), ONE_Q_TILE=N <= kblocks["BLOCK_M"], HEAD_DIM=d,
                             PRECISION=precision, UPCAST=False, **kblocks, **bopts),
                        # every dK/dV dot has the key tile as its M dim (k q^T, v dO^T, p^T dO, ds^T q)
                        _expect(tc, kblocks["BLOCK_N"], bopts["num_warps"]), sms=(sm,),
                        ci=(label == "vitb" and dt == BF16 and kind == "shared" and mode == 2)))
    return cases


# ------------------------------------------------------------------------------------------------------------
# Swin window attention (kernels/attn/window_attention_triton.py)

WA = "kernels.attn.window_attention_triton"


def _window_attention_case_pair(tag, BW, nW, H, N, d, dt, prec, shifted, ci=False) -> list[Case]:
    """The forward and (per SM count) backward launch of one [BW, H, N, d] window attention call with the bias
    and, when ``shifted``, an [nW, N, N] mask: the launchers' tiles, options, precision and image groups, on the
    SMs whose backend takes the call (``window_attention.capability_reasons``)."""
    from kernels.attn import window_attention_triton as wt
    from kernels.attn.window_attention import capability_reasons

    sms = tuple(sm for sm in (90, 80) if not capability_reasons(dt, N, d, (sm // 10, sm % 10)))

    x = Ptr(dt)
    xs = (N * 3 * H * d, d, 3 * H * d, 1)  # q, k, v: views of one [BW, N, 3, H, d] projection
    os_ = (N * H * d, d, H * d, 1)  # outputs and dO: [BW, N, H, d] buffers viewed [BW, H, N, d]
    cfg = wt._blocks(N, d)
    tc = _tc(dt, prec)
    tag = f"{tag} {str(dt)[6:]}{'-' + prec if dt == FP32 else ''} BW{BW} H{H} N{N} d{d}" + (" +mask" if shifted else "")
    mask = Ptr(FP32) if shifted else x
    nw = nW if shifted else 1
    fo = wt._options(cfg, dt, False, prec)
    cases = []
    for sm in sms:  # the launchers' image groups depend on the SM count
        rows, groups = wt.image_groups(BW // nw, nw * H, SMS[sm], per_sm=wt.FWD_PROGRAMS_PER_SM)
        cases.append(Case(
            "window_attention", f"{WA}:_window_attention_fwd_kernel", f"{tag} {groups}x{rows} images",
            [x, x, x, Ptr(FP32), mask, x, *xs, *os_, BW // nw, H, nw, N, d, rows, d**-0.5 * 1.4426950408889634],
            dict(HAS_BIAS=True, HAS_MASK=shifted, PRECISION=prec, UPCAST=False, **cfg, **fo),
            _expect(tc, cfg["BLOCK"], fo["num_warps"]), ci=ci, sms=(sm,)))
    bo = wt._options(cfg, dt, backward=True)
    bprec = wt.backward_precision(dt, cfg, prec)
    tc = _tc(dt, bprec)
    btag = tag + (f" ({bprec} dots)" if bprec != prec else "")
    for sm in sms:
        rows, groups = wt.image_groups(BW // nw, nw * H, SMS[sm])
        cases.append(Case(
            "window_attention", f"{WA}:_window_attention_bwd_kernel", f"{btag} {groups}x{rows} images",
            [x, x, x, Ptr(FP32), mask, x, x, x, x, Ptr(FP32), *xs, *os_, *os_, BW // nw, H, nw, N, d, rows,
             d**-0.5, d**-0.5 * 1.4426950408889634],
            dict(HAS_BIAS=True, HAS_MASK=shifted, NEED_DBIAS=True, PRECISION=bprec, UPCAST=False, **cfg, **bo),
            _expect(tc, cfg["BLOCK"], bo["num_warps"]), ci=ci, sms=(sm,)))
    return cases


def window_attention_cases() -> list[Case]:
    """Swin-B's four stages at batch 128 (192 px / window 6, 224 px / window 7; d = 32) in bf16, stage 1 also in
    fp16 and fp32 (IEEE: the default "highest" matmul precision, and TF32); the other tile sizes the launcher
    picks: 4x4 windows at d 16 (swin_pico, 16 x 16 tiles), 5x5 (32 x 32) and the largest, 8x8 at d 64."""
    cases = []
    for img, window in ((192, 6), (224, 7)):
        grid, N, d = img // 4, window * window, 32
        for i, H in enumerate((4, 8, 16, 32)):  # Swin-B stages at batch 128
            side = grid // 2**i
            nW = (side // window) ** 2
            runs = [(BF16, "tf32"), (FP16, "tf32"), (FP32, "ieee"), (FP32, "tf32")] if i == 0 else [(BF16, "tf32")]
            for dt, prec in runs:
                cases += _window_attention_case_pair(f"swinb{img} stage {i + 1}", 128 * nW, nW, H, N, d, dt, prec,
                                                     i < 3, ci=img == 224 and i == 0 and prec == "tf32" and dt != FP16)
    for tag, BW, nW, H, N, d in (("pico", 256, 4, 2, 16, 16), ("w5", 512, 4, 4, 25, 32), ("w8-d64", 512, 4, 4, 64, 64)):
        for dt, prec in ((BF16, "tf32"), (FP32, "ieee"), (FP32, "tf32")):
            cases += _window_attention_case_pair(tag, BW, nW, H, N, d, dt, prec, True)
    return cases


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ------------------------------------------------------------------------------------------------------------
# VQ-KD codebook (kernels/codebook/nearest_code_triton.py, kernels/codebook/ema_codebook_update_triton.py)

CB = "kernels.codebook.nearest_code_triton"
CB_EMA = "kernels.codebook.ema_codebook_update_triton"


def codebook_cases() -> list[Case]:
    import triton.language as tl

    from kernels.codebook import nearest_code_triton as tk

    M, K, D = 50_176, 8192, 32  # BEiT v2 tokenizer batch: 256 x 196 vectors, 8192 codes of 32 dims
    cases = []
    lookups = [  # (z dtype, dot operand dtype, input_precision, normalize)
        (FP32, FP32, "ieee", True), (FP32, FP32, "tf32", True), (FP32, FP32, "tf32x3", True),
        (BF16, BF16, "ieee", True), (FP16, FP16, "ieee", True), (FP32, FP32, "ieee", False),
        (FP32, FP32, "tf32x3", False), (BF16, BF16, "ieee", False), (FP32, FP32, "tf32", False),
        (FP16, FP16, "ieee", False),
    ]
    for zdt, dotdt, prec, norm in lookups:
        tc = dotdt in (BF16, FP16) or prec in ("tf32", "tf32x3")
        name = f"z={str(zdt)[6:]} dot={str(dotdt)[6:]}/{prec} {'cosine' if norm else 'l2'}"
        for sm in (90, 80):  # the configs the launcher autotunes for this dot on this architecture (pruned)
            for i, cfg in enumerate(tk._lookup_configs(tc, prec, (sm // 10, sm % 10))):
                kw = dict(cfg.kwargs)
                cases.append(Case(
                    "codebook", f"{CB}:_nearest_code_fwd_kernel",
                    f"{name} config {i}: M{kw['BLOCK_M']} K{kw['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}",
                    [Ptr(zdt), Ptr(FP32), Ptr(dotdt), Ptr(FP32), Ptr(FP32), Ptr(I64), Ptr(FP32), Ptr(FP32),
                     M, D, D, 1, D, 1e-12],
                    dict(K=K, NORMALIZE=norm, INPUT_PRECISION=prec, DOT_UPCAST=False, EMULATE_TF32=0,
                         SEPARATE_OUT=False, BLOCK_D=32, **kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                    _expect(tc, kw["BLOCK_M"], cfg.num_warps), sms=(sm,),
                    ci=sm == 90 and ((i == 0 and zdt == BF16 and norm) or (i == 0 and zdt == FP32 and prec == "ieee"
                                     and norm) or (i == 1 and prec == "tf32x3" and norm))))
    block_m, _ = tk.row_tiles(D)  # the launchers' tile (BLOCK_D = D = 32)
    for zdt in (FP32, BF16):
        cases.append(Case("codebook", f"{CB}:_nearest_code_bwd_kernel", f"z={str(zdt)[6:]}",
                          [Ptr(zdt), Ptr(FP32), Ptr(zdt), M, D, D, 1, D, 1, 1e-12],
                          dict(ACC=tl.float32, BLOCK_M=block_m, BLOCK_D=32, num_warps=4), ci=zdt == BF16))
    cases.append(Case("codebook", f"{CB_EMA}:_ema_scatter_kernel", "fp32 sums",
                      [Ptr(FP32), Ptr(I64), Ptr(FP32), Ptr(FP32), M, D, K, D, 1, 1e-5],
                      dict(NORMALIZE=True, BLOCK_M=block_m, BLOCK_D=32, num_warps=4), ci=True))
    for st in (FP32, FP64):
        cases.append(Case("codebook", f"{CB_EMA}:_ema_finalize_kernel", f"state {str(st)[6:]}",
                          [Ptr(st), Ptr(st), Ptr(st), Ptr(st), Ptr(I64), K, D, 0.99, 1.0 - 0.99, 1e-5],
                          dict(NORMALIZE=True, HAS_STEPS=True, BLOCK_K=block_m, BLOCK_D=32, num_warps=4),
                          ci=st == FP32))
    return cases


# ------------------------------------------------------------------------------------------------------------
# masked image modelling (kernels/masked/{masked_token_scatter,gather_masked,masked_cross_entropy}_triton.py)

MS = "kernels.masked"
MIM = (256, 196, 768, 75)  # B, N, D, k: BEiT ViT-B/16 pre-training


def masked_token_scatter_cases() -> list[Case]:
    import triton.language as tl

    from kernels.masked import masked_token_scatter_triton as triton_scatter

    B, N, D, _k = MIM
    N_out = N + 1
    cases = []
    for dt in (BF16, FP16, FP32):
        name = str(dt)[6:]
        acc = tl.float32
        br, bd = triton_scatter._fwd_blocks(D)
        cases.append(Case(
            "masked_token_scatter", f"{MS}.masked_token_scatter_triton:_masked_token_scatter_fwd_kernel",
            f"{name} B{B} N{N} D{D} cls+pos",
            [Ptr(dt), Ptr(U8), Ptr(FP32), Ptr(FP32), Ptr(FP32), Ptr(dt), B * N_out, N, D, N_out, 0,
             N * D, D, 1, N, 1, D, 1, 1, 1],
            dict(HAS_POS=True, HAS_CLS=True, ACC=acc, BLOCK_R=br, BLOCK_D=bd, num_warps=4), ci=dt == BF16))
        bn_, bd2 = triton_scatter._bwd_blocks(D)
        tiles = math.ceil(N_out / bn_) * math.ceil(D / bd2)
        splits = max(1, min(B, math.ceil(4 * SMS[90] / tiles)))
        rows = triton_scatter.BWD_ROWS  # the launcher rounds a split up to whole 4-row iterations
        per = math.ceil(math.ceil(B / splits) / rows) * rows
        cases.append(Case(
            "masked_token_scatter", f"{MS}.masked_token_scatter_triton:_masked_token_scatter_bwd_kernel",
            f"{name} B{B} split {per}",
            [Ptr(dt), Ptr(U8), Ptr(dt), Ptr(FP32), Ptr(FP32), B, N, D, N_out, N_out * D, D, 1, N, 1],
            dict(B_PER_SPLIT=per, HAS_CLS=True, NEED_X=True, NEED_TOK=True, NEED_COLSUM=True, ACC=acc,
                 ROWS=triton_scatter.BWD_ROWS, BLOCK_N=bn_, BLOCK_D=bd2, num_warps=triton_scatter.BWD_WARPS),
            ci=dt == BF16))
    return cases


def gather_masked_cases() -> list[Case]:
    from kernels.masked import gather_masked_triton

    B, N, D, k = MIM
    N_out = N + 1
    cases = []
    for dt in (BF16, FP16, FP32):
        e = torch.tensor([], dtype=dt).element_size()
        name = str(dt)[6:]
        gbn, gbd = gather_masked_triton._blocks(N, D)
        for fixed in (True, False):
            off = Ptr(U8) if fixed else Ptr(I64)
            # h = encoder_out[:, 1:] (a strided view one row in), as the trainer passes it
            cases.append(Case(
                "gather_masked", f"{MS}.gather_masked_triton:_gather_masked_fwd_kernel",
                f"{name} {'fixed k' if fixed else 'variable'}",
                [Ptr(dt, offset_bytes=D * e), Ptr(U8), off, Ptr(dt), D, N_out * D, D, 1, N, 1],
                dict(N=N, K=k if fixed else 0, FIXED=fixed, BLOCK_N=gbn, BLOCK_D=gbd, BLOCK_K=16, num_warps=4),
                ci=dt == BF16 and fixed))
            cases.append(Case(
                "gather_masked", f"{MS}.gather_masked_triton:_gather_masked_bwd_kernel",
                f"{name} {'fixed k' if fixed else 'variable'}",
                [Ptr(dt), Ptr(U8), off, Ptr(dt), D, D, 1, N, 1],
                dict(N=N, K=k if fixed else 0, FIXED=fixed, BLOCK_N=gbn, BLOCK_D=gbd, num_warps=4)))
    return cases


def masked_cross_entropy_cases() -> list[Case]:
    import triton
    import triton.language as tl

    from kernels.masked import masked_cross_entropy_triton as ce

    cases = []
    for dt in (BF16, FP32):
        name = str(dt)[6:]
        for V in (8192, 65536):
            block_v = triton.next_power_of_2(V) if V <= ce.MAX_SINGLE_PASS_V else ce.MULTI_PASS_BLOCK_V
            cases.append(Case(
                "masked_cross_entropy", f"{MS}.masked_cross_entropy_triton:_masked_cross_entropy_fwd_kernel",
                f"{name} V{V} BLOCK_V {block_v}",
                [Ptr(dt), Ptr(I64), Ptr(FP32), Ptr(I32), V, -100],
                dict(V=V, WRITE_GRAD=True, ACC=tl.float32, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4),
                ci=dt == BF16 and V == 8192))
    return cases


# ------------------------------------------------------------------------------------------------------------
# SparK sparse convolution at the ResNet-50 / ConvNeXt layer shapes (kernels/sparse_conv/sparse_conv2d_triton.py)

SC = "kernels.sparse_conv.sparse_conv2d_triton"


def sparse_conv_cases() -> list[Case]:
    from kernels.sparse_conv import sparse_conv2d_triton as tk

    batch, image = 32, 224
    cases = []
    runs = [(n, BF16) for n in LAYERS] + [(n, dt) for dt in (FP16, FP32)
                                          for n in ("rn50_l1_3x3", "rn50_l2_3x3s2", "cnxb_dw7_s1")]
    for name, dt in runs:
        cin, cout, k, stride, dw, in_stride = LAYERS[name]
        H = image // in_stride
        Ho = (H + 2 * (k // 2) - k) // stride + 1
        pad = k // 2
        conv = (stride, stride, pad, pad, 1, 1)
        tag = f"{name} {str(dt)[6:]} ({cin}->{cout} @{H})"
        ci = dt == BF16 and name in ("rn50_l1_3x3", "cnxb_dw7_s1")
        tc = dt in (BF16, FP16)  # fp32 runs tl.dot(input_precision="ieee"): FMA by design
        P = Ptr(dt)
        passes = [("fwd", False, H, H, Ho, Ho, cin, cout, True)]  # (pass, transposed, Hs, Ws, Hd, Wd, kdim, ndim, bias)
        if name != "rn50_stem_7x7s2":  # the image needs no gradient
            passes.append(("dx", True, Ho, Ho, H, H, cout, cin, False))
        for pname, transposed, Hs, Ws, Hd, Wd, kdim, ndim, has_bias in passes:
            if dw:
                bc = tk._blocks(ndim, 16, 64)
                cases.append(Case(
                    "sparse_conv", f"{SC}:_sparse_dwconv_fwd_kernel", f"{tag} {pname}",
                    [P, Ptr(U8), Ptr(I64), Ptr(I64), P, P, P, Hs, Ws, Hd, Wd, ndim, k, k, *conv],
                    dict(TRANSPOSED=transposed, HAS_BIAS=has_bias, ACC_F64=False, BLOCK_M=16, BLOCK_C=bc),
                    ci=ci and pname == "fwd"))
            else:
                bm, bn = 128, tk._blocks(ndim, 16, 64)
                for sm in (90, 80):  # the launcher's site_launch: (K step, warps) by dtype and architecture
                    bk = tk._blocks(kdim, 16, 32 if sm >= 90 and dt in (BF16, FP16) else 16)
                    warps = 8 if sm < 90 and dt == FP32 else 4
                    cases.append(Case(
                        "sparse_conv", f"{SC}:_sparse_conv_fwd_kernel", f"{tag} {pname}",
                        [P, Ptr(U8), Ptr(I64), Ptr(I64), P, P, P, Hs, Ws, Hd, Wd],
                        dict(KDIM=kdim, NDIM=ndim, KH=k, KW=k, SH=stride, SW=stride, PH=pad, PW=pad, DH=1, DW=1,
                             TRANSPOSED=transposed, HAS_BIAS=has_bias, USE_DOT=True, DOT_F32=False, ACC_F64=False,
                             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps),
                        _expect(tc, bm, warps), ci=ci and sm == 90, sms=(sm,)))
        # weight gradient: split over site blocks, fp32 partials
        n_dense = batch * Ho * Ho
        partial = k * k * (1 if dw else cin) * cout
        cap = max(1, (64 << 20) // (4 * partial))
        split = max(1, min(64, cap, math.ceil(n_dense / (32 * 4))))
        if dw:
            cases.append(Case(
                "sparse_conv", f"{SC}:_sparse_dwconv_wgrad_kernel", f"{tag} dW split {split}",
                [P, Ptr(U8), P, Ptr(I64), Ptr(I64), Ptr(FP32), Ptr(FP32), H, H, Ho, Ho, cout, k, *conv, split],
                dict(HAS_BIAS=True, ACC_F64=False, BLOCK_M=32, BLOCK_C=tk._blocks(cout, 16, 64)), ci=ci))
        else:
            bci, bco = tk._blocks(cin, 16, 32), tk._blocks(cout, 16, 64)
            cases.append(Case(
                "sparse_conv", f"{SC}:_sparse_conv_wgrad_kernel", f"{tag} dW split {split}",
                [P, Ptr(U8), P, Ptr(I64), Ptr(I64), Ptr(FP32), Ptr(FP32), H, H, Ho, Ho, cin, cout, k, *conv, split],
                dict(HAS_BIAS=True, USE_DOT=True, DOT_F32=False, ACC_F64=False, BLOCK_M=32, BLOCK_CI=bci,
                     BLOCK_CO=bco),
                _expect(tc, bci, 4), ci=ci))
    return cases + sparse_conv_unit_cases()


SCU = "kernels.sparse_conv.sparse_conv2d_units_triton"


def sparse_conv_unit_cases() -> list[Case]:
    """The unit-tiled kernels (SparK maps: 32-px units, so 32/stride sites per unit side at each scale) at B 32,
    224 px, sm_90 only: the launch plan from the launcher's own helpers (tiles, rows per unit, geometry of each
    parity class of a strided dx, the weight-gradient split for 132 SMs)."""
    from kernels.sparse_conv import sparse_conv2d_units_triton as tu

    batch, image = 32, 224
    Hc = image // 32
    n_units = batch * Hc * Hc
    cases = []
    runs = [(n, BF16) for n in LAYERS] + [(n, dt) for dt in (FP16, FP32)
                                          for n in ("rn50_l1_3x3", "rn50_l2_3x3s2", "cnxb_dw7_s1")]
    for name, dt in runs:
        cin, cout, k, stride, dw, in_stride = LAYERS[name]
        u_in = 32 // in_stride
        u_out = u_in // stride
        pad = k // 2
        pairs = ((k, k), (stride, stride), (pad, pad), (1, 1))
        tag = f"{name} {str(dt)[6:]} ({cin}->{cout}, units {u_in}->{u_out})"
        ci = dt == BF16 and name in ("rn50_l1_3x3", "cnxb_dw7_s1")
        tc = dt in (BF16, FP16)
        P = Ptr(dt)
        flags = dict(USE_DOT=True, DOT_F32=False, ACC_F64=False)
        passes = [("fwd", tu.geometry(*pairs, (u_out,) * 2, (u_in,) * 2, False), cin, cout, True)]
        if name != "rn50_stem_7x7s2":  # the image needs no gradient
            classes = [(rh, rw) for rh in range(stride) for rw in range(stride)] if dt == BF16 else [(0, 0)]
            passes += [(f"dx class {c}", tu.geometry(*pairs, (u_in,) * 2, (u_out,) * 2, True, c), cout, cin, False)
                       for c in classes]
        for pname, geom, kdim, ndim, has_bias in passes:
            lead = [P, Ptr(I32), Ptr(I32), Ptr(I64), P, P, P, n_units, Hc, Hc]
            if dw:
                cfg = tu.dw_blocks(ndim, dt, True)
                rows = tu.rows_plan(geom["S"], cfg["BLOCK_M"])
                cases.append(Case(
                    "sparse_conv", f"{SCU}:_unit_dwconv_kernel", f"{tag} {pname}", lead + [ndim],
                    dict(**geom, **rows, **cfg, **tu.WINDOW, HAS_BIAS=has_bias, ACC_F64=False),
                    ci=ci and pname == "fwd", sms=(90,)))
            else:
                cfg = tu.conv_blocks(kdim, ndim, dt, True)
                rows = tu.rows_plan(geom["S"], cfg["BLOCK_M"])
                # the launcher's split-K: programs of the whole pass (all parity classes of a strided dx)
                classes = stride * stride if pname.startswith("dx") else 1
                programs = tu.n_tiles(n_units, rows) * classes * math.ceil(ndim / cfg["BLOCK_N"])
                steps = math.ceil(k / (stride if pname.startswith("dx") else 1)) ** 2 * math.ceil(kdim / cfg["BLOCK_K"])
                splits = tu.split_k_rule(programs, steps, SMS[90])
                label = f"{tag} {pname}" + (f" split-K {splits}" if splits > 1 else "")
                cases.append(Case(
                    "sparse_conv", f"{SCU}:_unit_conv_kernel", label, lead + [kdim, ndim],
                    dict(**geom, **rows, **cfg, **tu.WINDOW, HAS_BIAS=has_bias, **flags, SPLIT_K=splits),
                    _expect(tc, cfg["BLOCK_M"], cfg["num_warps"]), ci=ci and pname == "fwd", sms=(90,)))
        geom = tu.geometry(*pairs, (u_out,) * 2, (u_in,) * 2, False)
        for key in ("TRANSPOSED", "CY0", "CX0", "CSH", "CSW", "CW", "TH0", "TW0", "TSH", "TSW", "NTH", "NTW"):
            geom.pop(key)
        cfg = tu.wgrad_blocks(cin, cout, dt, True, dw)
        rows = tu.rows_plan(geom["S"], cfg["BLOCK_M"])
        if dw:
            programs = k * k * math.ceil(cout / cfg["BLOCK_C"])
        else:
            programs = k * k * math.ceil(cin / cfg["BLOCK_CI"]) * math.ceil(cout / cfg["BLOCK_CO"])
        partial = k * k * (1 if dw else cin) * cout
        split = max(1, min(math.ceil(2 * SMS[90] / programs), max(1, (64 << 20) // (4 * partial)),
                           tu.n_tiles(n_units, rows)))
        lead = [P, P, Ptr(I32), Ptr(I32), Ptr(I64), Ptr(FP32), Ptr(FP32), n_units, Hc, Hc]
        common = dict(**geom, **rows, **cfg, **tu.WINDOW, SPLIT=split, N_ITER=0, HAS_BIAS=True, ACC_F64=False)
        if dw:
            cases.append(Case("sparse_conv", f"{SCU}:_unit_dwwgrad_kernel", f"{tag} dW split {split}",
                              lead + [cout], common, ci=ci, sms=(90,)))
        else:
            cases.append(Case("sparse_conv", f"{SCU}:_unit_wgrad_kernel", f"{tag} dW split {split}",
                              lead + [cin, cout], dict(**common, USE_DOT=True, DOT_F32=False),
                              _expect(tc, cfg["BLOCK_CI"], cfg["num_warps"]), ci=ci, sms=(90,)))
    return cases


# ------------------------------------------------------------------------------------------------------------
# masked batch norm (kernels/sparse_conv/masked_batch_norm_triton.py)

BNK = "kernels.sparse_conv.masked_batch_norm_triton"


def masked_bn_cases() -> list[Case]:
    from kernels.sparse_conv import masked_batch_norm_triton as tb

    B, C, H = 32, 256, 56  # ResNet-50 stage 1 at 224 px
    R, S = B * H * H, H * H
    cases = []
    for dt, layout in ((BF16, "channels_last"), (BF16, "nchw"), (FP32, "channels_last")):
        st = (S * C, 1, C) if layout == "channels_last" else (C * S, S, 1)
        x = Ptr(dt)
        a = Ptr(FP32)
        br, bc = tb._blocks(C, torch.device("cuda"))
        for mode in (0, 1, 2):
            cases.append(Case("masked_bn", f"{BNK}:_masked_bn_partial_kernel", f"{str(dt)[6:]} {layout} mode {mode}",
                              [x, x, Ptr(U8), a, a, a, a, R, S, C, *st, *st],
                              dict(MODE=mode, ACC_F64=False, BLOCK_R=br, BLOCK_C=bc, num_warps=4),
                              ci=dt == BF16 and layout == "channels_last" and mode == 2))
        br, bc = tb._blocks(C, torch.device("cuda"), apply=True)
        for mode in (0, 1):
            cases.append(Case("masked_bn", f"{BNK}:_masked_bn_apply_kernel", f"{str(dt)[6:]} {layout} mode {mode}",
                              [x, x, Ptr(U8), a, a, a, a, x, R, S, C, *st, *st, *st],
                              dict(MODE=mode, ACC_F64=False, BLOCK_R=br, BLOCK_C=bc, num_warps=4),
                              ci=dt == BF16 and layout == "channels_last" and mode == 1))
    return cases


BUILDERS = {"attention": attention_cases, "window_attention": window_attention_cases, "codebook": codebook_cases,
            "masked_token_scatter": masked_token_scatter_cases, "gather_masked": gather_masked_cases,
            "masked_cross_entropy": masked_cross_entropy_cases,
            "sparse_conv": sparse_conv_cases, "masked_bn": masked_bn_cases}


# ------------------------------------------------------------------------------------------------------------
# compile + inspect


def _tools():
    import triton

    b = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return {n: (b / n if (b / n).exists() else None) for n in ("ptxas", "cuobjdump", "nvdisasm")}


def jit_signature(fn, args, kwargs, target):
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` derives them for these arguments."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def compile_case(case: Case, sm: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod, name = case.kernel.split(":")
    fn = getattr(importlib.import_module(mod), name)
    out = {"op": case.op, "kernel": name, "case": case.label, "sm": sm, "expect": case.expect if sm == 90 else
           ("mma" if case.expect in ("wgmma", "mma") else "none"), "no_spill": case.no_spill,
           "warps": case.kwargs.get("num_warps", 4), "stages": case.kwargs.get("num_stages", 3)}
    t0 = time.perf_counter()
    try:
        params = [p.name for p in fn.params]
        given = params[: len(case.args)] + [k for k in case.kwargs if k in params]
        if sorted(given) != sorted(params) or len(case.args) > len(params):
            missing = [p for p in params if p not in given]
            raise TypeError(f"bench/static_gpu_check.py is out of date for {name}: its parameters are now {params} "
                            f"(not given here: {missing}); update the case to the launcher's arguments")
        target = GPUTarget("cuda", sm, 32)
        sig, consts, attrs, options = jit_signature(fn, case.args, dict(case.kwargs), target)
        ck = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=options.__dict__)
    except Exception as exc:  # noqa: BLE001 - reported per case
        out.update(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc) else ''}",
                   seconds=round(time.perf_counter() - t0, 1))
        return out
    # non-constexpr parameters the JIT turned into constants (== 1), and how many got tt.divisibility=16
    out["specialised"] = [n for i, (n, v) in enumerate(sig.items()) if v == "constexpr" and not fn.params[i].is_constexpr]
    out["divisible16"] = sum(1 for v in attrs.values() if v)
    out["shared"] = int(ck.metadata.shared)
    tools = _tools()
    with tempfile.TemporaryDirectory() as d:
        ptx = pathlib.Path(d, "k.ptx")
        ptx.write_text(ck.asm["ptx"])
        if tools["ptxas"]:
            arch = "sm_90a" if sm == 90 else f"sm_{sm}"
            info = subprocess.run([str(tools["ptxas"]), "-v", f"-arch={arch}", str(ptx), "-o",
                                   str(pathlib.Path(d, "k.o"))], capture_output=True, text=True, check=False).stderr
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
            r = re.search(r"Used (\d+) registers", info)
            out["spill_stores"] = int(m.group(1)) if m else None
            out["spill_loads"] = int(m.group(2)) if m else None
            out["registers"] = int(r.group(1)) if r else None
        sass = None
        cubin = pathlib.Path(d, "k.cubin")
        cubin.write_bytes(ck.asm["cubin"])
        if tools["cuobjdump"]:
            sass = subprocess.run([str(tools["cuobjdump"]), "-sass", str(cubin)], capture_output=True, text=True,
                                  check=False).stdout
        elif tools["nvdisasm"]:
            sass = subprocess.run([str(tools["nvdisasm"]), str(cubin)], capture_output=True, text=True,
                                  check=False).stdout
        if sass:
            out["hgmma"] = len(re.findall(r"\bHGMMA\.", sass))
            out["hmma"] = len(re.findall(r"\bHMMA\.", sass))
            out["sass_from"] = "cuobjdump" if tools["cuobjdump"] else "nvdisasm"
        else:  # no disassembler: the PTX says it too
            out["hgmma"] = ck.asm["ptx"].count("wgmma.mma_async")
            out["hmma"] = len(re.findall(r"\bmma\.sync", ck.asm["ptx"]))
            out["sass_from"] = "ptx"
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def verdict(r: dict) -> tuple[str, list[str]]:
    """("ok" | "FAIL" | "note", reasons)."""
    fails, notes = [], []
    if "error" in r:
        return "FAIL", [f"compile error: {r['error']}"]
    if r["shared"] > SMEM_LIMIT[r["sm"]]:
        fails.append(f"shared memory {r['shared']} B > {SMEM_LIMIT[r['sm']]} B")
    spills = r.get("spill_stores") or 0
    if spills:
        (fails if r["no_spill"] else notes).append(f"{spills} B register spills")
    found = "wgmma" if r.get("hgmma") else ("mma" if r.get("hmma") else "none")
    r["found"] = found
    if found != r["expect"]:
        notes.append(f"tensor cores: expected {r['expect']}, SASS has {found}")
    return ("FAIL" if fails else ("note" if notes else "ok")), fails + notes


def select(ops, subset: str, sms=(90, 80)) -> list[tuple[Case, int]]:
    out = []
    for op in ops:
        for case in BUILDERS[op]():
            if subset == "ci" and not case.ci:
                continue
            for sm in case.sms:
                if sm not in sms:
                    continue
                if subset == "ci" and sm != 90 and not (case.op == "attention" and "dkdv" in case.kernel):
                    continue
                out.append((case, sm))
    return out


def _worker(item):
    case, sm = item
    return compile_case(case, sm)


def render(results: list[dict], seconds: float) -> str:
    import triton

    lines = [
        "# Static GPU check: every Triton kernel as the JIT builds it, for sm_90 (and sm_80)",
        "",
        f"`python -m bench.static_gpu_check` (triton {triton.__version__}, torch {torch.__version__}); "
        f"{len(results)} compiles in {seconds:.0f}s on a CPU, no GPU. Arguments as each launcher passes them at the real "
        "shapes, specialised by the JIT's own binder (ints == 1 -> constants, ints/pointers % 16 == 0 -> "
        "`tt.divisibility=16`); every autotune config of the codebook lookup. `regs`/`spills` from `ptxas -v`; "
        "`HGMMA` (wgmma) / `HMMA` (mma.sync) counted in the SASS (`cuobjdump -sass`). Expected tensor cores: wgmma on "
        "sm_90 for bf16/fp16/tf32 dots with an M tile that is a multiple of 64 and a multiple of 4 warps, mma.sync "
        "otherwise and on sm_80, none for IEEE fp32 dots.",
        "",
    ]
    fails = [r for r in results if r["status"] == "FAIL"]
    notes = [r for r in results if r["status"] == "note"]
    lines += [f"**{len(results) - len(fails) - len(notes)} ok, {len(notes)} with notes, {len(fails)} failing.**", ""]
    if fails or notes:
        lines += ["## Failures and notes", "", "| sm | kernel | case | status | why |", "|---|---|---|---|---|"]
        for r in fails + notes:
            lines.append(f"| {r['sm']} | {r['kernel']} | {r['case']} | {r['status']} | {'; '.join(r['why'])} |")
        lines.append("")
    for sm in sorted({r["sm"] for r in results}, reverse=True):
        lines += [f"## sm_{sm}", "", "| op | kernel | case | warps/stages | regs | spills (B) | smem (KiB) | HGMMA | HMMA "
                  "| expected | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in results if r["sm"] == sm):
            if "error" in r:
                lines.append(f"| {r['op']} | {r['kernel']} | {r['case']} | {r['warps']}/{r['stages']} | - | - | - | - | "
                             f"- | {r['expect']} | FAIL: {r['error'][:120]} |")
                continue
            lines.append(
                f"| {r['op']} | {r['kernel']} | {r['case']} | {r['warps']}/{r['stages']} | {r.get('registers')} | "
                f"{r.get('spill_stores')} | {r['shared'] / 1024:.1f} | {r.get('hgmma')} | {r.get('hmma')} | "
                f"{r['expect']} | {r['status']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {', '.join(OPS)}")
    p.add_argument("--subset", choices=("full", "ci"), default="full")
    p.add_argument("--sm", default="90,80", help="compute capabilities to compile for (default 90,80)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results" / "static-sm90.md")
    p.add_argument("--no-report", action="store_true", help="do not write the markdown report")
    p.add_argument("--json", default=None, help="write the per-case results as JSON here ('-': stdout)")
    p.add_argument("--check", action="store_true", help="exit 1 if any case fails (compile error, smem, spills)")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    args = p.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    unknown = set(ops) - set(OPS)
    if unknown:
        raise SystemExit(f"unknown ops {sorted(unknown)}")
    items = select(ops, args.subset, tuple(int(x) for x in args.sm.split(",")))
    if args.list:
        for case, sm in items:
            print(f"sm_{sm} {case.kernel_name} {case.label}")
        return 0
    t0 = time.perf_counter()
    if args.jobs > 1 and len(items) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.jobs) as pool:
            results = pool.map(_worker, items, chunksize=1)
    else:
        results = [_worker(i) for i in items]
    for r in results:
        r["status"], r["why"] = verdict(r)
    secs = time.perf_counter() - t0
    if not args.no_report:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(results, secs))
        print(args.out, file=sys.stderr)
    if args.json:
        text = json.dumps(results, indent=1)
        if args.json == "-":
            print(text)
        else:
            pathlib.Path(args.json).write_text(text)
    failing = [r for r in results if r["status"] == "FAIL"]
    print(f"{len(results)} compiled in {secs:.0f}s: {len(failing)} failing, "
          f"{sum(r['status'] == 'note' for r in results)} with notes", file=sys.stderr)
    for r in failing:
        print(f"FAIL sm_{r['sm']} {r['kernel']} {r['case']}: {'; '.join(r['why'])}", file=sys.stderr)
    return 1 if (args.check and failing) else 0


if __name__ == "__main__":
    sys.exit(main())
