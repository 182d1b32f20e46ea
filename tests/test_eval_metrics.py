"""Each functional metric against a reference: numpy, scikit-image, scipy, a naive loop, a built case."""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from scipy.spatial.distance import correlation as scipy_correlation
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

from fmrirecon.evaluation import metrics

# the scikit-image call of MindEye / Brain-Diffuser, written out independently of metrics.SSIM_KWARGS
REFERENCE_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_pixcorr_equals_numpy_corrcoef(rng):
    recons = rng.random((5, 3, 17, 17))
    truths = 0.5 * recons + rng.random((5, 3, 17, 17))
    expected = [np.corrcoef(t.reshape(1, -1), r.reshape(1, -1))[0, 1] for r, t in zip(recons, truths)]
    np.testing.assert_allclose(metrics.pixcorr(recons, truths), expected, rtol=1e-12)


def test_rgb_to_gray_uses_skimage_weights(rng):
    images = rng.random((2, 8, 9, 3))
    expected = images[1, 3, 4] @ [0.2125, 0.7154, 0.0721]
    np.testing.assert_allclose(metrics.rgb_to_gray(images)[1, 3, 4], expected)


def test_ssim_2d_is_skimage_with_reference_parameters(rng):
    truths = rng.random((3, 40, 40))
    recons = np.clip(truths + 0.2 * rng.standard_normal((3, 40, 40)), 0, 1)
    expected = [structural_similarity(r, t, **REFERENCE_SSIM) for r, t in zip(recons, truths)]
    np.testing.assert_array_equal(metrics.ssim(recons, truths, "2d"), expected)


def test_ssim_per_column_is_mean_of_column_ssims(rng):
    truths = rng.random((2, 30, 12))
    recons = np.clip(truths + 0.3 * rng.standard_normal((2, 30, 12)), 0, 1)
    expected = [
        np.mean([structural_similarity(r[:, c], t[:, c], **REFERENCE_SSIM) for c in range(r.shape[1])])
        for r, t in zip(recons, truths)
    ]
    got = metrics.ssim(recons, truths, "per_column")
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert not np.allclose(got, metrics.ssim(recons, truths, "2d"))


def test_ssim_rejects_unknown_variant(rng):
    with pytest.raises(ValueError, match="per_column"):
        metrics.ssim(rng.random((1, 20, 20)), rng.random((1, 20, 20)), "3d")


def _naive_two_way(truth, recon):
    n = len(truth)
    r = np.corrcoef(truth.reshape(n, -1), recon.reshape(n, -1))[:n, n:]
    out = []
    for j in range(n):
        out.append(sum(r[i, j] < r[j, j] for i in range(n) if i != j) / (n - 1))
    return np.array(out)


def test_two_way_identification_matches_naive_loop_and_is_chunk_invariant(rng):
    truth = rng.random((23, 4, 5, 5))
    recon = truth + 1.5 * rng.standard_normal(truth.shape)  # noisy: scores strictly between 0 and 1
    expected = _naive_two_way(truth, recon)
    assert 0.3 < expected.mean() < 0.99
    for chunk in (1, 5, 7, 23, 100):
        got = metrics.two_way_identification(truth, recon, chunk_size=chunk)
        np.testing.assert_array_equal(got, expected)


def test_two_way_identification_perfect_and_chance():
    rng = np.random.default_rng(1)
    truth = rng.random((30, 50))
    assert metrics.two_way_identification(truth, truth).mean() == 1.0
    noise = [metrics.two_way_identification(truth, rng.random((30, 50))).mean() for _ in range(20)]
    assert abs(np.mean(noise) - 0.5) < 0.05


def test_correlation_distance_equals_scipy(rng):
    truth, recon = rng.random((6, 40)), rng.random((6, 40))
    expected = [scipy_correlation(t, r) for t, r in zip(truth, recon)]
    np.testing.assert_allclose(metrics.correlation_distance(truth, recon), expected, rtol=1e-12)


def test_retrieval_known_answers_in_both_directions():
    # Orthogonal image embeddings; brain b is image b except brains 0 and 1 that both point at image 0,
    # brain 1 more closely. Image retrieval (row arg-max) misses only brain 1; brain retrieval (column
    # arg-max) misses only image 0, whose most similar brain sample is brain 1.
    n = 10
    image = np.eye(n)
    brain = np.eye(n)
    brain[1] = 0.0
    brain[1, 0] = 2.0
    brain[1, 1] = 0.1
    brain[0, 0] = 1.0
    brain[0, 3] = 0.5
    out = metrics.retrieval_top1(brain, image, pool_size=n, n_draws=3, seed=0)
    assert out["image"]["mean"] == pytest.approx(0.9)
    sim = (brain / np.linalg.norm(brain, axis=1, keepdims=True)) @ image.T
    expected_brain = np.mean(sim.argmax(axis=0) == np.arange(n))
    assert expected_brain == pytest.approx(0.9)
    assert out["brain"]["mean"] == pytest.approx(expected_brain)
    assert out["chance"] == pytest.approx(1 / n)
    assert out["image"]["ci95"] == [pytest.approx(0.9), pytest.approx(0.9)]


