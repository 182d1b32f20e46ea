"""``encoding_map``: how well a linear low-level encoding model predicts each voxel of a run's subject.

A voxel-wise encoding model in the sense of Kay et al. (2008) and Naselaris et al. (2011): image features →
each voxel's repeat-averaged betas by ridge regression, fitted on the training images, the penalty chosen per
voxel on a held-out part of them, scored by the Pearson correlation between predicted and measured test betas
(shared images). The features are the images' mean colours on a ``grid × grid`` lattice (retinotopic,
low-level), so the map shows where the subject's voxels carry pixel-level information that a reconstruction
method's low-level path can use.

Writes ``encoding_r.nii.gz`` (r per voxel) and ``alpha.nii.gz`` (chosen penalty) in the subject's space, a
histogram of r, and ``results``: counts, mean / median r, and median r per ROI label where the store has ROIs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmrirecon.analysis.base import Analysis, AnalysisResult
from fmrirecon.errors import ConfigError

__all__ = ["EncodingMap", "EncodingMapConfig", "colour_grid_features", "pearson_columns"]


@dataclass
class EncodingMapConfig:
    """Attributes:
    grid: features are mean RGB colours of ``grid × grid`` cells (``3·grid²`` features).
    alphas: candidate ridge penalties (standardised features), chosen per voxel.
    validation_fraction: share of the training images held out to choose each voxel's penalty.
    """

    grid: int = 8
    alphas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4)
    validation_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.grid < 1 or not self.alphas or any(a <= 0 for a in self.alphas):
            raise ValueError("grid must be >= 1 and alphas a non-empty list of positive numbers")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must lie in (0, 1), got {self.validation_fraction}")


def colour_grid_features(images: np.ndarray, grid: int) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` → float64 ``(N, 3·grid²)``: mean colour of each cell (H, W divisible by
    grid)."""
    n, h, w, c = images.shape
    if h % grid or w % grid:
        raise ConfigError(
            f"encoding_map: grid {grid} does not divide the {h}×{w} images; choose another grid"
        )
    cells = images.reshape(n, grid, h // grid, grid, w // grid, c).astype(np.float64)
    return cells.mean(axis=(2, 4)).reshape(n, -1) / 255.0


def pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of every column pair: ``(N, V), (N, V) → (V,)`` (0 where a column is constant)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    denominator = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(0) / denominator
    return np.where(denominator > 0, r, 0.0)


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """``argmin ||x w − y||² + alpha ||w||²``: ``(N, F), (N, V) → (F, V)``."""
    return np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ y)


class EncodingMap(Analysis):
    name = "encoding_map"
    description = "per-voxel test correlation of a ridge encoding model (image colour grid → voxel betas)"
    Config = EncodingMapConfig

    def run(self, run_dir: Path, run_info: dict[str, Any], store, *, device, seed: int) -> AnalysisResult:
        cfg = self.config
        subject = run_info.get("subject")
        if subject is None:
            raise ConfigError(
                f"encoding_map needs a run of one subject; {run_dir} is a run of subjects "
                f"{run_info.get('subjects')}"
            )
        subject_store = store.subject(subject)
        train_ids, train_betas = subject_store.averaged("train")
        test_ids, test_betas = subject_store.averaged("test")
        x = colour_grid_features(store.images(train_ids), cfg.grid)
        x_test = colour_grid_features(store.images(test_ids), cfg.grid)
        mean, std = x.mean(0), x.std(0) + 1e-8
        x, x_test = (x - mean) / std, (x_test - mean) / std
        y_mean = train_betas.mean(0)
        y = train_betas - y_mean

        # the penalty of each voxel: best held-out r on a seeded split of the training images
        order = np.random.default_rng(seed).permutation(len(x))
        n_val = max(2, int(round(cfg.validation_fraction * len(x))))
        val, fit = order[:n_val], order[n_val:]
        scores = np.stack([pearson_columns(x[val] @ _ridge(x[fit], y[fit], a), y[val]) for a in cfg.alphas])
        best = scores.argmax(0)  # (V,)
        weights = np.zeros((x.shape[1], y.shape[1]))
        for index in np.unique(best):
            voxels = best == index
            weights[:, voxels] = _ridge(x, y[:, voxels], cfg.alphas[index])
        r = pearson_columns(x_test @ weights + y_mean, test_betas)
        alphas = np.asarray(cfg.alphas)[best]

        results: dict[str, Any] = {
            "subject": int(subject),
            "n_train": int(len(train_ids)),
            "n_test": int(len(test_ids)),
            "n_voxels": int(len(r)),
            "n_features": int(x.shape[1]),
            "mean_r": float(r.mean()),
            "median_r": float(np.median(r)),
            "fraction_r_above_0.2": float((r > 0.2).mean()),
        }
        per_roi = {}
        for roi, codes in subject_store.rois.items():
            labels = subject_store.roi_labels.get(roi, [])
            for code in np.unique(codes[codes > 0]):
                name = labels[code - 1] if 0 < code <= len(labels) else f"{roi}:{int(code)}"
                per_roi[name] = float(np.median(r[codes == code]))
        if per_roi:
            results["median_r_per_roi"] = per_roi
        return AnalysisResult(
            results=results,
            figures={"encoding_r_histogram": _histogram_png(r, f"subj{int(subject):02d}")},
            voxel_maps={"encoding_r": r, "alpha": alphas},
        )


def _histogram_png(r: np.ndarray, label: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.6), dpi=80)
    ax.hist(r, bins=40, range=(-1, 1), color="#4c72b0")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("test r (predicted vs measured betas)")
    ax.set_ylabel("voxels")
    ax.set_title(f"encoding model, {label}", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
