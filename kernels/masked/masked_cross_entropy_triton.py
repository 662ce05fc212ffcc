"""Triton kernel and launcher of masked_cross_entropy (imported by its triton backend only): the loss over
pre-gathered rows, chunked: cuBLAS GEMMs per chunk of rows + a Triton kernel for the softmax part.

For each chunk of c rows (c*V logits live at a time, never [M, V]):
    z      = h_c W^T + b                                   torch.addmm, compute dtype (e.g. bf16)
    kernel (one program per row i, fp32 math, V walked in BLOCK_V slices; one pass if V <= BLOCK_V):
           m_i = max_j z_ij,  lse_i = m_i + log sum_j exp(z_ij - m_i)
           loss_i = valid_i ? lse_i - z_i[t_i] : 0      (NaN if t_i is outside [0, V) and not ignored)
           hit_i  = valid_i and argmax_j z_ij == t_i   (first index among ties, like torch.argmax)
           z_ij  <- valid_i ? exp(z_ij - lse_i) - [j == t_i] : 0        (written in place)
    grad_h_c = dz W;   [grad_W | grad_b] += dz^T [h_c | 1] (one GEMM, fp32 accumulator)
grad_b rides along grad_W's GEMM as an extra column of ones next to h (padded to 8 columns), which saves a
separate pass over the chunk's logits; h_c is copied once into that padded buffer and GEMM 1 reads it there.
The 1/n_valid factor is not folded into dz (it would underflow fp16); the caller applies
grad_output / max(n_valid, 1) to the three gradients in the backward.

Pipelining: two logit buffers; chunk i+1's first GEMM is issued before chunk i's softmax kernel, on a side
CUDA stream (so the memory-bound kernel overlaps a compute-bound GEMM), the same order on one stream elsewhere.

Cost model (BEiT ViT-B pre-training: M = 256 x 75 = 19200 masked rows, D = 768, V = 8192, bf16):
* FLOPs: 3 GEMMs of 2 M D V = 3 x 241.6 GFLOP = 725 GFLOP (grad_b rides in grad_W's GEMM: +8/D of one);
  the kernel ~5 M V (exp, max, sums) = 0.8 GFLOP.
* bytes: the GEMMs write the logits once and read them twice (3 M V e = 944 MB at e = 2) plus h, W, grad_h,
  fp32 grad_W (~80 MB); the kernel reads and rewrites the logits once more (2 M V e = 629 MB).
* launches per chunk: the [h | 1] copy, GEMM 1, the kernel, GEMM 2, GEMM 3 (5); ~10 chunks of 2^24 logits on
  CUDA at this shape (+ 4 small reductions at the end).
* floor on an H100 SXM: the 3 GEMMs at the dense bf16 peak (~990 TFLOP/s) = 0.73 ms; the kernel alone at
  ~3.35 TB/s = 0.19 ms, which the side stream hides under the next chunk's GEMM 1 except for the first chunk
  and contention (so ~1.05-1.1x the three GEMMs is the design point; unmeasured).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _buffers
from kernels._backend import launches_on_input_device
from kernels._checks import acc_dtype
from kernels._triton_common import tl_acc_dtype


@triton.jit
def _masked_cross_entropy_fwd_kernel(
    z_ptr,
    t_ptr,
    loss_ptr,
    hit_ptr,
    stride_z,
    ignore_index,
    V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per row: online log-sum-exp and argmax over V, loss, hit, and dz = softmax - onehot in place."""
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    t = tl.load(t_ptr + row)
    valid = t != ignore_index
    in_range = (t >= 0) & (t < V)
    cols0 = tl.arange(0, BLOCK_V)
    if V <= BLOCK_V:
        z = tl.load(base + cols0, mask=cols0 < V, other=float("-inf")).to(ACC)
        m = tl.max(z, axis=0)
        lse = m + tl.log(tl.sum(tl.exp(z - m), axis=0))
        best = tl.argmax(z, axis=0, tie_break_left=True)
    else:
        m = tl.max(tl.full((BLOCK_V,), float("-inf"), ACC), axis=0)
        s = tl.sum(tl.zeros((BLOCK_V,), ACC), axis=0)
        best_val = m
        best = tl.program_id(0) * 0
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(ACC)
            bm = tl.max(z, axis=0)
            bi = tl.argmax(z, axis=0, tie_break_left=True) + v0
            better = bm > best_val
            best = tl.where(better, bi, best)
            best_val = tl.where(better, bm, best_val)
            new_m = tl.maximum(m, bm)
            s = s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), axis=0)
            m = new_m
        lse = m + tl.log(s)
    zt = tl.load(base + t, mask=valid & in_range, other=0.0).to(ACC)
    loss = tl.where(valid, tl.where(in_range, lse - zt, float("nan")), 0.0)
    tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))
    tl.store(hit_ptr + row, (valid & (best == t)).to(tl.int32))
    if WRITE_GRAD:
        keep = valid.to(ACC)
        if V <= BLOCK_V:
            dz = (tl.exp(z - lse) - (cols0 == t).to(ACC)) * keep
            tl.store(base + cols0, dz.to(z_ptr.dtype.element_ty), mask=cols0 < V)
        else:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + cols0
                z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(ACC)
                dz = (tl.exp(z - lse) - (cols == t).to(ACC)) * keep
                tl.store(base + cols, dz.to(z_ptr.dtype.element_ty), mask=cols < V)


