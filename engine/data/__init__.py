"""Data: image-folder datasets, NVIDIA DALI pre-training/eval pipelines, a torch fallback, a built-in dataset.

Importing this package imports neither DALI nor CUDA; loaders import DALI when built. Recipes: see
:mod:`engine.data.augment` (and ``engine/data/README.md``).
"""

from .augment import IMAGENET_MEAN, IMAGENET_STD, METHODS, RECIPES, default_local_size, pretrain_recipe
from .builtin import builtin_dataset, synthetic_dataset
from .folder import ImageFolder
from .core import LoaderOptions
from .loader import DataRecipe, EvalLoader, PretrainLoader, build_eval_loader, build_pretrain_loader, dali_available

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "METHODS",
    "RECIPES",
    "DataRecipe",
    "EvalLoader",
    "ImageFolder",
    "LoaderOptions",
    "PretrainLoader",
    "build_eval_loader",
    "build_pretrain_loader",
    "builtin_dataset",
    "dali_available",
    "default_local_size",
    "pretrain_recipe",
    "synthetic_dataset",
]
