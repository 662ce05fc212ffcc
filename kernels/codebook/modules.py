"""``VectorQuantizer``: the stateful VQ-KD quantizer of BEiT v2 (cosine lookup, norm-EMA codebook).

forward(z [..., d]) -> (z_q_st [..., d], indices [...], loss_commit)::

    z_n = l2n(z);  i, z_q_st = nearest_code(z, codebook)        (straight-through to z_n)
    loss_commit = commitment_weight * mean((z_n - z_q.detach())^2)
    training: k-means init of the codebook (and cluster_size) on the first batch, once;
              then ema_codebook_update(z_n, i)

The codebook is a buffer (no gradient): it moves only by the EMA update (and the k-means init, load_state_dict),
each of which bumps its version counter, so the lookup keeps its prepared (normalised, transposed) copy between
steps (``cache_codebook=True``) and rebuilds it after each update.

Non-finite inputs: rows of ``z`` holding a NaN or inf never reach the codebook. The EMA update skips them
(they count for no code and add nothing to the sums, without a host sync), the k-means init uses only the
finite rows (and waits for a batch that has some), and dead-code restarts draw only finite rows. Their
outputs (``z_q``, the index, the loss) are whatever the lookup gives for them, so the loss of such a batch is
NaN as usual; pass ``check_inputs=True`` to raise a ``ValueError`` on them instead (one host sync per step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels._checks import check_int, check_real
from kernels.codebook import reference as ref
from kernels.codebook.commitment_loss import commitment_loss
from kernels.codebook.ema_codebook_update import bump_version, ema_codebook_update
from kernels.codebook.kmeans_init_codebook import kmeans_init_codebook
from kernels.codebook.nearest_code import PRECISIONS, nearest_code


class VectorQuantizer(nn.Module):
    """Buffers: ``codebook [K, d]`` (l2-normalised when ``normalize``), ``cluster_size [K]``,
    ``embed_sum [K, d]``, ``steps_since_used [K]`` int64, ``initialized`` (bool scalar).

    With ``kmeans_init=False`` the codebook starts as l2-normalised Gaussian rows and ``initialized`` is True.
    ``check_inputs`` runs the finite/range checks of the functional ops (one host sync each).
    """

    def __init__(
        self,
        num_codes=8192,
        dim=32,
        decay=0.99,
        kmeans_init=True,
        kmeans_iters=10,
        eps=1e-5,
        commitment_weight=1.0,
        normalize=True,
        dead_code_threshold=None,
        precision="auto",
        check_inputs=False,
        process_group=None,
    ):
        super().__init__()
        check_int("num_codes", num_codes, 1)
        check_int("dim", dim, 1)
        check_real("decay", decay, 0.0, 1.0)
        check_real("eps", eps, 0.0, lo_open=True)
        check_int("kmeans_iters", kmeans_iters, 0)
        check_real("commitment_weight", commitment_weight)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.num_codes, self.dim, self.decay, self.eps = int(num_codes), int(dim), float(decay), float(eps)
        self.kmeans_init, self.kmeans_iters = bool(kmeans_init), int(kmeans_iters)
        self.commitment_weight, self.normalize = float(commitment_weight), bool(normalize)
        self.dead_code_threshold, self.precision = dead_code_threshold, precision
        self.check_inputs, self.process_group = bool(check_inputs), process_group
        codebook = torch.randn(num_codes, dim)
        if normalize:
            codebook = F.normalize(codebook, dim=-1)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_sum", torch.zeros(num_codes, dim))
        self.register_buffer("steps_since_used", torch.zeros(num_codes, dtype=torch.int64))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self._init_known = not kmeans_init  # python mirror of `initialized` to avoid a sync per step

    def extra_repr(self):
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, decay={self.decay}, normalize={self.normalize}, "
            f"kmeans_init={self.kmeans_init}, dead_code_threshold={self.dead_code_threshold}"
        )

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # read the loaded flag now (one host read at load time) so forward needs no sync and compiles
        # without a graph break; unknown (meta tensors) -> re-read on the next forward
        flag = self.initialized
        self._init_known = flag.device.type != "meta" and bool(flag)

    @torch.no_grad()
    def _maybe_init(self, z_n):
        if self._init_known:
            return
        if bool(self.initialized):
            self._init_known = True
            return
        z_n = z_n.reshape(-1, z_n.shape[-1])
        z_n = z_n[torch.isfinite(z_n).all(dim=-1)]  # NaN/inf rows must not seed the codebook (one host sync)
        if z_n.shape[0] == 0:
            return  # no finite vector in this batch: initialise on a later one
        cb, counts = kmeans_init_codebook(
            z_n, self.num_codes, iters=self.kmeans_iters, normalize=self.normalize, return_counts=True
        )
        self.codebook.copy_(cb.to(self.codebook.dtype))
        self.cluster_size.copy_(counts.to(self.cluster_size.dtype))
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            src = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
            dist.broadcast(self.codebook, src=src, group=self.process_group)
            bump_version(self.codebook)  # NCCL writes bypass the version counter the lookup's cache reads
        self.initialized.fill_(True)
        self._init_known = True

    def forward(self, z):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() < 1 or z.shape[-1] != self.dim:
            raise ValueError(f"z must have shape [..., {self.dim}], got {tuple(z.shape)}")
        z_n = ref.l2n(z, 1e-12) if self.normalize else z  # F.normalize, without overflow for huge rows
        if self.training:
            self._maybe_init(z_n.detach())
        indices, z_q, _ = nearest_code(  # the buffer changes only by the writers that bump its version
            z, self.codebook, self.normalize, precision=self.precision, check_finite=self.check_inputs,
            cache_codebook=True,
        )
        loss = self.commitment_weight * commitment_loss(z_n, z_q)
        if self.training:
            ema_codebook_update(
                self.codebook,
                self.cluster_size,
                self.embed_sum,
                z_n.detach(),
                indices,
                decay=self.decay,
                eps=self.eps,
                normalize=self.normalize,
                dead_code_threshold=self.dead_code_threshold,
                steps_since_used=self.steps_since_used,
                process_group=self.process_group,
                check_inputs=self.check_inputs,
            )
        return z_q, indices, loss
