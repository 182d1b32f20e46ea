"""Small blocks shared by the methods: subject voxel encoders, MLP-Mixer, residual MLP, diffusion prior,
contrastive losses."""

from fmrirecon.nn.diffusion_prior import DiffusionPrior, PriorNetwork
from fmrirecon.nn.losses import clip_loss, mixco, mixco_nce, soft_clip_loss, soft_contrastive_loss
from fmrirecon.nn.mlp_mixer import MLPMixerBackbone, TokenProjector
from fmrirecon.nn.resmlp import LatentUpsampler, MapProjector, ResidualMLP
from fmrirecon.nn.voxel_encoders import SubjectVoxelEncoders, encode_mixed_batch, shared_weights, subject_key

__all__ = [
    "DiffusionPrior",
    "LatentUpsampler",
    "MLPMixerBackbone",
    "MapProjector",
    "PriorNetwork",
    "ResidualMLP",
    "SubjectVoxelEncoders",
    "TokenProjector",
    "clip_loss",
    "encode_mixed_batch",
    "mixco",
    "mixco_nce",
    "shared_weights",
    "soft_clip_loss",
    "soft_contrastive_loss",
    "subject_key",
]
