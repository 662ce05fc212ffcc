"""Sparse layers for masked convnets (SparK). Each is a subclass of its dense torch counterpart holding the
same parameters; inside :func:`~kernels.sparse_conv.context.sparse_context` it computes only at active sites
and writes exact zeros elsewhere, outside it behaves exactly like the dense parent.

* :class:`SparseConv2d`: :func:`kernels.sparse_conv2d` (active inputs only; output map by the cell rule,
  recorded in the context for the next layers).
* :class:`SparseBatchNorm2d`: batch statistics over active sites only (``mean = sum(a x) / sum(a)``, biased
  variance for normalising, unbiased ``n / (n - 1)`` for the running estimate, like ``nn.BatchNorm2d``),
  through :func:`kernels.masked_batch_norm` (fused Triton reductions on CUDA); ``forward_relu(x, residual)``
  is the ResNet epilogue ``ReLU(BN(x) + residual)``, one pass on the native kernels.
* :class:`SparseLayerNorm`: layer norm over channels at each active site (``channels_first`` NCHW, the
  ConvNeXt ``LayerNorm2d``; or ``channels_last`` NHWC).
* :func:`rows_linear`: an ``nn.Linear`` on gathered active rows (ConvNeXt's MLP) with its three GEMMs in
  oneDNN on CPU float32 (:func:`kernels.sparse_conv.sparse_conv2d_native.linear`).
* :class:`SparseMaxPool2d`: max over the active inputs of each window; :class:`SparseAvgPool2d`: dense
  average of the zero-filled input (SparK's semantics: inactive inputs count as zeros); both re-masked by
  the cell rule. :class:`SparseAdaptiveAvgPool2d` (output 1x1): mean over active sites only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.sparse_conv.active import conv_output_size, downsample_active, pair
from kernels.sparse_conv.context import current_maps
from kernels.sparse_conv.masked_batch_norm import masked_batch_norm
from kernels.sparse_conv.sparse_conv2d import groups_supported, sparse_conv2d
from kernels.sparse_conv.sparse_conv2d_native import linear


def _mask(active: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return active.unsqueeze(1).to(like.dtype)


def _output_map(maps, active_in, size_out, stride):
    """The recorded map at the output resolution, else the cell rule (then recorded)."""
    if tuple(size_out) in maps:
        return maps.get(size_out)
    out = downsample_active(active_in, stride, tuple(size_out))
    maps.set(size_out, out)
    return out


def _resolve_padding(conv: nn.Conv2d):
    """nn.Conv2d padding as an int pair, or None when it cannot be expressed so (asymmetric 'same')."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            return None
        return (total[0] // 2, total[1] // 2)
    return pair(tuple(conv.padding), "padding")


def conv_unsupported_reason(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` cannot become a :class:`SparseConv2d` (None if it can)."""
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' is sparse-compatible)"
    if not groups_supported(conv.in_channels, conv.out_channels, conv.groups):
        return (
            f"groups={conv.groups} with {conv.in_channels}->{conv.out_channels} channels "
            "(supported: groups=1 or depthwise groups=in=out)"
        )
    if _resolve_padding(conv) is None:
        return "padding='same' with an even kernel extent (asymmetric padding)"
    return None


class SparseConv2d(nn.Conv2d):
    """``nn.Conv2d`` computed at active sites only inside a ``sparse_context`` (see module doc)."""

    @classmethod
    def from_dense(cls, conv: nn.Conv2d) -> SparseConv2d:
        reason = conv_unsupported_reason(conv)
        if reason is not None:
            raise ValueError(f"conv: cannot make {conv} sparse: {reason}")
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            _resolve_padding(conv),
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
        )
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new

    def forward(self, x):
        maps = current_maps()
        if maps is None:
            return super().forward(x)
        padding = _resolve_padding(self)
        if padding is None:
            raise ValueError(f"{self}: padding='same' with an even kernel extent is not supported sparsely")
        a_in = maps.get(x.shape[-2:], x.shape[0])
        size_out = conv_output_size(x.shape[-2:], self.kernel_size, self.stride, padding, self.dilation)
        a_out = _output_map(maps, a_in, size_out, self.stride)
        out, _ = sparse_conv2d(
            x,
            a_in,
            self.weight,
            self.bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            active_out=a_out,
        )
        return out


class SparseBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with statistics over active sites only inside a ``sparse_context``."""

    @classmethod
    def from_dense(cls, bn: nn.BatchNorm2d) -> SparseBatchNorm2d:
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
        new.weight, new.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(bn, name))
        new.train(bn.training)
        return new

    def forward(self, x):
        return self._epilogue(x, None, False)

    def forward_relu(self, x, residual=None, relu=True):
        """``ReLU(self(x) + residual)`` (``relu=False``: no ReLU; ``residual`` optional), the ResNet epilogue:
        fused into the masked batch norm's passes on the native kernels inside a ``sparse_context``, the
        three ops one after another otherwise (same values). A subclass that overrides ``forward`` (its own
        statistics, e.g. the synchronised batch norm) runs its ``forward`` and then the add and ReLU."""
        if type(self).forward is not SparseBatchNorm2d.forward:
            y = self(x)
            y = y if residual is None else y + residual
            return F.relu(y) if relu else y
        return self._epilogue(x, residual, relu)

    def _epilogue(self, x, residual, relu):
        maps = current_maps()
        if maps is None:
            y = super().forward(x)
            y = y if residual is None else y + residual
            return F.relu(y) if relu else y
        if x.dim() != 4:
            raise ValueError(f"x: expected a 4-D [B, C, H, W] tensor, got shape {tuple(x.shape)}")
        a = maps.get(x.shape[-2:], x.shape[0])
        use_batch = self.training or not self.track_running_stats
        if not use_batch:
            y = F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
            y = y * _mask(a, x)
            y = y if residual is None else y + residual
            return F.relu(y) if relu else y
        y, mean, var, n = masked_batch_norm(x, a, self.weight, self.bias, self.eps, residual=residual,
                                            relu=relu)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                mom = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var * n / (n - 1).clamp_min(1.0)
                has = n > 0
                rm = torch.where(
                    has,
                    (1 - mom) * self.running_mean + mom * mean.to(self.running_mean.dtype),
                    self.running_mean,
                )
                rv = torch.where(
                    has,
                    (1 - mom) * self.running_var + mom * unbiased.to(self.running_var.dtype),
                    self.running_var,
                )
                self.running_mean.copy_(rm)
                self.running_var.copy_(rv)
        return y


class SparseLayerNorm(nn.LayerNorm):
    """Layer norm over channels at each active site, zeros elsewhere (inside a ``sparse_context``).

    ``data_format="channels_first"``: x ``[B, C, H, W]`` (ConvNeXt's ``LayerNorm2d``);
    ``"channels_last"``: x ``[B, H, W, C]``. Outside a context: the same maths without masking.
    """

    def __init__(
        self, normalized_shape, eps=1e-6, elementwise_affine=True, data_format="channels_first", **kw
    ):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, **kw)
        if data_format not in ("channels_first", "channels_last"):
            raise ValueError(
                f"data_format: expected 'channels_first' or 'channels_last', got {data_format!r}"
            )
        if len(self.normalized_shape) != 1:
            raise ValueError(f"normalized_shape: expected a single channel dim, got {self.normalized_shape}")
        self.data_format = data_format

    @classmethod
    def from_dense(cls, ln: nn.Module, data_format="channels_first") -> SparseLayerNorm:
        shape = tuple(ln.normalized_shape)
        weight, bias = getattr(ln, "weight", None), getattr(ln, "bias", None)
        new = cls(
            shape, eps=ln.eps, elementwise_affine=weight is not None, data_format=data_format, device="meta"
        )
        if weight is not None:
            new.weight, new.bias = weight, bias
            if bias is None:
                new.register_parameter("bias", None)
        new.train(ln.training)
        return new

    def forward(self, x):
        maps = current_maps()
        if self.data_format == "channels_first":
            y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
            y = y.permute(0, 3, 1, 2)
            if maps is None:
                return y
            return y * _mask(maps.get(x.shape[-2:], x.shape[0]), y)
        y = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if maps is None:
            return y
        return y * maps.get(x.shape[1:3], x.shape[0]).unsqueeze(-1).to(y.dtype)

    def extra_repr(self):
        return super().extra_repr() + f", data_format={self.data_format}"


def _pool_out_size(x, kernel_size, stride, padding, dilation, ceil_mode):
    if ceil_mode:
        raise ValueError("ceil_mode=True is not supported by the sparse pooling layers")
    return conv_output_size(x.shape[-2:], kernel_size, stride, padding, dilation)


class SparseMaxPool2d(nn.MaxPool2d):
    """Max over the active inputs of each window, at active output sites (cell rule); zeros elsewhere."""

    @classmethod
    def from_dense(cls, pool: nn.MaxPool2d) -> SparseMaxPool2d:
        if pool.return_indices or pool.ceil_mode:
            raise ValueError(f"pool: cannot make {pool} sparse: return_indices/ceil_mode are not supported")
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation)

    def forward(self, x):
        maps = current_maps()
        if maps is None:
            return super().forward(x)
        a = maps.get(x.shape[-2:], x.shape[0])
        stride = self.stride if self.stride is not None else self.kernel_size
        size_out = _pool_out_size(x, self.kernel_size, stride, self.padding, self.dilation, self.ceil_mode)
        a_out = _output_map(maps, a, size_out, stride)
        neg = torch.finfo(x.dtype).min
        # torch.where keeps x's memory format (masked_fill returns NCHW for a channels_last x, and max pooling
        # an NCHW copy of a channels_last map was 10x slower than the pool itself, fwd + bwd)
        xm = torch.where(a.unsqueeze(1), x, neg)
        y = F.max_pool2d(xm, self.kernel_size, stride, self.padding, self.dilation)
        keep = a_out.unsqueeze(1) & (y > neg)
        return torch.where(keep, y, torch.zeros((), dtype=y.dtype, device=y.device))


class SparseAvgPool2d(nn.AvgPool2d):
    """SparK's sparse average pooling: dense average of the zero-filled input, re-masked (cell rule)."""

    @classmethod
    def from_dense(cls, pool: nn.AvgPool2d) -> SparseAvgPool2d:
        if pool.ceil_mode:
            raise ValueError(f"pool: cannot make {pool} sparse: ceil_mode is not supported")
        return cls(
            pool.kernel_size, pool.stride, pool.padding, False, pool.count_include_pad, pool.divisor_override
        )

    def forward(self, x):
        maps = current_maps()
        if maps is None:
            return super().forward(x)
        a = maps.get(x.shape[-2:], x.shape[0])
        stride = self.stride if self.stride is not None else self.kernel_size
        size_out = _pool_out_size(x, self.kernel_size, stride, self.padding, 1, self.ceil_mode)
        a_out = _output_map(maps, a, size_out, stride)
        y = F.avg_pool2d(
            x * _mask(a, x),
            self.kernel_size,
            stride,
            self.padding,
            False,
            self.count_include_pad,
            self.divisor_override,
        )
        return y * _mask(a_out, y)


class SparseAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """Global average over active sites only (output 1x1): ``sum_s a_s x_s / max(1, sum_s a_s)``."""

    @classmethod
    def from_dense(cls, pool: nn.AdaptiveAvgPool2d) -> SparseAdaptiveAvgPool2d:
        if pair(
            pool.output_size if not isinstance(pool.output_size, list) else tuple(pool.output_size),
            "output_size",
        ) != (1, 1):
            raise ValueError(f"pool: only output_size 1 is supported sparsely, got {pool.output_size}")
        return cls(1)

    def forward(self, x):
        maps = current_maps()
        if maps is None:
            return super().forward(x)
        m = _mask(maps.get(x.shape[-2:], x.shape[0]), x)
        count = m.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
        return (x * m).sum(dim=(2, 3), keepdim=True) / count


class RowsLinearFunction(torch.autograd.Function):
    """``x @ W.T + b`` on rows ``x [n, in]`` with the forward, dx and dW GEMMs in :func:`linear`."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        g = g.contiguous()
        dx = linear(g, weight.t()) if need_x else None
        dw = linear(g.t(), x.t()) if need_w else None
        db = g.sum(0) if need_b and ctx.has_bias else None
        return dx, dw, db


def rows_linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)`` for 2-D rows ``x [n, in]`` (e.g. the gathered active rows of a SparK encoder): on CPU
    float32 outside ``torch.compile`` the forward and both gradient GEMMs run in oneDNN (AVX-512 where the CPU
    has it; ``F.linear`` takes MKL's sgemm, AVX2 on AMD CPUs), otherwise (and for any module that is not a
    plain ``nn.Linear``) ``layer(x)`` itself."""
    if type(layer) is not nn.Linear:
        return layer(x)
    w = layer.weight
    if (x.dim() == 2 and x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu"
            and w.device.type == "cpu" and x.shape[0] > 0 and not torch.compiler.is_compiling()):
        return RowsLinearFunction.apply(x, w, layer.bias)
    return layer(x)