def test_retrieval_directions_differ_on_a_hub_case():
    # Every brain sample is closest to image 0 (a "hub"): image retrieval hits only for brain 0, brain
    # retrieval hits for every image since each image's most similar brain sample is its own.
    n = 8
    image = np.eye(n) + 0.0
    brain = np.eye(n) * 0.4
    brain[:, 0] += 1.0
    brain[0, 0] = 1.0
    out = metrics.retrieval_top1(brain, image, pool_size=n, n_draws=1)
    assert out["image"]["mean"] == pytest.approx(1 / n)
    assert out["brain"]["mean"] == pytest.approx(1.0)


def test_retrieval_draws_are_seeded_and_interval_contains_mean(rng):
    brain, image = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    image = brain + 1.2 * image
    a = metrics.retrieval_top1(brain, image, pool_size=300, n_draws=30, seed=42)
    b = metrics.retrieval_top1(brain, image, pool_size=300, n_draws=30, seed=42)
    assert a == b
    assert len(a["image"]["draws"]) == 30
    low, high = a["image"]["ci95"]
    assert low < a["image"]["mean"] < high
    with pytest.raises(ValueError, match="pool_size"):
        metrics.retrieval_top1(brain[:100], image[:100], pool_size=300)


def test_nway_identification_perfect_chance_and_reference_loop(rng):
    truth = rng.standard_normal((40, 12))
    assert metrics.nway_identification(truth, truth, 10) == (1.0, 0.0)
    chance = metrics.nway_identification(truth, rng.standard_normal((40, 12)), 2, repeats=50)[0]
    assert abs(chance - 0.5) < 0.08
    # 2-way: the expected accuracy is, per reconstruction, the fraction of other truths less cosine-similar
    # than its own truth (a naive loop), averaged over reconstructions
    recon = truth + 1.5 * rng.standard_normal(truth.shape)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sim = unit(recon) @ unit(truth).T
    expected = np.mean([np.mean([sim[j, d] < sim[j, j] for d in range(40) if d != j]) for j in range(40)])
    mean, sd = metrics.nway_identification(truth, recon, 2, repeats=400, seed=5)
    assert abs(mean - expected) < 0.02
    assert sd > 0


def test_nway_classification_reference_cases(rng):
    probs = rng.random((6, 20))
    labels = probs.argmax(axis=1)
    assert np.all(metrics.nway_classification(probs, labels, 20, trials=5) == 1.0)
    worst = probs.argmin(axis=1)
    assert np.all(metrics.nway_classification(probs, worst, 2, trials=5) == 0.0)
    # label of rank r (0 = lowest) wins a 2-way trial with probability r / (C - 1)
    ranks = np.argsort(np.argsort(probs, axis=1), axis=1)
    middle = np.array([np.where(ranks[i] == 10)[0][0] for i in range(6)])
    got = metrics.nway_classification(probs, middle, 2, trials=4000, seed=3)
    np.testing.assert_allclose(got, 10 / 19, atol=0.03)
    with pytest.raises(ValueError, match="n-way"):
        metrics.nway_classification(probs, labels, 21)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift(rng):
    feats = rng.standard_normal((200, 16))
    assert abs(metrics.frechet_distance(feats, feats)) < 1e-6
    assert metrics.frechet_distance(feats, feats + 1.0) == pytest.approx(16.0, rel=1e-6)
    # N < D: singular covariances still give a finite, near-zero self-distance
    small = rng.standard_normal((10, 2048)) * 50
    assert abs(metrics.frechet_distance(small, small)) < 1e-6 * (small**2).sum()


def test_fid_equals_the_sqrtm_formula(rng):
    a = rng.standard_normal((60, 12))
    b = 0.7 * rng.standard_normal((45, 12)) @ rng.standard_normal((12, 12)) + 0.3
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    expected = diff @ diff + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_inception_score_bounds():
    confident = np.eye(10)[np.arange(100) % 10]
    assert metrics.inception_score(confident, splits=1)[0] == pytest.approx(10.0)
    uniform = np.full((50, 10), 0.1)
    assert metrics.inception_score(uniform)[0] == pytest.approx(1.0)


