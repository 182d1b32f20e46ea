"""Ridge alpha search: fmrirecon's ``fit_ridge_cv`` solvers vs scikit-learn refitting ``Ridge`` for every
alpha and fold.

Solvers: ``kfold_exact`` (one ridge fit per alpha on all trials by Cholesky, held-out residuals by the
deletion identity), ``kfold_eigh`` (the same identity from one eigendecomposition of XᵀX for all alphas),
``auto`` (what fmrirecon uses: ``kfold_eigh`` for N ≥ V and more than 2 alphas, else ``kfold_exact``),
``primal`` / ``kernel`` (himalaya RidgeCV / KernelRidgeCV: one decomposition per fold serves all alphas).

The NSD-sized problem is about 24,000 trials x 15,724 voxels (subj01 nsdgeneral) -> a 4x64x64 SD latent
(16,384 targets), float32, 8 alphas, 5-fold CV, alpha chosen per target. ``--scale`` shrinks trials and
voxels (targets stay 16,384 unless ``--targets`` says otherwise). Random data with a planted low-rank linear
signal whose SNR varies across targets, so the targets need different alphas.

scikit-learn does the same search by brute force: for each fold and alpha, ``Ridge(alpha).fit`` on all targets
and the validation squared error per target; the alpha with the lowest mean error per target wins; then one
refit per distinct chosen alpha on its targets. With ``--sklearn-folds k < 5`` only k folds are run and
timed, and the search time is extrapolated linearly to 5 folds (the report says so); chosen alphas and
predictions are then compared only when all folds ran.

    python benchmarks/bench_ridge.py --scale 0.125 --solvers kfold_exact primal   # full comparison, ~minutes
    python benchmarks/bench_ridge.py --scale 0.25 --sklearn-folds 1      # sklearn extrapolated from 1 fold
    python benchmarks/bench_ridge.py --scale 0.25 --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
from pathlib import Path

import numpy as np

FULL_TRIALS, FULL_VOXELS, FULL_TARGETS = 24_000, 15_724, 16_384
SOLVER_LABELS = {
    "auto": "fmrirecon auto (kfold_eigh when N >= V and > 2 alphas)",
    "kfold_exact": "fmrirecon kfold_exact (Cholesky per alpha + deletion identity, torch)",
    "kfold_eigh": "fmrirecon kfold_eigh (one eigh for all alphas + deletion identity, torch)",
    "primal": "himalaya RidgeCV (SVD)",
    "kernel": "himalaya KernelRidgeCV (eigh)",
}


def make_problem(n_train: int, n_test: int, n_voxels: int, n_targets: int, rank: int = 64, seed: int = 0):
    """X (n, V) ~ N(0, 1); Y = X A B · snr + ε with a rank-``rank`` map and per-target SNR in [0.03, 3]."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    X = rng.standard_normal((n, n_voxels), dtype=np.float32)
    A = rng.standard_normal((n_voxels, rank), dtype=np.float32) / np.sqrt(n_voxels)
    B = rng.standard_normal((rank, n_targets), dtype=np.float32) / np.sqrt(rank)
    snr = rng.permutation(np.logspace(-1.5, 0.5, n_targets)).astype(np.float32)
    Y = (X @ A) @ B * snr
    Y += rng.standard_normal(Y.shape, dtype=np.float32)
    return X[:n_train], Y[:n_train], X[n_train:], Y[n_train:]


