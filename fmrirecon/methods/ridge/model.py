"""Cross-validated ridge regression from voxels to many targets.

Alphas are chosen per target by the lowest K-fold cross-validated squared error (``local_alpha``, as in
Takagi & Nishimoto 2023 and Brain-Diffuser's per-feature regressions). Exact ways to run that search:

``"kfold_exact"``: one ridge on *all* trials per alpha, and the held-out residuals of every fold
from the leave-group-out deletion identity for linear smoothers (Hastie, Tibshirani & Friedman, ESL §7.10;
Allen's PRESS generalised from single trials to groups). With ``H = X (XᵀX + αI)⁻¹ Xᵀ`` the hat matrix of the
full fit, ``Ŷ = H Y``, and validation rows ``v``, the fit on the other folds predicts ``Y_v`` with residual

    E_v = (I − H_vv)⁻¹ (Y_v − Ŷ_v)

exactly (Woodbury on ``XᵀX − X_vᵀX_v``). Per alpha this costs one Cholesky factorisation, the full-data
predictions and K small ``n_val x n_val`` solves instead of K refits. For N ≥ V the primal form is used
(``G = XᵀX = LLᵀ``, ``Z = X L⁻ᵀ``, ``H_vv = Z_v Z_vᵀ``, ``Ŷ = Z L⁻¹ XᵀY``); for N < V the dual form
(``K = XXᵀ``, ``I − H = α (K + αI)⁻¹``, so ``E_v = ((K + αI)⁻¹_vv)⁻¹ ((K + αI)⁻¹ Y)_v``).

``"kfold_eigh"``: the same identity with one eigendecomposition ``XᵀX = QΛQᵀ`` shared by all alphas
(N ≥ V): with ``P = XQ`` and ``B = QᵀXᵀY``, ``H_vv = P_v (Λ + αI)⁻¹ P_vᵀ`` and ``Ŷ = P (Λ + αI)⁻¹ B``, so
an alpha costs one N x V x T product and the fold blocks, with no factorisation or triangular solve.
LAPACK's symmetric eigensolver runs its tridiagonal reduction at matrix-vector speed (the set-up, XᵀX +
eigh + P + B, takes about 5 min at NSD size on 2 cores, the cost of about two alphas of the Cholesky form), so
it pays off from a few alphas on; ``"auto"`` picks it for N ≥ V and more than 2 alphas, the Cholesky form
otherwise (benchmarks/bench_ridge.py: 841 s for 8 alphas at NSD size vs 1270 s for the Cholesky form).

``"primal"`` / ``"kernel"``: himalaya's RidgeCV (one SVD of the training voxels per fold) and KernelRidgeCV
(one eigendecomposition of the linear kernel per fold); same search, kept for comparison.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["RidgeFit", "fit_ridge_cv", "kfold_exact_ridge", "restandardize"]

Solver = Literal["auto", "kfold_exact", "kfold_eigh", "primal", "kernel"]
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
    progress_bar: bool | None = None,
) -> RidgeFit:
    """Fit ridge from voxels to targets with the alpha chosen by K-fold cross-validation.

    Args:
        betas: float (N, V) training betas (standardised here per voxel).
        targets: float (N, T) training targets (centred here; the mean becomes the intercept).
        alphas: candidate regularisation strengths.
        cv: number of folds (shuffled with ``seed``).
        solver: ``"kfold_exact"`` (one fit per alpha, held-out residuals by the deletion identity; torch),
            ``"kfold_eigh"`` (the same identity from one eigendecomposition of XᵀX shared by all alphas),
            ``"primal"`` (himalaya, SVD of X per fold), ``"kernel"`` (himalaya, eigendecomposition of X Xᵀ per
            fold) or ``"auto"`` (``"kfold_eigh"`` for N ≥ V and more than 2 alphas, else
            ``"kfold_exact"``: the fastest in benchmarks/bench_ridge.py).
        backend: himalaya backend (``"primal"``/``"kernel"`` only; ``"kfold_exact"`` runs torch on the CPU).
        local_alpha: choose one alpha per target (True) or one for all targets.
        n_targets_batch: solve targets in chunks of this size to bound memory.
        progress_bar: a bar over alphas (``"kfold_exact"``); None shows it when N·V·T > 1e11.

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
        solver = "kfold_eigh" if len(betas) >= betas.shape[1] and len(alphas) > 2 else "kfold_exact"
    if solver in ("kfold_exact", "kfold_eigh"):
        factorization = "eigh" if solver == "kfold_eigh" else "cholesky"
        best, coef, scores, pred_mean, pred_std = _fit_kfold_exact(
            X, Y, alphas, folds, local_alpha, n_targets_batch, progress_bar, factorization
        )
    elif solver in ("primal", "kernel"):
        best, coef, scores = _fit_himalaya(X, Y, alphas, folds, solver, backend, local_alpha, n_targets_batch)
        coef = np.ascontiguousarray(coef, dtype=np.float32)
        pred_mean, pred_std = _prediction_statistics(X, coef)
    else:
        raise ValueError(
            f"solver must be 'auto', 'kfold_exact', 'kfold_eigh', 'primal' or 'kernel', got {solver!r}"
        )
    return RidgeFit(
        x_mean=x_mean.astype(np.float32),
        x_std=x_std.astype(np.float32),
        coef=np.ascontiguousarray(coef, dtype=np.float32),
        y_mean=y_mean.astype(np.float32),
        y_std=y_std.astype(np.float32),
        best_alphas=np.broadcast_to(best, (Y.shape[1],)).astype(np.float32),
        cv_scores=scores,
        pred_mean=(pred_mean + y_mean).astype(np.float32),
        pred_std=pred_std.astype(np.float32),
    )


