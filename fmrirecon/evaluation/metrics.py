"""Functional core of the evaluation suite: pure functions on arrays, no models, no files.

Every function follows the field's published evaluation code as summarised in
``shared/reference/evaluation-protocol.md`` (MindEye ``Reconstruction_Metrics.py``, Brain-Diffuser
``evaluate_reconstruction.py``, Mind Reader appendix A.4, CnD appendix 8.1, NeuralDiffuser Tab. 2). Per-image
functions return one value per image so that the suite can average over samples or keep the best of k.

Array conventions: ``N`` images, ``D`` flattened feature values, ``V`` voxels, ``C`` classes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
from scipy import stats

# scikit-image's SSIM settings used by MindEye and Brain-Diffuser (Wang et al. 2004 Gaussian window).
SSIM_KWARGS = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "data_range": 1.0}

# The score of a per-image correlation that is undefined: a constant image (a blank reconstruction) or
# constant features have no Pearson r. ``np.corrcoef`` and ``scipy.stats.pearsonr`` return NaN there (scipy
# with a ConstantInputWarning), so MindEye's mean becomes NaN, and ``np.nanmean`` would drop the image: a
# method that gives up on its hardest trials would score higher than one that tries. A comparison table
# needs every method averaged over every image, so an undefined r scores 0, "no linear relation" (PixCorr's
# chance level), as scikit-learn's ``r_regression(force_finite=True)`` (the default since 1.1) and AllenNLP's
# ``PearsonCorrelation`` (zero variance -> r = 0) define it; a correlation distance scores 1 - 0 = 1.
UNDEFINED_CORRELATION = 0.0
# A row counts as constant when its spread is rounding noise: centred norm <= CONSTANT_ROW_ULPS * eps(dtype) *
# sqrt(D) * max|x|. A blank image resized bilinearly in float32 (the mindeye preset) is not exactly constant
# and would get a meaningless r from its rounding pattern: blank images of every grey level at 64-500 px
# measure <= 0.44 in these units; one grey level (1/255) on one pixel of a 500 px white image measures 14.
CONSTANT_ROW_ULPS = 2


def _flatten_pair(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{what}: both sets need the same image count, got {a.shape[0]} and {b.shape[0]}")
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{what}: feature sizes differ per image, got {a.shape[1]} and {b.shape[1]}")
    return a, b


def _row_pearson(a: np.ndarray, b: np.ndarray, chunk_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r between row i of ``a`` and row i of ``b``; a, b: (N, D) -> r (N,), undefined (N,) bool.

    ``undefined`` marks pairs where either row is constant (up to rounding, ``CONSTANT_ROW_ULPS``); r is
    ``UNDEFINED_CORRELATION`` there. Rows are converted to float64 ``chunk_size`` at a time, so memory stays
    bounded for large D.
    """
    r = np.empty(len(a))
    undefined = np.empty(len(a), dtype=bool)
    for start in range(0, len(a), chunk_size):
        a_c, a_constant = _centred_unit_rows(a[start : start + chunk_size])
        b_c, b_constant = _centred_unit_rows(b[start : start + chunk_size])
        rows = slice(start, start + len(a_c))
        r[rows] = (a_c * b_c).sum(axis=1)
        undefined[rows] = a_constant | b_constant
    r[undefined] = UNDEFINED_CORRELATION
    return r, undefined


