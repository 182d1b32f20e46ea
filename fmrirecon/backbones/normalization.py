"""Image normalisation statistics, one table (STYLE.md §16): RGB mean and std per convention.

- ``clip``: OpenAI CLIP's preprocessing (its ``preprocessor_config.json``; the original ``clip`` package);
- ``imagenet``: torchvision's ImageNet statistics (AlexNet, Inception, EfficientNet, SwAV features; the
  NeuralDiffuser code's guidance inputs).

The values are transformers' own constants (``transformers.utils.constants``), so they cannot drift from the
library that loads the models.
"""

from __future__ import annotations

from transformers.utils.constants import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "NORMALIZATIONS"]

CLIP_MEAN: tuple[float, float, float] = tuple(OPENAI_CLIP_MEAN)
CLIP_STD: tuple[float, float, float] = tuple(OPENAI_CLIP_STD)
IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)

# convention name -> (mean, std), RGB
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "clip": (CLIP_MEAN, CLIP_STD),
}
