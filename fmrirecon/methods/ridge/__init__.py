"""Ridge baseline (Takagi & Nishimoto 2023; Brain-Diffuser): voxels → VAE latent + text tokens → img2img."""

from fmrirecon.methods.ridge.method import RidgeConfig, RidgeMethod, RidgeReconstruction
from fmrirecon.methods.ridge.model import RidgeFit, fit_ridge_cv, restandardize

__all__ = ["RidgeConfig", "RidgeFit", "RidgeMethod", "RidgeReconstruction", "fit_ridge_cv", "restandardize"]
