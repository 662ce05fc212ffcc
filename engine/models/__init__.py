"""Backbones and heads."""

from engine.models.heads import DINOHead, WeightNormLinear
from engine.models.swin import SWIN_CONFIGS, SwinTransformer, build_swin, is_swin, swin_from_cfg, swin_model_names
from engine.models.vit import VIT_CONFIGS, VisionTransformer, build_vit, model_names

__all__ = ["DINOHead", "WeightNormLinear", "VIT_CONFIGS", "VisionTransformer", "build_vit", "model_names"]
__all__ += ["SWIN_CONFIGS", "SwinTransformer", "build_swin", "is_swin", "swin_from_cfg", "swin_model_names"]
