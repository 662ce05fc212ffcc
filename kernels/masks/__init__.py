"""Mask generators for masked image modeling (BEiT, SimMIM, SparK, MAE-style)."""

from kernels.masks.generators import blockwise_masks, random_masks, simmim_masks, spark_masks

__all__ = ["blockwise_masks", "random_masks", "simmim_masks", "spark_masks"]
