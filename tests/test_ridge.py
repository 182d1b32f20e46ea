"""Ridge baseline: the exact K-fold search (deletion identity) equals explicit per-fold refits and himalaya,
the CV fit equals a brute-force scikit-learn search, a planted signal is decoded, save→load round trip,
deterministic reconstruction, subject checks."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold

from fmrirecon.data.store import PreparedStore
from fmrirecon.errors import ConfigError, SubjectMismatchError
from fmrirecon.methods import get_method
from fmrirecon.methods.base import RunData, init_run_dir
from fmrirecon.methods.ridge import RidgeConfig, RidgeMethod, RidgeReconstruction, fit_ridge_cv, restandardize
from fmrirecon.methods.ridge.model import kfold_exact_ridge

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "star", "triangle", "house")


def write_tiny_store(path: Path, voxels: dict[int, int], n_images: int = 56, n_test: int = 12, seed: int = 0):
    """A prepared store in the contract layout with a planted linear code: betas = pixels(4x4x3) @ W + ε."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    ids = np.sort(rng.choice(73000, size=n_images, replace=False)).astype(np.int64)
    coarse = rng.random((n_images, 4, 4, 3))
    images = (np.kron(coarse, np.ones((1, 8, 8, 1))) * 255).round().astype(np.uint8)  # (N, 32, 32, 3)
    captions = [
        [f"a {COLOURS[int(np.argmax(coarse[i].mean((0, 1))) % 4)]} {SHAPES[(i + k) % 4]}" for k in range(4)]
        + ["a thing"]  # one vague caption, as in the world
        for i in range(n_images)
    ]
    with h5py.File(path / "stimuli.hdf5", "w") as f:
        f["images"] = images
        f["ids_73k"] = ids
        f.create_dataset("captions", data=np.array(captions, dtype=object), dtype=h5py.string_dtype())
    shared = np.zeros(n_images, dtype=bool)
    shared[rng.choice(n_images, size=n_test, replace=False)] = True
    features = coarse.reshape(n_images, -1) - 0.5
    for subject, n_vox in voxels.items():
        weights = rng.standard_normal((features.shape[1], n_vox))
        order = np.concatenate([rng.permutation(n_images), rng.permutation(n_images)])  # 2 repeats
        betas = features[order] @ weights + 0.5 * rng.standard_normal((order.size, n_vox))
        trials = {
            "image_id_73k": ids[order],
            "session": (np.arange(order.size) >= n_images).astype(np.int64) + 1,
            "repeat": (np.arange(order.size) >= n_images).astype(np.int64),
            "shared": shared[order],
            "global_trial": np.arange(order.size),
            "trial_in_session": np.arange(order.size) % n_images,
        }
        with h5py.File(path / f"subj{subject:02d}.hdf5", "w") as f:
            f["betas"] = betas.astype(np.float32)
            for name, values in trials.items():
                f[f"trials/{name}"] = values
            f["voxel_ijk"] = np.stack(np.unravel_index(np.arange(n_vox), (8, 8, 8)), 1)
            f["affine"] = np.eye(4)
            f.attrs["subject"] = subject
            f.attrs["n_sessions"] = 2
    manifest = {
        "format": "fmrirecon-store",
        "version": 1,
        "source": {"kind": "test"},
        "subjects": sorted(voxels),
        "sessions": {str(s): 2 for s in voxels},
        "roi": "nsdgeneral",
        "world": None,
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.fixture(scope="module")
def tiny_ld():
    from fmrirecon.backbones.world.models import tiny_latent_diffusion

    return tiny_latent_diffusion(seed=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_tiny_store(tmp_path_factory.mktemp("store"), voxels={1: 40, 2: 37})


TINY = RidgeConfig(
    alphas=(1e-1, 1.0, 10.0, 100.0, 1e3),
    cv_folds=4,
    target_batch_size=8,
    reconstruction=RidgeReconstruction(num_steps=4, strength=0.5, cfg_scale=2.0, batch_size=8),
)


@pytest.fixture(scope="module")
def fitted(store, tiny_ld, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    init_run_dir(run_dir, method="ridge", config=TINY, subject=1, store_path=store, seed=0)
    method = RidgeMethod(TINY, backbone=tiny_ld)
    method.fit(RunData.target(store, 1), run_dir, seed=0)
    return method, run_dir


ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0, 1e4)


def planted_problem(n: int, p: int, seed: int = 0):
    """X (n, p), Y (n, 6) with a planted signal whose SNR falls over the 6 targets, so their alphas differ."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    Y = X[:, :5] @ rng.standard_normal((5, 6)) * [3, 1, 0.3, 0.1, 0.03, 0.01] + rng.standard_normal((n, 6))
    return X, Y


def explicit_cv_errors(X, Y, alphas, splits):
    """(A, T) mean over folds of the per-fold validation MSE of ``Ridge`` refit on the other folds."""
    errors = np.zeros((len(alphas), Y.shape[1]))
    for train, val in splits:
        for i, alpha in enumerate(alphas):
            pred = Ridge(alpha=alpha, fit_intercept=False).fit(X[train], Y[train]).predict(X[val])
            errors[i] += ((pred - Y[val]) ** 2).mean(0)
    return errors / len(splits)


@pytest.mark.parametrize("factorization", ["cholesky", "eigh"])
@pytest.mark.parametrize("shape", [(90, 20), (20, 60), (41, 41)])  # primal (N ≥ V) and dual (N < V) forms
def test_kfold_exact_errors_equal_explicit_refits_in_float64(shape, factorization):
    X, Y = planted_problem(*shape)
    X, Y = X - X.mean(0), Y - Y.mean(0)
    splits = list(KFold(5, shuffle=True, random_state=0).split(X))
    best, coef, errors, pred_mean, pred_std = kfold_exact_ridge(
        torch.from_numpy(X),
        torch.from_numpy(Y),
        list(ALPHAS),
        [torch.from_numpy(v) for _, v in splits],
        factorization=factorization,
    )
    reference = explicit_cv_errors(X, Y, ALPHAS, splits)
    np.testing.assert_allclose(errors, reference, rtol=1e-8)
    np.testing.assert_array_equal(best, reference.argmin(0))
    assert len(set(best.tolist())) > 1
    for t, i in enumerate(best):
        ref = Ridge(alpha=ALPHAS[i], fit_intercept=False).fit(X, Y[:, t]).coef_
        np.testing.assert_allclose(coef[:, t].numpy(), ref, rtol=1e-8, atol=1e-12)
    pred = X @ coef.numpy()
    np.testing.assert_allclose(pred_mean.numpy(), pred.mean(0), atol=1e-12)
    np.testing.assert_allclose(pred_std.numpy(), pred.std(0), rtol=1e-10)


def test_kfold_exact_shared_alpha_minimises_summed_error():
    X, Y = planted_problem(60, 15, seed=2)
    X, Y = X - X.mean(0), Y - Y.mean(0)
    splits = list(KFold(4, shuffle=True, random_state=1).split(X))
    best, coef, errors, _, _ = kfold_exact_ridge(
        torch.from_numpy(X),
        torch.from_numpy(Y),
        list(ALPHAS),
        [torch.from_numpy(v) for _, v in splits],
        local_alpha=False,
    )
    shared = explicit_cv_errors(X, Y, ALPHAS, splits).sum(1).argmin()
    np.testing.assert_array_equal(best, np.full(Y.shape[1], shared))
    ref = Ridge(alpha=ALPHAS[shared], fit_intercept=False).fit(X, Y).coef_.T
    np.testing.assert_allclose(coef.numpy(), ref, rtol=1e-8, atol=1e-12)


def test_kfold_exact_rejects_bad_alphas_and_folds():
    X, Y = torch.zeros(10, 3), torch.zeros(10, 2)
    folds = [torch.arange(5), torch.arange(5, 10)]
    with pytest.raises(ValueError, match="alphas must be > 0"):
        kfold_exact_ridge(X, Y, [0.0, 1.0], folds)
    with pytest.raises(ValueError, match="must partition the 10 trials"):
        kfold_exact_ridge(X, Y, [1.0], [torch.arange(5), torch.arange(4, 10)])
    with pytest.raises(ValueError, match="solver must be"):
        fit_ridge_cv(X.numpy(), Y.numpy(), (1.0,), cv=2, solver="svd")
    with pytest.raises(ValueError, match="factorization must be"):
        kfold_exact_ridge(X, Y, [1.0], folds, factorization="qr")


def test_spd_inverse_reads_the_lower_triangle_and_falls_back_when_not_definite():
    from fmrirecon.methods.ridge.model import _spd_inverse

    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 30, generator=g, dtype=torch.float64)
    spd = a @ a.T / 30 + torch.eye(12, dtype=torch.float64)
    # The fold blocks come as lower triangles (syrk); what lies above the diagonal must not matter.
    lower_only = spd.tril() + torch.triu(torch.full_like(spd, 7.0), 1)
    torch.testing.assert_close(_spd_inverse(lower_only), torch.linalg.inv(spd))
    indefinite = spd - 2.0 * torch.eye(12, dtype=torch.float64)  # symmetric, not positive definite
    torch.testing.assert_close(
        _spd_inverse(indefinite.tril() + torch.triu(torch.full_like(spd, 7.0), 1)),
        torch.linalg.inv(indefinite),
    )


def test_eigen_fold_block_by_syrk_equals_the_explicit_hat_block():
    from fmrirecon.methods.ridge.model import _EigenRidge

    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 12, generator=g, dtype=torch.float64)
    ridge = _EigenRidge(X, torch.randn(40, 3, generator=g, dtype=torch.float64))
    ridge.set_alpha(3.0)
    rows = slice(8, 16)
    hat = X[rows] @ torch.linalg.solve(X.T @ X + 3.0 * torch.eye(12, dtype=X.dtype), X[rows].T)
    explicit = torch.eye(8, dtype=X.dtype) - hat
    torch.testing.assert_close(ridge.identity_minus_hat_block(rows).tril(), explicit.tril())  # BLAS syrk
    # Off the BLAS path (a dtype scipy has no syrk for, like a GPU tensor would be): the plain product.
    ridge.projected = ridge.projected.to(torch.bfloat16)
    ridge.shrink = ridge.shrink.to(torch.bfloat16)
    block = ridge.identity_minus_hat_block(rows)
    assert block.dtype == torch.bfloat16
    torch.testing.assert_close(block.double(), explicit, atol=0.05, rtol=0.05)


@pytest.mark.parametrize(("shape", "himalaya"), [((90, 20), "primal"), ((20, 60), "kernel")])
def test_kfold_exact_agrees_with_himalaya(shape, himalaya):
    X, Y = planted_problem(*shape, seed=3)
    exact = fit_ridge_cv(X, Y, ALPHAS, cv=5, solver="kfold_exact", seed=0)
    reference = fit_ridge_cv(X, Y, ALPHAS, cv=5, solver=himalaya, seed=0)
    np.testing.assert_allclose(exact.best_alphas, reference.best_alphas, rtol=1e-6)  # himalaya rounds
    np.testing.assert_allclose(exact.cv_scores, reference.cv_scores, rtol=1e-4)
    pred, ref = exact.predict(X[:7]), reference.predict(X[:7])
    np.testing.assert_allclose(pred, ref, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(exact.pred_std, reference.pred_std, rtol=1e-4)
    np.testing.assert_allclose(exact.pred_mean, reference.pred_mean, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "solver"),  # primal (N ≥ V) and dual (N < V) shapes; himalaya's solver for each shape
    [
        ((90, 20), "auto"),
        ((20, 60), "auto"),
        ((90, 20), "kfold_eigh"),
        ((90, 20), "primal"),
        ((20, 60), "kernel"),
    ],
)
def test_fit_ridge_cv_matches_brute_force_sklearn_search(shape, solver):
    X, Y = planted_problem(*shape)
    X, Y = X.astype(np.float32), Y.astype(np.float32)
    fit = fit_ridge_cv(X, Y, ALPHAS, cv=5, seed=0, solver=solver)

    Xs = (X - X.mean(0)) / X.std(0)
    Yc = Y - Y.mean(0)
    splits = list(KFold(5, shuffle=True, random_state=0).split(Xs))
    errors = explicit_cv_errors(Xs, Yc, ALPHAS, splits)
    best = np.asarray(ALPHAS)[errors.argmin(0)]
    np.testing.assert_allclose(fit.best_alphas, best, rtol=1e-5)
    np.testing.assert_allclose(fit.cv_scores, -errors.min(0), rtol=1e-4)
    assert len(set(best.tolist())) > 1  # the targets differ in SNR, so their alphas must differ
    for t in range(Y.shape[1]):
        ref = Ridge(alpha=float(best[t]), fit_intercept=False).fit(Xs, Yc[:, t]).coef_
        np.testing.assert_allclose(fit.coef[:, t], ref, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(fit.predict(X[:3]), Xs[:3] @ fit.coef + Y.mean(0), rtol=1e-4, atol=1e-4)


def test_restandardize_matches_training_statistics():
    rng = np.random.default_rng(1)
    fit = fit_ridge_cv(
        rng.standard_normal((40, 8)), rng.standard_normal((40, 3)) * [1, 5, 9] + 2, (1.0, 10.0), cv=4
    )
    out = restandardize(rng.standard_normal((30, 3)) * 0.1, fit)
    np.testing.assert_allclose(out.mean(0), fit.y_mean, atol=1e-5)
    np.testing.assert_allclose(out.std(0), fit.y_std, rtol=1e-4)
    single = restandardize(np.array([fit.pred_mean + fit.pred_std]), fit)  # one row: in-sample statistics
    np.testing.assert_allclose(single[0], fit.y_mean + fit.y_std, rtol=1e-4)


def test_ridge_decodes_planted_signal_better_than_chance(fitted, store, tiny_ld):
    method, _ = fitted
    prepared = PreparedStore(store)
    ids, betas = prepared.subject(1).averaged("test")
    true = method.image_targets(prepared.images(ids))
    z, c = method.predict(betas)
    pred = z.reshape(len(ids), -1)
    corr = np.corrcoef(pred, true)[: len(ids), len(ids) :]  # (N, N): prediction i vs true latent j
    two_way = np.mean([(corr[i, i] > corr[i, np.arange(len(ids)) != i]).mean() for i in range(len(ids))])
    assert two_way > 0.8, two_way  # chance is 0.5
    assert c.shape == (len(ids), tiny_ld.context_length, tiny_ld.encode_text(["a"]).shape[-1])
    assert np.isfinite(c).all()


def test_save_load_round_trip_and_deterministic_reconstruction(fitted, store, tiny_ld):
    method, run_dir = fitted
    loaded = get_method("ridge").load(run_dir, backbone=tiny_ld)
    _, betas = PreparedStore(store).subject(1).averaged("test")
    betas = betas[:4]
    for a, b in zip(method.predict(betas), loaded.predict(betas)):
        np.testing.assert_array_equal(a, b)
    images = loaded.reconstruct(betas, samples=2, seed=3)
    assert images.shape == (4, 2, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, method.reconstruct(betas, samples=2, seed=3))
    assert not np.array_equal(images[:, 0], images[:, 1])  # samples differ in their noise
    assert not np.array_equal(images, method.reconstruct(betas, samples=2, seed=4))
    latent_only = method.reconstruct(betas, samples=2, variant="latent")
    np.testing.assert_array_equal(latent_only[:, 0], latent_only[:, 1])
    info = json.loads((run_dir / "ridge.json").read_text())
    assert info["subject"] == 1 and info["n_voxels"] == 40 and info["latent_shape"] == [4, 16, 16]
    assert sum(info["alphas_chosen"]["latent"].values()) == 4 * 16 * 16


def test_betas_of_another_subject_are_refused(fitted, store):
    method, _ = fitted
    _, other = PreparedStore(store).subject(2).averaged("test")
    with pytest.raises(SubjectMismatchError, match="betas have 37 voxels .* subject 1 with 40 voxels"):
        method.reconstruct(other)


def test_registry_returns_ridge_and_rejects_unknown_names():
    assert get_method("ridge") is RidgeMethod
    with pytest.raises(ConfigError, match=r"unknown method 'ridgee'; expected one of \[.*'ridge'"):
        get_method("ridgee")
