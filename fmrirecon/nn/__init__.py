"""Small blocks shared by the methods: MLP-Mixer, residual MLP, diffusion prior, contrastive losses."""

from fmrirecon.nn.diffusion_prior import DiffusionPrior, PriorNetwork
from fmrirecon.nn.losses import clip_loss, mixco, mixco_nce, soft_clip_loss, soft_contrastive_loss
from fmrirecon.nn.mlp_mixer import MLPMixerBackbone, TokenProjector
from fmrirecon.nn.resmlp import LatentUpsampler, MapProjector, ResidualMLP

__all__ = [
    "DiffusionPrior",
    "LatentUpsampler",
    "MLPMixerBackbone",
    "MapProjector",
    "PriorNetwork",
    "ResidualMLP",
    "TokenProjector",
    "clip_loss",
    "mixco",
    "mixco_nce",
    "soft_clip_loss",
    "soft_contrastive_loss",
]