def test_brain_correlation_per_roi(rng):
    measured = rng.standard_normal((4, 30))
    predicted = measured.copy()
    predicted[:, 10:] = rng.standard_normal((4, 20))
    rois = {"early": np.arange(30) < 10, "whole": np.ones(30, bool)}
    out = metrics.brain_correlation(predicted, measured, rois)
    np.testing.assert_allclose(out["early"], 1.0)
    expected = [np.corrcoef(p, m)[0, 1] for p, m in zip(predicted, measured)]
    np.testing.assert_allclose(out["whole"], expected)
    with pytest.raises(ValueError, match="ROI"):
        metrics.brain_correlation(predicted, measured, {"bad": np.ones(5, bool)})


def test_rgb_to_gray_matches_skimage(rng):
    images = rng.random((2, 5, 5, 3))
    np.testing.assert_array_equal(metrics.rgb_to_gray(images), rgb2gray(images))


def test_a_constant_image_has_no_pixcorr_and_scores_zero(rng):
    truths = rng.random((4, 3, 16, 16)).astype(np.float32)
    recons = (truths + rng.random(truths.shape)).astype(np.float32)
    recons[1] = 0.0  # a black reconstruction: exactly constant
    # a grey blank resized bilinearly in float32, as the mindeye preset does: constant up to rounding
    grey = torch.full((1, 3, 10, 10), 128 / 255)
    recons[2] = F.interpolate(grey, size=(16, 16), mode="bilinear", antialias=False)[0].numpy()
    assert np.ptp(recons[2]) > 0
    # one grey level on one pixel is an image, not a blank: it keeps its r
    recons[3] = 0.5
    recons[3, 1, 7, 7] += 1 / 255
    with np.errstate(invalid="ignore", divide="ignore"):
        assert np.isnan(np.corrcoef(recons[1].ravel(), truths[1].ravel())[0, 1])  # numpy/scipy: NaN
    r, undefined = metrics.pixcorr(recons, truths, return_undefined=True)
    np.testing.assert_array_equal(undefined, [False, True, True, False])
    np.testing.assert_array_equal(r[[1, 2]], metrics.UNDEFINED_CORRELATION)
    assert metrics.UNDEFINED_CORRELATION == 0.0
    expected = [np.corrcoef(recons[i].ravel(), truths[i].ravel())[0, 1] for i in (0, 3)]
    np.testing.assert_allclose(r[[0, 3]], expected, rtol=1e-6)
    assert r[3] != 0.0
    np.testing.assert_array_equal(metrics.pixcorr(recons, truths), r)  # the same scores without the mask


def test_constant_features_have_correlation_distance_one_and_constant_predictions_brain_r_zero(rng):
    truth, recon = rng.random((3, 40)), rng.random((3, 40))
    recon[0] = 2.5
    distance, undefined = metrics.correlation_distance(truth, recon, return_undefined=True)
    np.testing.assert_array_equal(undefined, [True, False, False])
    assert distance[0] == 1.0 - metrics.UNDEFINED_CORRELATION == 1.0
    np.testing.assert_allclose(distance[1:], [scipy_correlation(t, r) for t, r in zip(truth[1:], recon[1:])])

    measured = rng.standard_normal((3, 30))
    predicted = rng.standard_normal((3, 30))
    predicted[2, :10] = 0.7  # constant over the early ROI only
    rois = {"early": np.arange(30) < 10, "whole": np.ones(30, bool)}
    r, undefined = metrics.brain_correlation(predicted, measured, rois, return_undefined=True)
    np.testing.assert_array_equal(undefined["early"], [False, False, True])
    assert not undefined["whole"].any()
    assert r["early"][2] == 0.0
    np.testing.assert_allclose(r["whole"], [np.corrcoef(p, m)[0, 1] for p, m in zip(predicted, measured)])


def test_two_way_identical_truths_tie_as_in_the_reference():
    # MindEye's Reconstruction_Metrics.py, computed here independently: one np.corrcoef over all pairs,
    # congruent = r[j, j], success where another truth's r is strictly lower
    rng = np.random.default_rng(0)
    n = 23
    truth = rng.random((n, 300)).astype(np.float32)
    duplicates = [(2, 17), (5, 6), (9, 22), (0, 12)]  # same block, other blocks, the last row of a tile
    for a, b in duplicates:
        truth[b] = truth[a]
    recon = (truth + 0.8 * rng.standard_normal(truth.shape)).astype(np.float32)
    r = np.corrcoef(truth, recon)[:n, n:]
    congruent = np.diag(r)
    expected = (r < congruent).sum(axis=0) / (n - 1)
    for a, b in duplicates:  # the reference's ties are exact, so each duplicate is a loss for the other
        assert r[b, a] == r[a, a] and r[a, b] == r[b, b]
    for chunk in (1, 4, 5, 7, 11, 22, 23, 64):
        got = metrics.two_way_identification(truth, recon, chunk_size=chunk)
        np.testing.assert_array_equal(got, expected, err_msg=f"chunk_size={chunk}")