def pixcorr(
    recons: np.ndarray, truths: np.ndarray, *, return_undefined: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Pixel correlation per image (MindEye's PixCorr).

    recons, truths: (N, ...) float images (any layout; each image is flattened, all channels together) -> (N,)
    Pearson r between each reconstruction and its ground truth. The suite averages over images.
    A constant image (blank reconstruction) has no r and scores ``UNDEFINED_CORRELATION`` (0); with
    ``return_undefined`` the (N,) bool mask of those images is returned too, so a caller can count them.
    """
    recons, truths = _flatten_pair(recons, truths, "pixcorr")
    r, undefined = _row_pearson(recons, truths)
    return (r, undefined) if return_undefined else r


def rgb_to_gray(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) float in [0, 1] -> (N, H, W) luminance with scikit-image's ``rgb2gray`` weights."""
    from skimage.color import rgb2gray

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"rgb_to_gray expects (N, H, W, 3) images, got shape {images.shape}")
    return rgb2gray(images)


def ssim(recons: np.ndarray, truths: np.ndarray, variant: str = "2d") -> np.ndarray:
    """Structural similarity per image on grayscale images.

    recons, truths: (N, H, W) float in [0, 1] -> (N,).
    ``variant="2d"`` is true 2-D SSIM (scikit-image ``structural_similarity`` with ``SSIM_KWARGS``; MindEye).
    ``variant="per_column"`` reproduces Brain-Diffuser's pinned scikit-image 0.17, whose
    ``multichannel=True`` on a 2-D gray image treated the width axis as channels: the mean over the W
    columns of 1-D SSIMs along the height.
    """
    from skimage.metrics import structural_similarity

    recons = np.asarray(recons, dtype=np.float64)
    truths = np.asarray(truths, dtype=np.float64)
    if recons.shape != truths.shape or recons.ndim != 3:
        raise ValueError(f"ssim expects two equal (N, H, W) gray stacks, got {recons.shape}, {truths.shape}")
    if variant == "2d":
        extra = {}
    elif variant == "per_column":
        extra = {"channel_axis": -1}
    else:
        raise ValueError(f"ssim variant must be '2d' or 'per_column', got {variant!r}")
    return np.array([structural_similarity(r, t, **SSIM_KWARGS, **extra) for r, t in zip(recons, truths)])


def _centred_unit_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) -> float64 rows with zero mean and unit norm, so a dot product is a Pearson r, and (n,) bool:
    rows constant up to rounding (``CONSTANT_ROW_ULPS``), whose unit rows are NaN (0 / 0) or noise."""
    eps = np.finfo(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64).eps
    x = x.astype(np.float64)
    scale = np.maximum(x.max(axis=1), -x.min(axis=1)) * np.sqrt(x.shape[1])  # max|x| * sqrt(D), (n,)
    x -= x.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    constant = norms[:, 0] <= CONSTANT_ROW_ULPS * eps * scale
    with np.errstate(invalid="ignore", divide="ignore"):
        return x / norms, constant


def _first_identical_rows(x: np.ndarray) -> np.ndarray:
    """(N, D) -> (N,) index of the first row byte-identical to row i (i itself when it is the first)."""
    first: dict[bytes, list[int]] = {}
    canonical = np.arange(len(x))
    for i, row in enumerate(x):
        candidates = first.setdefault(hashlib.blake2b(row.tobytes(), digest_size=16).digest(), [])
        match = next((k for k in candidates if np.array_equal(x[k], row)), None)
        if match is None:
            candidates.append(i)
        else:
            canonical[i] = match
    return canonical


def two_way_identification(
    truth_features: np.ndarray, recon_features: np.ndarray, *, chunk_size: int = 64
) -> np.ndarray:
    """Two-way identification per reconstruction, the whole set as one pool (MindEye / Brain-Diffuser).

    truth_features, recon_features: (N, ...) features of truth i and reconstruction j (flattened) -> (N,).
    With r[i, j] the Pearson r between truth i and reconstruction j, entry j is the fraction of the N - 1
    other truths i != j with r[i, j] < r[j, j]; the reported score is the mean over j (chance 0.5).

    Ties: MindEye's ``Reconstruction_Metrics.py`` takes r[j, j] and the r[i, j] it is compared with from one
    ``np.corrcoef`` matrix, so a truth identical to truth j ties with it exactly and a tie is no success
    (strict ``<``). Here the congruent r[j, j] is read off the same strip of products as the rest of column
    j, and byte-identical truths are correlated once and share that value, so they tie exactly whatever
    row of a BLAS tile they fall in (a matrix product may round the same dot product differently in
    another row position). A constant feature row gives NaN correlations, which beat nothing and are beaten
    by nothing, as in the reference.

    Memory: the N x N correlation is built one strip of ``chunk_size`` reconstructions (columns) at a time,
    truths in blocks of ``chunk_size`` rows, so only two (chunk_size, D) float64 blocks and one
    (N, chunk_size) strip live at once (AlexNet ``features.4`` at 256 px has D = 184,512).
    """
    truth_features, recon_features = _flatten_pair(truth_features, recon_features, "two_way_identification")
    n = truth_features.shape[0]
    if n < 2:
        raise ValueError(f"two_way_identification needs at least 2 images, got {n}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    canonical = _first_identical_rows(truth_features)
    unique = np.flatnonzero(canonical == np.arange(n))  # truths that are correlated, (U,)
    strip_row = np.empty(n, dtype=np.int64)
    strip_row[unique] = np.arange(len(unique))
    strip_row = strip_row[canonical]  # truth i -> its row in the strip, (N,)
    wins = np.zeros(n, dtype=np.int64)
    for r0 in range(0, n, chunk_size):
        recon_block = _centred_unit_rows(recon_features[r0 : r0 + chunk_size])[0]  # (c_r, D)
        c_r = len(recon_block)
        strip = np.empty((len(unique), c_r))  # r[u, j] for the unique truths u, (U, c_r)
        for t0 in range(0, len(unique), chunk_size):
            rows = unique[t0 : t0 + chunk_size]
            truths = (
                truth_features[rows[0] : rows[-1] + 1]
                if rows[-1] - rows[0] + 1 == len(rows)
                else truth_features[rows]
            )
            strip[t0 : t0 + len(rows)] = _centred_unit_rows(truths)[0] @ recon_block.T
        r = strip[strip_row]  # r[i, j], (N, c_r)
        congruent = r[np.arange(r0, r0 + c_r), np.arange(c_r)]  # r[j, j]: j never beats itself (strict <)
        wins[r0 : r0 + c_r] = (r < congruent[None, :]).sum(axis=0)
    return wins / (n - 1)


def correlation_distance(
    truth_features: np.ndarray, recon_features: np.ndarray, *, return_undefined: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """1 - Pearson r between each pair's flattened features (``scipy.spatial.distance.correlation``) -> (N,).

    Used by EffNet-B and SwAV; lower is better. Constant features have no r: the distance is
    1 - ``UNDEFINED_CORRELATION`` = 1 there (mask with ``return_undefined``, as :func:`pixcorr`).
    """
    truth_features, recon_features = _flatten_pair(truth_features, recon_features, "correlation_distance")
    r, undefined = _row_pearson(truth_features, recon_features)
    return (1.0 - r, undefined) if return_undefined else 1.0 - r


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def mean_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t-interval of the mean over draws: (mean, low, high)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2 or np.all(values == values[0]):
        return mean, mean, mean
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return mean, float(mean - half), float(mean + half)


def retrieval_top1(
    brain_embeddings: np.ndarray,
    image_embeddings: np.ndarray,
    *,
    pool_size: int = 300,
    n_draws: int = 30,
    seed: int = 42,
) -> dict:
    """Top-1 retrieval among ``pool_size`` candidates, in both directions (MindEye / MindEye2).

    brain_embeddings: (N, ...) the method's predicted embeddings; image_embeddings: (N, ...) the target-space
    embeddings of the true images, row i of both belonging to image i. Each draw takes ``pool_size``
    distinct rows uniformly without replacement (``np.random.default_rng(seed)``) and scores cosine
    similarities sim[b, i] = <brain b, image i> of the L2-normalised flattened embeddings.

    - **image retrieval**: for each brain sample b, is its own image the arg-max of sim[b, :]?
    - **brain retrieval**: for each image i, is its own brain sample the arg-max of sim[:, i]?

    Returns ``{"image": {"mean", "ci95", "draws"}, "brain": {...}, "pool_size", "n_draws", "seed", "chance"}``
    where ``ci95`` is the t-interval of the mean over draws.
    """
    brain, image = _flatten_pair(brain_embeddings, image_embeddings, "retrieval_top1")
    n = brain.shape[0]
    if not 2 <= pool_size <= n:
        raise ValueError(f"retrieval pool_size must be in [2, number of images = {n}], got {pool_size}")
    brain, image = _unit_rows(brain), _unit_rows(image)
    rng = np.random.default_rng(seed)
    image_hits, brain_hits = [], []
    target = np.arange(pool_size)
    for _ in range(n_draws):
        pool = rng.choice(n, size=pool_size, replace=False)
        sim = brain[pool] @ image[pool].T  # (brain sample, image)
        image_hits.append(float(np.mean(sim.argmax(axis=1) == target)))
        brain_hits.append(float(np.mean(sim.argmax(axis=0) == target)))
    out = {"pool_size": pool_size, "n_draws": n_draws, "seed": seed, "chance": 1.0 / pool_size}
    for name, hits in (("image", image_hits), ("brain", brain_hits)):
        mean, low, high = mean_interval(np.array(hits))
        out[name] = {"mean": mean, "ci95": [low, high], "draws": hits}
    return out


def nway_identification(
    truth_features: np.ndarray, recon_features: np.ndarray, n_way: int, *, repeats: int = 10, seed: int = 0
) -> tuple[float, float]:
    """Mind Reader's n-way identification (appendix A.4): (mean, sd) of the accuracy over ``repeats``.

    truth_features, recon_features: (N, ...) pooled embeddings (Inception v3 ``avgpool`` 2048 in the paper).
    For each reconstruction j, n - 1 distractor truths are drawn at random from the other N - 1; success
    if the cosine similarity to its own truth is strictly the largest of the n. Chance = 1 / n.
    """
    truth, recon = _flatten_pair(truth_features, recon_features, "nway_identification")
    n = truth.shape[0]
    if not 2 <= n_way <= n:
        raise ValueError(f"n-way identification needs 2 <= n <= N images ({n}), got n = {n_way}")
    sim = _unit_rows(recon) @ _unit_rows(truth).T  # (recon j, truth i)
    own = np.diag(sim)
    rng = np.random.default_rng(seed)
    accuracies = []
    for _ in range(repeats):
        keys = rng.random((n, n))
        np.fill_diagonal(keys, np.inf)  # never draw the ground truth as its own distractor
        distractors = np.argpartition(keys, n_way - 2, axis=1)[:, : n_way - 1]  # (N, n-1)
        best_distractor = np.take_along_axis(sim, distractors, axis=1).max(axis=1)
        accuracies.append(float(np.mean(own > best_distractor)))
    return float(np.mean(accuracies)), float(np.std(accuracies))


def nway_classification(
    recon_probs: np.ndarray, truth_labels: np.ndarray, n_way: int, *, trials: int = 50, seed: int = 0
) -> np.ndarray:
    """CnD's n-way top-1 semantic classification (appendix 8.1, from MinD-Vis), per reconstruction -> (N,).

    recon_probs: (N, C) class scores of each reconstruction; truth_labels: (N,) the class the same
    classifier gives its ground truth. In each of ``trials`` trials, n - 1 other classes are drawn at
    random; success if the ground truth class scores strictly highest among the n. Entry j is the success
    rate of reconstruction j over trials.
    """
    recon_probs = np.asarray(recon_probs, dtype=np.float64)
    truth_labels = np.asarray(truth_labels, dtype=np.int64)
    if recon_probs.ndim != 2 or truth_labels.shape != (recon_probs.shape[0],):
        raise ValueError(
            "nway_classification expects probs (N, C) and labels (N,), "
            f"got {recon_probs.shape} and {truth_labels.shape}"
        )
    n, n_classes = recon_probs.shape
    if not 2 <= n_way <= n_classes:
        raise ValueError(f"n-way classification needs 2 <= n <= C classes ({n_classes}), got n = {n_way}")
    rng = np.random.default_rng(seed)
    own = recon_probs[np.arange(n), truth_labels]
    success = np.zeros(n)
    for _ in range(trials):
        keys = rng.random((n, n_classes))
        keys[np.arange(n), truth_labels] = np.inf
        others = np.argpartition(keys, n_way - 2, axis=1)[:, : n_way - 1]
        success += own > np.take_along_axis(recon_probs, others, axis=1).max(axis=1)
    return success / trials


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID on Inception pools).

    features_a: (N, D), features_b: (M, D). ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))
    (Heusel et al. 2017). With centred data A (N, D), B (M, D), S_a S_b has the non-zero eigenvalues of
    C C^T, C = A B^T / sqrt((N-1)(M-1)), so Tr (S_a S_b)^(1/2) is the nuclear norm of C: exact, and stable
    when N < D where ``sqrtm`` of the singular D x D product is not.
    """
    a = np.asarray(features_a, dtype=np.float64).reshape(len(features_a), -1)
    b = np.asarray(features_b, dtype=np.float64).reshape(len(features_b), -1)
    if a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance needs two (>=2, D) sets of equal D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    a_c, b_c = a - mu_a, b - mu_b
    scale = np.sqrt((len(a) - 1) * (len(b) - 1))
    trace_sqrt = np.linalg.svd(a_c @ b_c.T / scale, compute_uv=False).sum()
    trace_a = (a_c * a_c).sum() / (len(a) - 1)
    trace_b = (b_c * b_c).sum() / (len(b) - 1)
    diff = mu_a - mu_b
    return float(diff @ diff + trace_a + trace_b - 2.0 * trace_sqrt)


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), mean and sd over ``splits``.

    probs: (N, C) class probabilities (softmax of the Inception v3 logits). ``splits`` is capped at N.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) < 1:
        raise ValueError(f"inception_score expects probabilities (N, C), got shape {probs.shape}")
    scores = []
    for part in np.array_split(probs, min(splits, len(probs))):
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def brain_correlation(
    predicted: np.ndarray,
    measured: np.ndarray,
    rois: Mapping[str, np.ndarray],
    *,
    return_undefined: bool = False,
) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Pearson r per image between predicted and measured responses within each ROI (NeuralDiffuser Tab. 2).

    predicted: (N, V) an encoding model's responses to the reconstructions; measured: (N, V) repeat-averaged
    responses to the true images; rois: name -> bool (V,) voxel mask. Returns name -> (N,) per-image r;
    a prediction constant over an ROI scores ``UNDEFINED_CORRELATION`` (0). With ``return_undefined``, also
    name -> (N,) bool mask of those images.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)
    if predicted.shape != measured.shape or predicted.ndim != 2:
        raise ValueError(f"brain_correlation needs two (N, V) arrays, got {predicted.shape} {measured.shape}")
    out, undefined = {}, {}
    for name, mask in rois.items():
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (predicted.shape[1],):
            raise ValueError(f"ROI {name!r} mask must have shape ({predicted.shape[1]},), got {mask.shape}")
        if mask.sum() < 2:
            raise ValueError(f"ROI {name!r} has {int(mask.sum())} voxels; a correlation needs at least 2")
        out[name], undefined[name] = _row_pearson(predicted[:, mask], measured[:, mask])
    return (out, undefined) if return_undefined else out
