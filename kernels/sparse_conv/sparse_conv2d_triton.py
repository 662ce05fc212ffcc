"""Triton kernels of sparse convolution: implicit GEMM over the list of active sites (NHWC, zero halos).

The fallback for activity maps that are not unit-structured (arbitrary masks, or maps not built from a unit
mask); SparK's maps run the unit-tiled kernels of :mod:`kernels.sparse_conv.sparse_conv2d_units_triton`
(``SparseConv2dInputs.triton_path`` says which). Cost: FLOPs as there plus every tap of a mixed-parity strided
dx (4x at stride 2), an activity-map load and a block reduction per tap, a whole-output memset, ~25 launches per
layer fwd+bwd (the memsets, the partial sums; the site lists are cached per map).

Notation as in :mod:`kernels.sparse_conv.sparse_conv2d`; ``p(o, k)`` is the input site read by output site
``o`` at kernel offset ``k = kh * KW + kw``. Site lists are padded to the dense size (``active_site_index``;
built once per map and shared by the forward, dx and dW: ``cached_site_index``), and a device-side count makes
programs past the last active site exit at once, so no host sync sizes the grid. This file imports triton; it is imported lazily by the triton backend. Output buffers come from
``kernels._buffers``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _buffers
from kernels._backend import launches_on_input_device
from kernels._checks import acc_dtype
from kernels._triton_common import dot_acc
from kernels.sparse_conv.active import cached_site_index
from kernels.sparse_conv.layout import as_u8, out_or_empty, weight_grads_from_partials


@triton.jit
def _neighbour(
    s, m_ok, act_src, H_src, W_src, H_dst, W_dst, kh, kw, SH, SW, PH, PW, DH, DW, TRANSPOSED: tl.constexpr,
):
    """Row index (in the src grid) of the site that dst site ``s`` reads at offset (kh, kw), and its validity.

    forward (dst = output grid):  q = (b, oh*SH - PH + kh*DH, ow*SW - PW + kw*DW)
    transposed (dst = input grid, src = output grid, for dx): q = (b, (ih + PH - kh*DH)/SH, ...) when the
    division is exact. Valid iff in range and active in ``act_src``.
    """
    hw = H_dst * W_dst
    b = s // hw
    r = s % hw
    y = r // W_dst
    x = r % W_dst
    if TRANSPOSED:
        ty = y + PH - kh * DH
        tx = x + PW - kw * DW
        ok = m_ok & (ty >= 0) & (tx >= 0) & ((ty % SH) == 0) & ((tx % SW) == 0)
        qy = ty // SH
        qx = tx // SW
    else:
        qy = y * SH - PH + kh * DH
        qx = x * SW - PW + kw * DW
        ok = m_ok & (qy >= 0) & (qx >= 0)
    ok = ok & (qy < H_src) & (qx < W_src)
    q = (b * H_src + qy) * W_src + qx
    q = tl.where(ok, q, 0)
    a = tl.load(act_src + q, mask=ok, other=0)
    return q, ok & (a != 0)


@triton.jit
def _sparse_conv_fwd_kernel(
    src, act_src, sites, count, w, bias, dst, H_src, W_src, H_dst, W_dst, KDIM: tl.constexpr,
    NDIM: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH, SW, PH, PW, DH, DW, TRANSPOSED: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Implicit GEMM over a block of active dst sites x a block of dst channels.

    Channel counts and kernel sizes are compile-time constants (one compile per layer shape) so the
    channel loop has static bounds.

    forward:    dst[o, n] = bias[n] + sum_k sum_c src[p(o,k), c] * w[k, c, n]    (src = x, w = W[k, ci, co])
    transposed: dst[p, n] = sum_k sum_c src[o(p,k), c] * w[k, c, n]              (src = g, w = W[k, co, ci])
    Halo and inactive neighbours are masked loads (zeros); a kernel offset with no valid neighbour in the
    block is skipped.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_sites = tl.load(count)
    if pid_m * BLOCK_M >= n_sites:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < n_sites
    s = tl.load(sites + offs_m, mask=m_ok, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < NDIM
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC_F64 else tl.float32)
    for kh in range(KH):
        for kw in range(KW):
            q, ok = _neighbour(
                s, m_ok, act_src, H_src, W_src, H_dst, W_dst, kh, kw, SH, SW, PH, PW, DH, DW, TRANSPOSED
            )
            if tl.max(ok.to(tl.int32), axis=0) > 0:
                k = kh * KW + kw
                for c0 in range(0, KDIM, BLOCK_K):
                    offs_k = c0 + tl.arange(0, BLOCK_K)
                    k_ok = offs_k < KDIM
                    a = tl.load(
                        src + q[:, None].to(tl.int64) * KDIM + offs_k[None, :],
                        mask=ok[:, None] & k_ok[None, :],
                        other=0.0,
                    )
                    b = tl.load(
                        w + (k * KDIM + offs_k[:, None]).to(tl.int64) * NDIM + offs_n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0,
                    )
                    acc = dot_acc(acc, a, b, DOT_F32, USE_DOT)
    if HAS_BIAS:
        acc += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(acc.dtype)[None, :]
    tl.store(
        dst + s[:, None].to(tl.int64) * NDIM + offs_n[None, :],
        acc.to(dst.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _sparse_dwconv_fwd_kernel(
    src, act_src, sites, count, w, bias, dst, H_src, W_src, H_dst, W_dst, C, KH: tl.constexpr,
    KW: tl.constexpr, SH, SW, PH, PW, DH, DW, TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC_F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Depthwise: dst[o, c] = bias[c] + sum_k src[p(o,k), c] * w[k, c] (transposed: dx[p, c] from g)."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_sites = tl.load(count)
    if pid_m * BLOCK_M >= n_sites:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < n_sites
    s = tl.load(sites + offs_m, mask=m_ok, other=0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float64 if ACC_F64 else tl.float32)
    for kh in range(KH):
        for kw in range(KW):
            q, ok = _neighbour(
                s, m_ok, act_src, H_src, W_src, H_dst, W_dst, kh, kw, SH, SW, PH, PW, DH, DW, TRANSPOSED
            )
            k = kh * KW + kw
            a = tl.load(
                src + q[:, None].to(tl.int64) * C + offs_c[None, :],
                mask=ok[:, None] & c_ok[None, :],
                other=0.0,
            )
            wk = tl.load(w + k * C + offs_c, mask=c_ok, other=0.0)
            acc += a.to(acc.dtype) * wk.to(acc.dtype)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + offs_c, mask=c_ok, other=0.0).to(acc.dtype)[None, :]
    tl.store(
        dst + s[:, None].to(tl.int64) * C + offs_c[None, :],
        acc.to(dst.dtype.element_ty),
        mask=m_ok[:, None] & c_ok[None, :],
    )


@triton.jit
def _sparse_conv_wgrad_kernel(
    x, act_in, g, sites, count, dw_part, db_part, H, W, Ho, Wo, CIN, COUT, KW: tl.constexpr, SH, SW, PH, PW,
    DH, DW, SPLIT, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr,
    ACC_F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """dW[k, ci, co] = sum_o x[p(o,k), ci] * g[o, co] over the active o of this split (blocks pid_s, pid_s +
    SPLIT, ...); written to dw_part[pid_s] and summed on the host side of the launch (deterministic).
    With HAS_BIAS the (k = 0, ci-block 0) programs also write dbias partials sum_o g[o, co]."""
    pid_kc = tl.program_id(0)
    pid_co = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_ci = tl.cdiv(CIN, BLOCK_CI)
    k = pid_kc // n_ci
    cb = pid_kc % n_ci
    kh = k // KW
    kw = k % KW
    n_sites = tl.load(count)
    offs_ci = cb * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = offs_ci < CIN
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = offs_co < COUT
    acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float64 if ACC_F64 else tl.float32)
    accb = tl.zeros((BLOCK_CO,), dtype=acc.dtype)
    m0 = pid_s * BLOCK_M
    while m0 < n_sites:  # (a while loop: the interpreter cannot range() over a loaded scalar)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < n_sites
        s = tl.load(sites + offs_m, mask=m_ok, other=0)
        q, ok = _neighbour(s, m_ok, act_in, H, W, Ho, Wo, kh, kw, SH, SW, PH, PW, DH, DW, False)
        gb = tl.load(
            g + s[:, None].to(tl.int64) * COUT + offs_co[None, :],
            mask=m_ok[:, None] & co_ok[None, :],
            other=0.0,
        )
        xa = tl.load(
            x + q[:, None].to(tl.int64) * CIN + offs_ci[None, :], mask=ok[:, None] & ci_ok[None, :], other=0.0
        )
        acc = dot_acc(acc, tl.trans(xa), gb, DOT_F32, USE_DOT)
        if HAS_BIAS:
            accb += tl.sum(gb.to(accb.dtype), axis=0)
        m0 += SPLIT * BLOCK_M
    n_k = tl.num_programs(0) // n_ci
    base = ((pid_s.to(tl.int64) * n_k + k) * CIN + offs_ci[:, None]) * COUT + offs_co[None, :]
    tl.store(dw_part + base, acc, mask=ci_ok[:, None] & co_ok[None, :])
    if HAS_BIAS:  # noqa: SIM102 (constexpr guard around a runtime test)
        if pid_kc == 0:
            tl.store(db_part + pid_s * COUT + offs_co, accb, mask=co_ok)


@triton.jit
def _sparse_dwconv_wgrad_kernel(
    x, act_in, g, sites, count, dw_part, db_part, H, W, Ho, Wo, C, KW: tl.constexpr, SH, SW, PH, PW, DH, DW,
    SPLIT, HAS_BIAS: tl.constexpr, ACC_F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Depthwise dW[k, c] = sum_o x[p(o,k), c] * g[o, c] (split over site blocks, partials per split);
    the k = 0 programs also write dbias partials sum_o g[o, c]."""
    k = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    kh = k // KW
    kw = k % KW
    n_sites = tl.load(count)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float64 if ACC_F64 else tl.float32)
    accb = tl.zeros((BLOCK_C,), dtype=acc.dtype)
    m0 = pid_s * BLOCK_M
    while m0 < n_sites:  # (a while loop: the interpreter cannot range() over a loaded scalar)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < n_sites
        s = tl.load(sites + offs_m, mask=m_ok, other=0)
        q, ok = _neighbour(s, m_ok, act_in, H, W, Ho, Wo, kh, kw, SH, SW, PH, PW, DH, DW, False)
        gb = tl.load(
            g + s[:, None].to(tl.int64) * C + offs_c[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0
        ).to(acc.dtype)
        xa = tl.load(
            x + q[:, None].to(tl.int64) * C + offs_c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0
        ).to(acc.dtype)
        acc += tl.sum(xa * gb, axis=0)
        if HAS_BIAS:
            accb += tl.sum(gb, axis=0)
        m0 += SPLIT * BLOCK_M
    K = tl.num_programs(0)
    tl.store(dw_part + (pid_s.to(tl.int64) * K + k) * C + offs_c, acc, mask=c_ok)
    if HAS_BIAS:  # noqa: SIM102 (constexpr guard around a runtime test)
        if k == 0:
            tl.store(db_part + pid_s * C + offs_c, accb, mask=c_ok)


# ----------------------------------------------------------------------------------------------------------
# launchers (same signatures as kernels.sparse_conv.sparse_conv2d_native)


def _use_dot(dtype) -> bool:
    return dtype != torch.float64


def _dot_f32(t) -> bool:
    """Upcast bf16 dot operands to fp32 under the CPU interpreter (its bf16 tl.dot is wrong); never on GPU."""
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


def _blocks(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def site_launch(dtype, device) -> tuple[int, int]:
    """(largest K step, warps) of the site-list implicit GEMM on the GPU: (32, 4) on sm_90+ for 2-byte dtypes,
    else 16-deep steps, and 8 warps for IEEE fp32 before Hopper (every config spill-free in the static check)."""
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 9
    two_byte = dtype in (torch.bfloat16, torch.float16)
    return (32 if major >= 9 and two_byte else 16), (8 if major < 9 and dtype == torch.float32 else 4)


def _grid_sites(n_dense: int, block: int) -> int:
    return max(1, triton.cdiv(n_dense, block))


def _split(n_dense: int, block_m: int, device, partial_elems: int) -> int:
    """Number of site splits of the weight-gradient reduction: enough programs to fill the GPU, while the
    fp32 partials (``split x partial_elems``) stay under 64 MiB."""
    if device.type != "cuda":
        return 2
    cap = max(1, (64 << 20) // (4 * max(1, partial_elems)))
    return max(1, min(64, cap, triton.cdiv(n_dense, block_m * 4)))


def _conv_args(stride, padding, dilation):
    return (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])


def _gather_gemm(src, act_src, act_dst, w, bias, out, transposed, depthwise, kdim, ndim, geom):
    """``out[dst site, n] = sum_k sum_c src[neighbour, c] w[k, c, n]`` at the active dst sites (zeros elsewhere);
    ``geom = (H_src, W_src, H_dst, W_dst, KH, KW, stride, padding, dilation)``."""
    H_src, W_src, H_dst, W_dst, KH, KW, stride, padding, dilation = geom
    sites, count = cached_site_index(act_dst)
    out.view(-1, ndim)[:] = 0  # inactive rows (the kernel writes every active row)
    n_dense = sites.numel()
    acc64 = src.dtype == torch.float64
    common = (H_src, W_src, H_dst, W_dst)
    conv = _conv_args(stride, padding, dilation)
    bias_arg = bias if bias is not None else out
    flags = dict(TRANSPOSED=transposed, HAS_BIAS=bias is not None, ACC_F64=acc64)
    if depthwise:
        # 16 sites x 64 channels: the largest tile ptxas keeps in registers (sm_90, 49 taps; 32 x 64 spills)
        BM, BC = (16 if src.device.type == "cuda" else 32), _blocks(ndim, 16, 64)
        grid = (_grid_sites(n_dense, BM), triton.cdiv(ndim, BC))
        _sparse_dwconv_fwd_kernel[grid](
            src, as_u8(act_src), sites, count, w, bias_arg, out, *common, ndim, KH, KW, *conv,
            **flags, BLOCK_M=BM, BLOCK_C=BC,
        )
        return out
    if src.device.type == "cuda":
        # 128 sites x 64 channels x 32-deep K steps, 4 warps: no register spills on sm_90 for bf16/fp16 (ptxas -v;
        # the per-row gather addressing costs registers: 64 x 128 x 64 spilled ~2.8 KB per thread); 16-deep K
        # steps for IEEE fp32 and before Hopper (mma.sync), where 32 spilled 4-92 B (bench/static_gpu_check.py)
        bk, warps = site_launch(src.dtype, src.device)
        BM, BN, BK = 128, _blocks(ndim, 16, 64), _blocks(kdim, 16, bk)
    else:  # interpreter: small tiles keep the emulation fast
        BM, BN, BK, warps = 32, _blocks(ndim, 16, 64), _blocks(kdim, 16, 32), 4
    if acc64:  # fp64 runs the broadcast-multiply-sum path: keep the 3-D product small
        BM, BN, BK = 16, 16, 16
    grid = (_grid_sites(n_dense, BM), triton.cdiv(ndim, BN))
    _sparse_conv_fwd_kernel[grid](
        src, as_u8(act_src), sites, count, w, bias_arg, out, *common, kdim, ndim, KH, KW, *conv,
        **flags, USE_DOT=_use_dot(src.dtype), DOT_F32=_dot_f32(src), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        num_warps=warps,
    )
    return out


@launches_on_input_device
def forward(x_nhwc, active_in, active_out, weight, bias, stride, padding, dilation, depthwise, out=None):
    """``out[B, Ho, Wo, Cout]`` NHWC; inactive rows zero-filled, active rows computed by the kernel."""
    B, H, W, Cin = x_nhwc.shape
    Ho, Wo = active_out.shape[1:]
    Cout, cin_g, KH, KW = weight.shape
    x_nhwc = x_nhwc.contiguous()
    if depthwise:
        wp = weight.reshape(Cout, KH * KW).t().contiguous()
    else:
        wp = weight.permute(2, 3, 1, 0).reshape(KH * KW, cin_g, Cout).contiguous()
    out = out_or_empty(out, "out", (B, Ho, Wo, Cout), x_nhwc)
    geom = (H, W, Ho, Wo, KH, KW, stride, padding, dilation)
    bias = None if bias is None else bias.contiguous()
    return _gather_gemm(x_nhwc, active_in, active_out, wp, bias, out, False, depthwise, Cin, Cout, geom)


@launches_on_input_device
def backward_input(g_nhwc, active_in, active_out, weight, stride, padding, dilation, depthwise, out=None):
    """``dx[B, H, W, Cin]`` NHWC, zero at inactive input sites."""
    B, Ho, Wo, Cout = g_nhwc.shape
    H, W = active_in.shape[1:]
    _, cin_g, KH, KW = weight.shape
    Cin = Cout if depthwise else cin_g
    g_nhwc = g_nhwc.contiguous()
    if depthwise:
        wp = weight.reshape(Cout, KH * KW).t().contiguous()
    else:
        wp = weight.permute(2, 3, 0, 1).reshape(KH * KW, Cout, cin_g).contiguous()
    out = out_or_empty(out, "dx", (B, H, W, Cin), g_nhwc)
    geom = (Ho, Wo, H, W, KH, KW, stride, padding, dilation)
    return _gather_gemm(g_nhwc, active_out, active_in, wp, None, out, True, depthwise, Cout, Cin, geom)


@launches_on_input_device
def backward_weight(x_nhwc, g_nhwc, active_in, active_out, weight_shape, stride, padding, dilation, depthwise,
                    need_bias=True, out=None, out_bias=None):
    """``(dweight [Cout, Cin/groups, KH, KW], dbias [Cout] or None)`` (fp32/fp64 partials, summed here)."""
    _, H, W, Cin = x_nhwc.shape
    _, Ho, Wo, Cout = g_nhwc.shape
    _, _, KH, KW = weight_shape
    K = KH * KW
    x_nhwc, g_nhwc = x_nhwc.contiguous(), g_nhwc.contiguous()
    sites, count = cached_site_index(active_out)
    acc = acc_dtype(x_nhwc.dtype)
    dev = x_nhwc.device
    args = (x_nhwc, as_u8(active_in), g_nhwc, sites, count)
    geom = (H, W, Ho, Wo)
    conv = _conv_args(stride, padding, dilation)
    BM = 16 if acc == torch.float64 else 32
    split = _split(sites.numel(), BM, dev, K * (1 if depthwise else Cin) * Cout)
    # every partial is written by exactly one program (no atomics): uninitialised buffers are fine
    db_part = _buffers.empty((split, Cout), acc, dev)
    flags = dict(HAS_BIAS=need_bias, ACC_F64=acc == torch.float64, BLOCK_M=BM)
    if depthwise:
        BC = _blocks(Cout, 16, 64)
        dw_part = _buffers.empty((split, K, Cout), acc, dev)
        _sparse_dwconv_wgrad_kernel[(K, triton.cdiv(Cout, BC), split)](
            *args, dw_part, db_part, *geom, Cout, KW, *conv, split, **flags, BLOCK_C=BC,
        )
    else:
        BCI, BCO = (16, 16) if acc == torch.float64 else (_blocks(Cin, 16, 32), _blocks(Cout, 16, 64))
        dw_part = _buffers.empty((split, K, Cin, Cout), acc, dev)
        _sparse_conv_wgrad_kernel[(K * triton.cdiv(Cin, BCI), triton.cdiv(Cout, BCO), split)](
            *args, dw_part, db_part, *geom, Cin, Cout, KW, *conv, split, **flags,
            USE_DOT=_use_dot(x_nhwc.dtype), DOT_F32=_dot_f32(x_nhwc), BLOCK_CI=BCI, BLOCK_CO=BCO,
        )
    return weight_grads_from_partials(dw_part, db_part, weight_shape, x_nhwc.dtype, depthwise, need_bias, out,
                                      out_bias)