def sklearn_single_fits(X, Y, alphas, cv: int, n_fits: int, seed: int = 0) -> tuple[float, float]:
    """Mean (wall, CPU) seconds of one brute-force ``Ridge(alpha).fit(...).predict(...)`` on a training fold,
    over the first ``n_fits`` alphas: the unit the full search repeats ``cv * len(alphas)`` times."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold

    Xs = (X - X.mean(0)) / X.std(0)
    Yc = Y - Y.mean(0)
    train, val = next(iter(KFold(cv, shuffle=True, random_state=seed).split(Xs)))
    Xt, Yt, Xv = Xs[train], Yc[train], Xs[val]
    walls, cpus = [], []
    for alpha in list(alphas)[:n_fits]:
        t0, c0 = time.perf_counter(), time.process_time()
        Ridge(alpha=float(alpha), fit_intercept=False).fit(Xt, Yt).predict(Xv)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        print(f"  sklearn fit alpha {alpha:.3g}: {walls[-1]:.1f} s wall, {cpus[-1]:.1f} s CPU", flush=True)
    return float(np.mean(walls)), float(np.mean(cpus))


def sklearn_search(X, Y, alphas, cv: int, n_folds_run: int, seed: int = 0):
    """Brute-force per-target alpha search; returns (best alphas or None, coef or None, timings)."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold

    t0, c0 = time.perf_counter(), time.process_time()
    x_mean, x_std = X.mean(0), X.std(0)
    Xs = (X - x_mean) / x_std
    y_mean = Y.mean(0)
    Yc = Y - y_mean
    errors = np.zeros((len(alphas), Y.shape[1]))
    for fold, (train, val) in enumerate(KFold(cv, shuffle=True, random_state=seed).split(Xs)):
        if fold >= n_folds_run:
            break
        for i, alpha in enumerate(alphas):
            pred = Ridge(alpha=float(alpha), fit_intercept=False).fit(Xs[train], Yc[train]).predict(Xs[val])
            errors[i] += ((pred - Yc[val]) ** 2).mean(0)
            print(f"  sklearn fold {fold} alpha {alpha:.3g}: {time.perf_counter() - t0:.1f} s", flush=True)
    search, search_cpu = time.perf_counter() - t0, time.process_time() - c0
    best = np.asarray(alphas)[errors.argmin(0)]
    t1, c1 = time.perf_counter(), time.process_time()
    coef = np.zeros((X.shape[1], Y.shape[1]), dtype=np.float32)
    for alpha in np.unique(best):
        cols = best == alpha
        ridge = Ridge(alpha=float(alpha), fit_intercept=False).fit(Xs, Yc[:, cols])
        coef[:, cols] = ridge.coef_.reshape(int(cols.sum()), -1).T
    refit, refit_cpu = time.perf_counter() - t1, time.process_time() - c1
    complete = n_folds_run >= cv

    def predict(Xt):
        return ((Xt - x_mean) / x_std) @ coef + y_mean

    timings = {"search": search, "refit": refit, "search_cpu": search_cpu, "refit_cpu": refit_cpu}
    return (best if complete else None), (predict if complete else None), timings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=0.25, help="fraction of NSD trials and voxels")
    parser.add_argument("--targets", type=int, default=FULL_TARGETS, help="number of targets (default 16384)")
    parser.add_argument("--alphas", type=int, default=8, help="number of alphas (log-spaced 1e1..1e6)")
    parser.add_argument("--cv", type=int, default=5, help="folds")
    parser.add_argument(
        "--sklearn-folds", type=int, default=None, help="folds to run with sklearn (default all)"
    )
    parser.add_argument(
        "--sklearn-fits",
        type=int,
        default=None,
        help="time only this many single sklearn fits on fold 0 and extrapolate the search to cv x alphas "
        "fits plus one fit per distinct alpha chosen by fmrirecon (a lower bound on sklearn's refit)",
    )
    parser.add_argument("--skip-sklearn", action="store_true", help="time fmrirecon's solvers only")
    parser.add_argument("--backend", default="torch", help="himalaya backend (torch, numpy, torch_cuda)")
    parser.add_argument(
        "--solvers",
        nargs="+",
        default=["auto"],
        choices=sorted(SOLVER_LABELS),
        help="fit_ridge_cv solvers to time (default: auto, the one fmrirecon uses)",
    )
    parser.add_argument(
        "--n-test", type=int, default=500, help="held-out trials for the prediction comparison"
    )
    parser.add_argument("--results", type=Path, default=None, help="append a markdown section to this file")
    args = parser.parse_args(argv)

    import torch

    from fmrirecon.methods.ridge import fit_ridge_cv

    n_train = int(round(FULL_TRIALS * args.scale))
    n_voxels = int(round(FULL_VOXELS * args.scale))
    alphas = tuple(np.logspace(1, 6, args.alphas).tolist())
    print(
        f"problem: {n_train} trials x {n_voxels} voxels -> {args.targets} targets, {args.alphas} alphas, "
        f"{args.cv}-fold CV, float32",
        flush=True,
    )
    t = time.perf_counter()
    X, Y, X_test, Y_test = make_problem(n_train, args.n_test, n_voxels, args.targets)
    print(f"data generated in {time.perf_counter() - t:.1f} s", flush=True)

    # warm-up: imports and backend initialisation are not part of the fit
    for solver in args.solvers:
        fit_ridge_cv(X[:50, :20], Y[:50, :3], alphas, cv=args.cv, backend=args.backend, solver=solver)
    import sklearn.linear_model  # noqa: F401

    rows = {
        "sizes": f"{n_train} trials x {n_voxels} voxels -> {args.targets} targets (scale {args.scale}), "
        f"{args.alphas} alphas, {args.cv}-fold CV, float32; {args.n_test} held-out trials",
    }
    fits, timings = {}, {}
    for solver in args.solvers:
        t, c = time.perf_counter(), time.process_time()
        fits[solver] = fit_ridge_cv(X, Y, alphas, cv=args.cv, backend=args.backend, solver=solver, seed=0)
        timings[solver] = (time.perf_counter() - t, time.process_time() - c)
        backend = "" if solver in ("auto", "kfold_exact") else f", backend {args.backend}"
        label = SOLVER_LABELS[solver] + backend
        print(f"{label}: {timings[solver][0]:.1f} s wall, {timings[solver][1]:.1f} s CPU", flush=True)
        rows[label] = f"{timings[solver][0]:.1f} s wall, {timings[solver][1]:.1f} s CPU (alpha per target)"
    first = fits[args.solvers[0]]
    pred_h = first.predict(X_test)
    r_h = float(np.mean([np.corrcoef(pred_h[:, j], Y_test[:, j])[0, 1] for j in range(0, args.targets, 64)]))
    rows["held-out r"] = f"{r_h:.3f} (mean over every 64th target)"
    if args.sklearn_fits and not args.skip_sklearn:
        wall1, cpu1 = sklearn_single_fits(X, Y, alphas, args.cv, args.sklearn_fits)
        n_distinct = len(np.unique(first.best_alphas))
        n_fits = args.cv * len(alphas) + n_distinct
        t_sklearn, c_sklearn = wall1 * n_fits, cpu1 * n_fits
        how = (
            f"extrapolated from {args.sklearn_fits} measured single fit(s) on a training fold: "
            f"{wall1:.1f} s wall / {cpu1:.1f} s CPU each x ({args.cv} folds x {len(alphas)} alphas + "
            f"{n_distinct} refits)"
        )
        print(f"sklearn: {t_sklearn:.1f} s wall, {c_sklearn:.1f} s CPU ({how})", flush=True)
        rows["scikit-learn, Ridge per alpha and fold"] = (
            f"{t_sklearn:.1f} s wall, {c_sklearn:.1f} s CPU ({how})"
        )
        for solver, (wall, cpu) in timings.items():
            rows[f"speed-up of {solver}"] = f"{t_sklearn / wall:.1f}x wall, {c_sklearn / cpu:.1f}x CPU"
    elif not args.skip_sklearn:
        folds = args.cv if args.sklearn_folds is None else min(args.sklearn_folds, args.cv)
        best, predict, times = sklearn_search(X, Y, alphas, args.cv, folds)
        t_sklearn = times["search"] * args.cv / folds + times["refit"]
        c_sklearn = times["search_cpu"] * args.cv / folds + times["refit_cpu"]
        how = (
            "measured"
            if folds == args.cv
            else f"extrapolated: {folds} of {args.cv} folds timed, x{args.cv / folds:g}"
        )
        print(f"sklearn: {t_sklearn:.1f} s wall, {c_sklearn:.1f} s CPU ({how})", flush=True)
        rows["scikit-learn, Ridge per alpha and fold"] = (
            f"{t_sklearn:.1f} s wall, {c_sklearn:.1f} s CPU ({how}; search {times['search']:.1f} s over "
            f"{folds} fold(s), refit per chosen alpha {times['refit']:.1f} s)"
        )
        for solver, (wall, cpu) in timings.items():
            rows[f"speed-up of {solver}"] = f"{t_sklearn / wall:.1f}x wall, {c_sklearn / cpu:.1f}x CPU"
        if best is not None:
            pred_s = predict(X_test)
            for solver, fit in fits.items():
                agree = float(np.mean(np.isclose(best, fit.best_alphas, rtol=1e-4)))
                diff = float(np.abs(pred_s - fit.predict(X_test)).max())
                rows[f"{solver} vs scikit-learn"] = (
                    f"same alpha for {agree:.2%} of targets; max held-out prediction difference {diff:.2e} "
                    f"(prediction std {float(pred_s.std()):.3f})"
                )
            rows["chosen alphas (scikit-learn)"] = ", ".join(
                f"{a:.3g}: {n}" for a, n in zip(*np.unique(best, return_counts=True))
            )
    machine = (
        f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} logical CPUs, torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at start of report"
    )
    rows["machine"] = machine
    rows["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    section = f"\n#### `bench_ridge.py --scale {args.scale}`\n\n| | |\n|---|---|\n{report}\n"
    print(section)
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        if not args.results.exists():
            args.results.write_text("# Benchmark results\n", encoding="utf-8")
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