def _prediction_statistics(X: np.ndarray, coef: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-target mean and std of the in-sample predictions ``X @ coef``, a chunk of targets at a time
    (N x T predictions can be GBs at NSD size)."""
    pred_mean = np.empty(coef.shape[1], dtype=np.float32)
    pred_std = np.empty(coef.shape[1], dtype=np.float32)
    for start in range(0, coef.shape[1], 4096):
        pred = X @ coef[:, start : start + 4096]
        pred_mean[start : start + 4096], pred_std[start : start + 4096] = pred.mean(0), pred.std(0)
    return pred_mean, pred_std


def _fit_kfold_exact(X, Y, alphas, folds, local_alpha, n_targets_batch, progress_bar, factorization):
    import torch

    splits = [torch.from_numpy(val) for _, val in folds.split(X)]
    best, coef, errors, pred_mean, pred_std = kfold_exact_ridge(
        torch.from_numpy(X),
        torch.from_numpy(Y),
        alphas.tolist(),
        splits,
        local_alpha=local_alpha,
        n_targets_batch=n_targets_batch,
        progress_bar=progress_bar,
        factorization=factorization,
    )
    scores = -errors[best, np.arange(Y.shape[1])]
    return alphas[best], coef.numpy(), scores.astype(np.float32), pred_mean.numpy(), pred_std.numpy()


def kfold_exact_ridge(
    X,
    Y,
    alphas: list[float],
    validation_folds: list,
    *,
    local_alpha: bool = True,
    n_targets_batch: int | None = None,
    progress_bar: bool | None = None,
    factorization: Literal["cholesky", "eigh"] = "cholesky",
):
    """Exact K-fold ridge alpha search from one fit per alpha (the deletion identity in the module docstring).

    No intercept: X and Y are expected centred (``fit_ridge_cv`` standardises X and centres Y over all
    trials, as the scikit-learn reference does). Runs in the dtype of X (float32 for fits, float64 for
    exactness tests); the ``n_val x n_val`` fold systems are always factorised in float64.

    Args:
        X: torch (N, V) centred features.
        Y: torch (N, T) centred targets.
        alphas: A candidate penalties, all > 0.
        validation_folds: K disjoint int64 index tensors covering the trials (each fold's validation rows).
        local_alpha: one alpha per target (True), or the alpha with the lowest error summed over targets.
        n_targets_batch: targets per chunk (default: N x chunk ≈ 64 M elements, at least 256 targets).
        factorization: for N ≥ V, a Cholesky factorisation of XᵀX + αI per alpha (``"cholesky"``) or one
            eigendecomposition of XᵀX shared by all alphas (``"eigh"``); N < V always uses the dual form.

    Returns:
        best: int64 numpy (T,) index into ``alphas`` chosen per target,
        coef: torch (V, T) ridge weights refit on all trials with each target's alpha,
        errors: float64 numpy (A, T) validation mean squared error (mean over folds of per-fold MSE),
        pred_mean, pred_std: torch (T,) mean and std of the in-sample predictions ``X @ coef``.
    """
    import torch
    from tqdm.auto import tqdm

    n, t = Y.shape
    if X.ndim != 2 or len(X) != n:
        raise ValueError(f"X (N, V) and Y (N, T) must share N, got {tuple(X.shape)} and {tuple(Y.shape)}")
    if min(alphas) <= 0:
        raise ValueError(f"alphas must be > 0, got {alphas}")
    covered = torch.cat(list(validation_folds)).sort().values
    if not torch.equal(covered, torch.arange(n)):
        raise ValueError(f"validation_folds must partition the {n} trials exactly once")
    chunk = n_targets_batch or max(256, 2**26 // n)  # ~256 MB float32 blocks: wide products run faster
    if progress_bar is None:
        progress_bar = n * X.shape[1] * t > 1e11
    # rows reordered fold by fold, so each fold's rows are a contiguous slice of X, Y and the predictions
    order = torch.cat(list(validation_folds))
    bounds = np.cumsum([0] + [len(val) for val in validation_folds])
    folds = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    if n < X.shape[1]:
        ridge = _DualRidge(X[order])
    elif factorization == "eigh":
        ridge = _EigenRidge(X[order], Y[order])
    elif factorization == "cholesky":
        ridge = _PrimalRidge(X[order], X.T @ Y)
    else:
        raise ValueError(f"factorization must be 'cholesky' or 'eigh', got {factorization!r}")

    errors = np.zeros((len(alphas), t))
    pred_mean = torch.empty(len(alphas), t, dtype=X.dtype)
    pred_std = torch.empty(len(alphas), t, dtype=X.dtype)
    for i, alpha in enumerate(tqdm(alphas, desc="ridge alphas", disable=not progress_bar, leave=False)):
        ridge.set_alpha(alpha)
        deletion = [_spd_inverse(ridge.identity_minus_hat_block(rows)).to(X.dtype) for rows in folds]
        for start in range(0, t, chunk):
            targets = slice(start, start + chunk)
            residual = Y[:, targets][order]  # (N, chunk), becomes Y − Ŷ in place below
            pred = ridge.predict(residual, targets)  # full-data fit
            residual -= pred
            mean = pred.mean(0)
            pred_mean[i, targets] = mean
            pred_std[i, targets] = (pred.square().mean(0) - mean.square()).clamp_(min=0).sqrt_()
            for rows, inverse in zip(folds, deletion):
                held_out = inverse @ residual[rows]  # (n_val, chunk) residuals of the fit without this fold
                errors[i, targets] += held_out.square().mean(0).double().numpy()
    errors /= len(folds)

    best = errors.argmin(0) if local_alpha else np.full(t, errors.sum(1).argmin())
    coef = torch.empty(X.shape[1], t, dtype=X.dtype)
    for i in np.unique(best):
        targets = torch.from_numpy(np.flatnonzero(best == i))
        ridge.set_alpha(alphas[i])
        coef[:, targets] = ridge.coef(Y[:, targets][order], targets)
    picked = torch.from_numpy(best)[None]
    return best, coef, errors, pred_mean.gather(0, picked)[0], pred_std.gather(0, picked)[0]


def _spd_inverse(matrix):
    """Inverse of a symmetric positive definite matrix given by its lower triangle, factorised in float64
    (LU if rounding broke definiteness)."""
    import torch

    matrix = matrix.double()
    factor, info = torch.linalg.cholesky_ex(matrix)  # reads the lower triangle only
    if info != 0:
        lower = matrix.tril()
        return torch.linalg.inv(lower + lower.tril(-1).mT)
    return torch.cholesky_inverse(factor)  # LAPACK potri: (LLᵀ)⁻¹, half the flops of L⁻ᵀL⁻¹ by hand


class _PrimalRidge:
    """Ridge through the V x V Gram matrix (N ≥ V): G + αI = LLᵀ, Z = X L⁻ᵀ, so H = Z Zᵀ and Ŷ = Z L⁻¹ XᵀY.

    X: (N, V) rows in fold order; cross: (V, T) XᵀY.
    """

    def __init__(self, X, cross):
        self.X, self.cross = X, cross
        self.gram = X.T @ X  # (V, V)

    def set_alpha(self, alpha: float) -> None:
        import torch

        shifted = self.gram + alpha * torch.eye(len(self.gram), dtype=self.gram.dtype)
        self.factor = torch.linalg.cholesky(shifted)  # L, lower
        self.whitened = None  # Z, computed on first use: the final refit does not need it

    def identity_minus_hat_block(self, rows: slice):
        import torch

        if self.whitened is None:
            self.whitened = torch.linalg.solve_triangular(self.factor.mT, self.X, upper=True, left=False)
        z = self.whitened[rows]  # (n_val, V)
        return torch.eye(len(z), dtype=z.dtype) - z @ z.T

    def predict(self, Y, targets: slice):
        """Y: (N, chunk) the targets' columns (unused: XᵀY is precomputed) → Ŷ (N, chunk)."""
        import torch

        return self.whitened @ torch.linalg.solve_triangular(self.factor, self.cross[:, targets], upper=False)

    def coef(self, Y, targets):
        import torch

        return torch.cholesky_solve(self.cross[:, targets], self.factor)  # (G + αI)⁻¹ XᵀY


class _EigenRidge:
    """Ridge through one eigendecomposition of the V x V Gram matrix shared by all alphas (N ≥ V):
    G = Q Λ Qᵀ, so with P = X Q and B = Qᵀ XᵀY, D = (Λ + αI)⁻¹: H = P D Pᵀ, Ŷ = P D B and W = Q D B.

    No per-alpha factorisation or triangular solve: each alpha costs the predictions (one N x V x T matrix
    product) and the fold blocks of H (a symmetric rank-V product, BLAS ``syrk``). X: (N, V) and Y: (N, T),
    rows in fold order.
    """

    def __init__(self, X, Y):
        import torch

        eigenvalues, self.vectors = torch.linalg.eigh(X.T @ X)
        self.eigenvalues = eigenvalues.clamp_(min=0)  # G is PSD; rounding can leave tiny negatives
        self.projected = X @ self.vectors  # P = X Q, (N, V)
        self.rotated = self.projected.T @ Y  # B = Qᵀ XᵀY = Pᵀ Y, (V, T): one product instead of two

    def set_alpha(self, alpha: float) -> None:
        self.shrink = 1.0 / (self.eigenvalues + alpha)  # diagonal of D

    def identity_minus_hat_block(self, rows: slice):
        """``I − P_v D P_vᵀ``, lower triangle only (all a Cholesky factorisation reads)."""
        import torch
        from scipy.linalg.blas import dsyrk, ssyrk

        scaled = self.projected[rows] * self.shrink.sqrt()  # P_v D^½, (n_val, V), C order
        if scaled.device.type != "cpu" or scaled.dtype not in (torch.float32, torch.float64):
            return torch.eye(len(scaled), dtype=scaled.dtype, device=scaled.device) - scaled @ scaled.T
        syrk = ssyrk if scaled.dtype == torch.float32 else dsyrk
        # C-order (n_val, V) is F-order (V, n_val): trans=1 gives (P_v D^½)(P_v D^½)ᵀ without a copy.
        hat = torch.from_numpy(syrk(1.0, scaled.numpy().T, trans=1, lower=1))
        return torch.eye(len(hat), dtype=hat.dtype) - hat

    def predict(self, Y, targets: slice):
        """Y: (N, chunk) the targets' columns (unused: B is precomputed) → Ŷ (N, chunk)."""
        return self.projected @ (self.shrink[:, None] * self.rotated[:, targets])

    def coef(self, Y, targets):
        return self.vectors @ (self.shrink[:, None] * self.rotated[:, targets])


class _DualRidge:
    """Ridge through the N x N linear kernel (N < V): Y − Ŷ = α (K + αI)⁻¹ Y and I − H = α (K + αI)⁻¹.

    X: (N, V) rows in fold order.
    """

    def __init__(self, X):
        self.X = X
        self.kernel = X @ X.T  # (N, N)

    def set_alpha(self, alpha: float) -> None:
        import torch

        self.alpha = alpha
        shifted = self.kernel + alpha * torch.eye(len(self.kernel), dtype=self.kernel.dtype)
        self.factor = torch.linalg.cholesky(shifted)
        self.inverse = None  # (K + αI)⁻¹, computed on first use: the final refit does not need it

    def identity_minus_hat_block(self, rows: slice):
        import torch

        if self.inverse is None:
            identity = torch.eye(len(self.kernel), dtype=self.kernel.dtype)
            self.inverse = torch.cholesky_solve(identity, self.factor)
        return self.alpha * self.inverse[rows, rows]

    def predict(self, Y, targets: slice):
        """Y: (N, chunk) the targets' columns, rows in fold order → Ŷ (N, chunk)."""
        return Y - self.alpha * (self.inverse @ Y)

    def coef(self, Y, targets):
        import torch

        return self.X.T @ torch.cholesky_solve(Y, self.factor)  # Xᵀ (K + αI)⁻¹ Y


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
