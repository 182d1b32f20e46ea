"""Cross-validated ridge regression from voxels to many targets, on himalaya.

One SVD of the training voxels (primal, n ≥ p) or one eigendecomposition of the linear kernel (dual, n < p)
per fold serves every alpha and every target, so the alpha search costs about as much as one fit — unlike
refitting a ridge per alpha and fold. Alphas are chosen per target by the lowest cross-validated squared error
(``local_alpha``, as in Takagi & Nishimoto 2023 and Brain-Diffuser's per-feature regressions).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["RidgeFit", "fit_ridge_cv", "restandardize"]

Solver = Literal["auto", "primal", "kernel"]
Backend = Literal["numpy", "torch", "torch_cuda"]  # himalaya names; "torch" = torch on CPU


@dataclass
class RidgeFit:
    """A fitted ridge map ``Y ≈ ((X - x_mean) / x_std) @ coef + y_mean``.

    Attributes:
        x_mean, x_std: float32 (V,) voxel standardisation from the training betas.
        coef: float32 (V, T) weights on standardised voxels.
        y_mean: float32 (T,) training target mean (the intercept).
        y_std: float32 (T,) training target std (the scale predictions are re-standardised to).
        best_alphas: float32 (T,) alpha chosen per target.
        cv_scores: float32 (T,) cross-validated score (negative squared error) of the chosen alpha.
        pred_mean, pred_std: float32 (T,) statistics of the in-sample predictions, used to re-standardise
            when a batch is too small to estimate its own.
    """

    x_mean: np.ndarray
    x_std: np.ndarray
    coef: np.ndarray
    y_mean: np.ndarray
    y_std: np.ndarray
    best_alphas: np.ndarray
    cv_scores: np.ndarray
    pred_mean: np.ndarray
    pred_std: np.ndarray

    def predict(self, betas: np.ndarray) -> np.ndarray:
        """betas float (N, V) → float32 (N, T) raw ridge predictions."""
        betas = np.asarray(betas, dtype=np.float32)
        if betas.ndim != 2 or betas.shape[1] != self.coef.shape[0]:
            raise ValueError(f"betas must be (N, {self.coef.shape[0]}), got {betas.shape}")
        return ((betas - self.x_mean) / self.x_std) @ self.coef + self.y_mean

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.{k}": v for k, v in vars(self).items()}

    @classmethod
    def from_tensors(cls, tensors: dict, prefix: str) -> RidgeFit:
        return cls(**{k: np.asarray(tensors[f"{prefix}.{k}"]) for k in cls.__dataclass_fields__})


def restandardize(pred: np.ndarray, fit: RidgeFit, min_batch: int = 2) -> np.ndarray:
    """Map predictions to the training targets' per-feature mean and std.

    Ridge shrinks predictions toward the mean; Brain-Diffuser (Ozcelik & VanRullen 2023, §2.3) and
    NeuralDiffuser (Eq. 6–7) z-score the test predictions per feature and rescale them to the training
    features' statistics. With fewer than ``min_batch`` rows the batch statistics are undefined and the
    in-sample prediction statistics stand in.

    pred: (N, T) → (N, T).
    """
    if len(pred) >= min_batch:
        mean, std = pred.mean(0), pred.std(0)
    else:
        mean, std = fit.pred_mean, fit.pred_std
    return ((pred - mean) / np.maximum(std, 1e-8) * fit.y_std + fit.y_mean).astype(np.float32)


@contextlib.contextmanager
def _himalaya_backend(name: str):
    from himalaya.backend import get_backend, set_backend

    previous = get_backend().name
    backend = set_backend(name, on_error="raise")
    try:
        yield backend
    finally:
        set_backend(previous, on_error="warn")


def fit_ridge_cv(
    betas: np.ndarray,
    targets: np.ndarray,
    alphas: tuple[float, ...] | list[float],
    *,
    cv: int = 5,
    solver: Solver = "auto",
    backend: Backend = "torch",
    local_alpha: bool = True,
    n_targets_batch: int | None = None,
    seed: int = 0,
) -> RidgeFit:
    """Fit ridge from voxels to targets with the alpha chosen by K-fold cross-validation.

    Args:
        betas: float (N, V) training betas (standardised here per voxel).
        targets: float (N, T) training targets (centred here; the mean becomes the intercept).
        alphas: candidate regularisation strengths.
        cv: number of folds (shuffled with ``seed``).
        solver: ``"primal"`` (SVD of X), ``"kernel"`` (eigendecomposition of X Xᵀ) or ``"auto"`` (the smaller
            of N and V decides).
        backend: himalaya backend.
        local_alpha: choose one alpha per target (True) or one for all targets.
        n_targets_batch: solve targets in chunks of this size to bound memory.

    Returns:
        a :class:`RidgeFit`.
    """
    from sklearn.model_selection import KFold

    betas = np.asarray(betas, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.float32)
    if betas.ndim != 2 or targets.ndim != 2 or len(betas) != len(targets):
        raise ValueError(
            f"betas (N, V) and targets (N, T) must share N, got {betas.shape} and {targets.shape}"
        )
    if len(betas) < cv:
        raise ValueError(f"{cv}-fold cross-validation needs at least {cv} samples, got {len(betas)}")
    alphas = np.asarray(sorted(float(a) for a in alphas), dtype=np.float32)
    x_mean = betas.mean(0)
    x_std = betas.std(0)
    x_std[x_std == 0] = 1.0  # constant voxels carry no signal; leave them at zero instead of dividing by 0
    X = (betas - x_mean) / x_std
    y_mean, y_std = targets.mean(0), targets.std(0)
    Y = targets - y_mean
    folds = KFold(n_splits=cv, shuffle=True, random_state=seed)
    if solver == "auto":
        solver = "primal" if X.shape[0] >= X.shape[1] else "kernel"
    best, coef, scores = _fit_himalaya(X, Y, alphas, folds, solver, backend, local_alpha, n_targets_batch)
    coef = np.ascontiguousarray(coef, dtype=np.float32)
    # in-sample prediction statistics, a chunk of targets at a time (N x T predictions can be GBs at NSD size)
    pred_mean = np.empty(coef.shape[1], dtype=np.float32)
    pred_std = np.empty(coef.shape[1], dtype=np.float32)
    for start in range(0, coef.shape[1], 4096):
        pred = X @ coef[:, start : start + 4096]
        pred_mean[start : start + 4096], pred_std[start : start + 4096] = pred.mean(0), pred.std(0)
    return RidgeFit(
        x_mean=x_mean.astype(np.float32),
        x_std=x_std.astype(np.float32),
        coef=coef,
        y_mean=y_mean.astype(np.float32),
        y_std=y_std.astype(np.float32),
        best_alphas=np.broadcast_to(best, (Y.shape[1],)).astype(np.float32),
        cv_scores=scores,
        pred_mean=(pred_mean + y_mean).astype(np.float32),
        pred_std=pred_std,
    )


def _fit_himalaya(X, Y, alphas, folds, solver, backend, local_alpha, n_targets_batch):
    """himalaya's RidgeCV (SVD of X per fold) or KernelRidgeCV (eigendecomposition of X Xᵀ per fold)."""
    from himalaya.kernel_ridge import KernelRidgeCV
    from himalaya.ridge import RidgeCV

    params = {
        "local_alpha": local_alpha,
        "n_targets_batch": n_targets_batch,
        "n_targets_batch_refit": n_targets_batch,
    }
    with _himalaya_backend(backend) as bk:
        if solver == "primal":
            model = RidgeCV(alphas=alphas, solver="svd", solver_params=params, cv=folds)
            model.fit(X, Y)
            coef = bk.to_numpy(model.coef_)
        else:
            model = KernelRidgeCV(
                alphas=alphas, kernel="linear", solver="eigenvalues", solver_params=params, cv=folds
            )
            model.fit(X, Y)
            coef = bk.to_numpy(model.get_primal_coef())
        best = np.broadcast_to(bk.to_numpy(model.best_alphas_), (Y.shape[1],)).astype(np.float32)
        scores = bk.to_numpy(model.cv_scores_).astype(np.float32)
    return best, coef, scores
