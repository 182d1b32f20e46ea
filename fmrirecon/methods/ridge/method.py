"""The ridge baseline: linear maps from voxels to a latent diffusion model's inputs, then img2img.

Takagi & Nishimoto (CVPR 2023) and Brain-Diffuser (Ozcelik & VanRullen 2023) decode an image latent ``z`` and
a text condition ``c`` from fMRI with ridge regression and hand both to a pretrained latent diffusion model:
``z`` starts an img2img (SDEdit) run, ``c`` conditions it. Here:

1. targets, for each training image (repeat-averaged betas, non-shared images):
   ``z`` = the VAE latent ``(C, h, w)`` of the image, and ``c`` = the text-encoder token sequence ``(L, D)``
   averaged over its 5 captions (Takagi §3.2 averages the caption embeddings);
2. one ridge per target family, alpha per feature by 5-fold cross-validation (:func:`fit_ridge_cv`);
3. at test time, predictions are z-scored over the test batch and rescaled to the training features'
   statistics (Brain-Diffuser §2.3), then DDIM img2img from ``ẑ`` with strength ``strength`` under ``ĉ``, with
   classifier-free guidance against the empty-text embedding.

Variants: ``"img2img"`` (the above) and ``"latent"`` (decode ``ẑ`` with the VAE alone — the low-level
reconstruction, Takagi Fig. 3 "z only").
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from fmrirecon.device import Precision
from fmrirecon.errors import DatasetLayoutError
from fmrirecon.io import read_json, save_safetensors_atomic, write_json_atomic
from fmrirecon.methods.base import Capabilities, ReconMethod, RunData
from fmrirecon.methods.ridge.model import RidgeFit, fit_ridge_cv, restandardize
from fmrirecon.methods.ridge.pipeline import sample_images
from fmrirecon.methods.ridge.train import image_targets, text_targets

logger = logging.getLogger(__name__)

__all__ = ["RidgeConfig", "RidgeMethod", "RidgeReconstruction"]

WEIGHTS_FILE = "ridge.safetensors"
INFO_FILE = "ridge.json"


@dataclass
class RidgeReconstruction:
    """Reconstruction settings (``fmrirecon reconstruct --set key=value``); Brain-Diffuser / SD defaults.

    Attributes:
        strength: img2img strength — fraction of the DDIM schedule run from ``ẑ`` (Brain-Diffuser 0.75).
        num_steps: DDIM steps over the full schedule.
        cfg_scale: classifier-free guidance scale (Brain-Diffuser / SD default 7.5).
        batch_size: images per backbone call.
        precision: the backbone's dtype while sampling (``bfloat16``; ``float16`` on a GPU only).
    """

    strength: float = 0.75
    num_steps: int = 50
    cfg_scale: float = 7.5
    batch_size: int = 16
    precision: Precision = "float32"

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must lie in [0, 1], got {self.strength}")
        if self.num_steps < 1 or self.batch_size < 1:
            raise ValueError("num_steps and batch_size must be >= 1")


@dataclass
class RidgeConfig:
    """Ridge baseline settings.

    Attributes:
        alphas: candidate ridge penalties (searched per feature; standardised voxels, so they scale with N).
        cv_folds: K of the K-fold alpha search.
        solver: ``"auto"`` (``"kfold_eigh"`` when trials ≥ voxels and > 2 alphas, else ``"kfold_exact"``),
            ``"kfold_exact"`` (one Cholesky per alpha, held-out residuals by the deletion identity),
            ``"kfold_eigh"`` (the same identity from one eigendecomposition shared by all alphas),
            or himalaya's ``"primal"`` (SVD per fold) / ``"kernel"`` (kernel eigendecomposition per fold).
        backend: himalaya backend for ``"primal"``/``"kernel"`` (``"torch"`` = torch on CPU, ``"torch_cuda"``,
            ``"numpy"``).
        n_targets_batch: solve this many targets at a time (memory bound for 16,384-dim SD latents).
        text_condition: regress the caption-averaged text tokens; False conditions on the empty text.
        backbone: ``"world"`` (shipped world LDM), a hub id in the local cache, or a diffusers folder.
        target_batch_size: images per backbone call while computing the training targets.
        reconstruction: :class:`RidgeReconstruction`.
    """

    alphas: tuple[float, ...] = (1e1, 1e2, 1e3, 3e3, 1e4, 3e4, 1e5, 1e6)
    cv_folds: int = 5
    solver: Literal["auto", "kfold_exact", "kfold_eigh", "primal", "kernel"] = "auto"
    backend: Literal["numpy", "torch", "torch_cuda"] = "torch"
    n_targets_batch: int | None = None
    text_condition: bool = True
    backbone: str = "world"
    target_batch_size: int = 16
    reconstruction: RidgeReconstruction = field(default_factory=RidgeReconstruction)

    def __post_init__(self) -> None:
        if not self.alphas or any(a <= 0 for a in self.alphas):
            raise ValueError(f"alphas must be a non-empty list of positive numbers, got {self.alphas}")
        if self.cv_folds < 2:
            raise ValueError(f"cv_folds must be >= 2, got {self.cv_folds}")
        if self.target_batch_size < 1:
            raise ValueError("target_batch_size must be >= 1")


class RidgeMethod(ReconMethod):
    """Ridge regression voxels → (VAE latent, text tokens), reconstruction by img2img.

    Args:
        config: :class:`RidgeConfig`.
        backbone: a ``LatentDiffusion`` to use instead of loading ``config.backbone`` (tests, notebooks).
    """

    name = "ridge"
    Config = RidgeConfig
    Settings = RidgeReconstruction
    capabilities = Capabilities(variants=("img2img", "latent"), analyses=("encoding_map",), baseline=True)

    def __init__(self, config: RidgeConfig | None = None, *, backbone=None):
        super().__init__(config)
        self._injected = backbone
        self.latent: RidgeFit | None = None
        self.text: RidgeFit | None = None
        self.latent_shape: tuple[int, ...] | None = None
        self.text_shape: tuple[int, ...] | None = None

    @property
    def backbone(self):
        """The float32 backbone on this method's device (the one given to the constructor, if any)."""
        return self.backbone_in("float32")

    def backbone_in(self, precision: str):
        """The backbone on ``self.device`` in ``precision`` (shared loader: never moves a cached object)."""
        from fmrirecon.backbones.loader import load_latent_diffusion
        from fmrirecon.device import resolve_dtype

        if self._injected is not None:
            return self._injected
        return load_latent_diffusion(self.config.backbone, self.device, resolve_dtype(precision, self.device))

    # ------------------------------------------------------------------ targets (train.py)
    def image_targets(self, images_uint8: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) → float32 (N, C*h*w) VAE latents (posterior mean, scaled)."""
        return image_targets(self.backbone, images_uint8, self.config.target_batch_size)

    def text_targets(self, captions: list[list[str]]) -> np.ndarray:
        """N lists of captions → float32 (N, L*D) text-encoder tokens averaged over each image's captions."""
        return text_targets(self.backbone, captions, self.config.target_batch_size)

    # ---------------------------------------------------------------------- fit
    def fit(self, data: RunData, run_dir: str | os.PathLike, *, seed: int = 0) -> None:
        """Fit both ridges on the subject's repeat-averaged training betas and save them under ``run_dir``."""
        self.check_run_data(data)
        store, subject = data.store, data.subject
        subject_store = store.subject(subject)
        ids, betas = subject_store.averaged("train")
        logger.info("ridge: subject %d, %d training images x %d voxels", subject, len(ids), betas.shape[1])
        cfg = self.config
        latents = self.image_targets(store.images(ids))
        self.latent_shape = tuple(self.backbone.latent_shape)
        fit_kwargs = dict(
            cv=cfg.cv_folds,
            solver=cfg.solver,
            backend=cfg.backend,
            n_targets_batch=cfg.n_targets_batch,
            seed=seed,
        )
        self.latent = fit_ridge_cv(betas, latents, cfg.alphas, **fit_kwargs)
        if cfg.text_condition:
            text = self.text_targets(store.captions(ids))
            self.text_shape = (self.backbone.context_length, text.shape[1] // self.backbone.context_length)
            self.text = fit_ridge_cv(betas, text, cfg.alphas, **fit_kwargs)
        self.subject, self.n_voxels = int(subject), int(betas.shape[1])
        self.save(run_dir, n_train=len(ids))

    def save(self, run_dir: str | os.PathLike, **extra) -> None:
        import torch

        run_dir = Path(run_dir)
        arrays = self.latent.tensors("latent")
        if self.text is not None:
            arrays.update(self.text.tensors("text"))
        save_safetensors_atomic(
            {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, run_dir / WEIGHTS_FILE
        )
        summary = {
            "subject": self.subject,
            "n_voxels": self.n_voxels,
            "latent_shape": list(self.latent_shape),
            "text_shape": list(self.text_shape) if self.text_shape else None,
            "alphas_chosen": {
                name: {str(a): int(n) for a, n in zip(*np.unique(fit.best_alphas, return_counts=True))}
                for name, fit in (("latent", self.latent), ("text", self.text))
                if fit is not None
            },
            "cv_score_mean": {
                name: float(fit.cv_scores.mean())
                for name, fit in (("latent", self.latent), ("text", self.text))
                if fit is not None
            },
            **extra,
        }
        write_json_atomic(run_dir / INFO_FILE, json.loads(json.dumps(summary)))

    @classmethod
    def load(cls, run_dir: str | os.PathLike, *, device=None, backbone=None) -> RidgeMethod:
        from safetensors.numpy import load_file

        run_dir = Path(run_dir)
        method = cls(cls.read_run_config(run_dir), backbone=backbone)
        if device is not None:
            method.to(device)
        weights, info_file = run_dir / WEIGHTS_FILE, run_dir / INFO_FILE
        if not weights.is_file() or not info_file.is_file():
            raise DatasetLayoutError(
                f"{run_dir} holds no fitted ridge: expected {WEIGHTS_FILE} and {INFO_FILE}"
            )
        tensors, info = load_file(str(weights)), read_json(info_file)
        method.latent = RidgeFit.from_tensors(tensors, "latent")
        method.text = RidgeFit.from_tensors(tensors, "text") if "text.coef" in tensors else None
        method.latent_shape = tuple(info["latent_shape"])
        method.text_shape = tuple(info["text_shape"]) if info["text_shape"] else None
        method.subject, method.n_voxels = info["subject"], info["n_voxels"]
        return method

    # -------------------------------------------------------------- reconstruct
    def predict(self, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """betas (N, V) → (latents (N, C, h, w), text context (N, L, D) or None), re-standardised."""
        if self.latent is None:
            raise RuntimeError("the ridge is not fitted: call fit() or RidgeMethod.load(run_dir)")
        betas = self.check_betas(betas)
        z = restandardize(self.latent.predict(betas), self.latent).reshape(len(betas), *self.latent_shape)
        c = None
        if self.text is not None:
            c = restandardize(self.text.predict(betas), self.text).reshape(len(betas), *self.text_shape)
        return z, c

    def reconstruct(
        self,
        betas: np.ndarray,
        samples: int = 1,
        seed: int = 0,
        *,
        variant: str | None = None,
        settings: RidgeReconstruction | None = None,
    ) -> np.ndarray:
        """betas float32 (N, V) → uint8 (N, K, S, S, 3), S = the backbone's image size (pipeline.py)."""
        variant = self.resolve_variant(variant)
        cfg = self.resolve_settings(settings)
        z, c = self.predict(betas)
        return sample_images(
            self.backbone_in(cfg.precision), z, c, cfg, variant=variant, samples=samples, seed=seed
        )