MAX_SINGLE_PASS_V = 16384  # rows up to this many logits are kept in registers (one read)
MULTI_PASS_BLOCK_V = 4096
_OUT_DTYPE_MM = None  # whether torch.addmm(..., out_dtype=fp32) works here (CUDA, recent torch)


def _accumulate_mm(acc, a, b):
    """acc (fp32/fp64) + a @ b with a, b in the compute dtype, accumulated and returned in acc's dtype on every
    path: cuBLAS with an fp32 output where torch offers it, else the product in acc's dtype."""
    global _OUT_DTYPE_MM
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if a.is_cuda and _OUT_DTYPE_MM is not False:
        try:
            res = torch.addmm(acc, a, b, out_dtype=acc.dtype)
            _OUT_DTYPE_MM = True
            return res
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_MM = False
    # without cuBLAS's fp32 output a bf16/fp16 product would be rounded to 8/11 bits per chunk before it
    # reaches the fp32 accumulator: take the product in the accumulator's dtype instead (slower, exact)
    return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def default_chunk_rows(M, V, budget_elems=1 << 25):
    """Rows per chunk: about ``budget_elems`` logits (64 MiB in bf16), balanced, a multiple of 64."""
    cap = max(64, (budget_elems // max(V, 1)) // 64 * 64)
    if M <= cap:
        return max(M, 1)
    n_chunks = triton.cdiv(M, cap)
    return triton.cdiv(triton.cdiv(M, n_chunks), 64) * 64


_SIDE_STREAMS: dict = {}
OVERLAP_DEFAULT = True  # overlap=None means this (the bench's ``ours-one-stream`` row turns it off)


def _side_stream(device):
    """One side stream per CUDA device (created once) for the next chunk's first GEMM."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=torch.device("cuda", key))
    return _SIDE_STREAMS[key]


@launches_on_input_device
def masked_cross_entropy_forward(h, weight, bias, targets, ignore_index=-100, dtype=None, chunk_rows=None, *,
                                 need_h=True, need_w=True, need_b=True, overlap=None):
    """h [M, D] (the gathered rows), targets [M] int64 -> (loss, accuracy, grad_h*, grad_w*, grad_b*,
    1/max(n_valid, 1)); grads are unscaled.

    loss = sum loss_i / max(n_valid, 1), accuracy = sum hit_i / max(n_valid, 1): 0-dim fp32 tensors
    (fp64 when computing in fp64).
    grad_h in h.dtype, grad_w / grad_b in fp32 (fp64 for fp64 compute); None where not needed.

    Chunks are software-pipelined over two logit buffers (and two ``[h_c | 1]`` buffers): chunk i+1's first GEMM
    is issued before chunk i's softmax kernel. On CUDA (``overlap`` None or True, more than one chunk, a
    gradient pass) that GEMM runs on a side stream, so the memory-bound softmax overlaps the compute-bound GEMM;
    elsewhere the same order runs on one stream (identical results: each chunk's operations and the grad_W
    accumulation order are unchanged). Stream safety: the side stream waits for the main stream (inputs ready,
    chunk i-1's GEMMs done reading the buffer it overwrites) before each GEMM, the main stream waits for that
    GEMM's event before the chunk's softmax, and every buffer used across streams is ``record_stream``-ed.
    The default chunk on the side-stream path is half as many rows (2^24 logits per buffer), so the two buffers
    peak at the single-buffer path's 64 MiB.
    """
    M, D = h.shape
    V = weight.shape[0]
    dev = h.device
    dtype = dtype or torch.promote_types(h.dtype, weight.dtype)
    acc_t = acc_dtype(dtype)
    need_b = need_b and bias is not None
    write_grad = need_h or need_w or need_b
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    valid = targets != ignore_index
    n_valid = valid.sum().to(acc_t).clamp_min(1.0)
    loss_rows = _buffers.empty((M,), acc_t, dev)
    hits = _buffers.empty((M,), torch.int32, dev)
    gh = _buffers.empty((M, D), h.dtype, dev) if need_h else None
    overlap = OVERLAP_DEFAULT if overlap is None else overlap
    streams = (dev.type == "cuda" and overlap and write_grad
               and not torch.cuda.is_current_stream_capturing())  # no side stream inside a CUDA-graph capture
    if chunk_rows:
        c = int(chunk_rows)
    else:
        c = default_chunk_rows(M, V, (1 << 24) if streams else (1 << 25))
    starts = list(range(0, M, c))
    nbuf = 2 if len(starts) > 1 else 1
    streams = streams and nbuf == 2
    main = torch.cuda.current_stream(dev) if streams else None
    side = _side_stream(dev) if streams else None
    # [h_c | 1 | 0 ...]: D columns of h (when grad_W is needed), then a ones column for grad_b, padded to 8
    h_cols = D if need_w else 0
    cols = h_cols + (8 if need_b else 0)
    gwb = _buffers.zeros((V, cols), acc_t, dev) if cols else None
    rows = min(c, M)
    zbuf = [_buffers.empty((rows, V), dtype, dev) for _ in range(nbuf)]
    h_aug = [None] * nbuf
    if need_b:
        for j in range(nbuf):
            h_aug[j] = _buffers.zeros((rows, cols), dtype, dev)
            h_aug[j][:, h_cols] = 1
    BLOCK_V = triton.next_power_of_2(V) if V <= MAX_SINGLE_PASS_V else MULTI_PASS_BLOCK_V
    num_warps = 8 if BLOCK_V >= 2048 else 4

    def first_gemm(j):
        """Chunk j's logits into buffer j % 2 (and its h rows into [h_c | 1] when grad_b is needed)."""
        s, e = starts[j], min(starts[j] + c, M)
        if need_b and need_w:
            h_aug[j % 2][: e - s, :D].copy_(h[s:e])
            hc = h_aug[j % 2][: e - s, :D]
        else:
            hc = h[s:e].to(dtype)
        z = zbuf[j % 2][: e - s]
        if b is not None:
            torch.addmm(b, hc, w.t(), out=z)
        else:
            torch.mm(hc, w.t(), out=z)
        return z, hc

    events = [None] * len(starts)
    pending = first_gemm(0) if starts else None
    for j, s in enumerate(starts):
        e = min(s + c, M)
        z, hc = pending
        if j + 1 < len(starts):
            if streams:
                side.wait_stream(main)  # h/w/b ready; chunk j-1's GEMMs no longer read the buffer reused next
                with torch.cuda.stream(side):
                    pending = first_gemm(j + 1)
                    events[j + 1] = torch.cuda.Event()
                    events[j + 1].record(side)
                pending[1].record_stream(main)  # allocated on the side stream when h is cast (no [h|1] buffer)
            else:
                pending = first_gemm(j + 1)
        if streams and events[j] is not None:
            main.wait_event(events[j])
        _masked_cross_entropy_fwd_kernel[(e - s,)](
            z,
            targets[s:e],
            loss_rows[s:e],
            hits[s:e],
            z.stride(0),
            ignore_index,
            V=V,
            WRITE_GRAD=write_grad,
            ACC=tl_acc_dtype(dtype),
            BLOCK_V=BLOCK_V,
            num_warps=num_warps,
        )
        if need_h:
            if gh.dtype == dtype:
                torch.mm(z, w, out=gh[s:e])
            else:
                gh[s:e] = torch.mm(z, w)
        if need_b:
            gwb = _accumulate_mm(gwb, z.t(), h_aug[j % 2][: e - s])
        elif need_w:
            gwb = _accumulate_mm(gwb, z.t(), hc)
    if streams:
        for t in zbuf + [t for t in h_aug if t is not None] + [h, w] + ([b] if b is not None else []):
            t.record_stream(side)
    gw = gwb[:, :D] if need_w else None
    gb = gwb[:, h_cols] if need_b else None
    loss = loss_rows.sum(dtype=acc_t) / n_valid
    acc = hits.sum().to(acc_t) / n_valid
    return loss, acc, gh, gw, gb, 1.0 / n_valid
