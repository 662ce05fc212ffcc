"""Backbones and heads."""

from engine.models.heads import DINOHead, WeightNormLinear
from engine.models.vit import VIT_CONFIGS, VisionTransformer, build_vit, model_names

__all__ = ["DINOHead", "WeightNormLinear", "VIT_CONFIGS", "VisionTransformer", "build_vit", "model_names"]
