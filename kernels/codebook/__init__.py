"""VQ-KD codebook ops: fused nearest-code lookup, norm-EMA update, k-means init, usage stats,
VectorQuantizer."""

from kernels.codebook.ema import ema_codebook_update
from kernels.codebook.function import NearestCode, NearestCodeFunction, commitment_loss, nearest_code
from kernels.codebook.kmeans import kmeans_init_codebook
from kernels.codebook.module import VectorQuantizer
from kernels.codebook.stats import codebook_usage

__all__ = [
    "NearestCode",
    "NearestCodeFunction",
    "VectorQuantizer",
    "codebook_usage",
    "commitment_loss",
    "ema_codebook_update",
    "kmeans_init_codebook",
    "nearest_code",
]
