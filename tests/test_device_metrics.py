"""Device PixCorr / SSIM equal the numpy / scikit-image references (issue 21: within 1e-6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmrirecon.evaluation import device_metrics as DM
from fmrirecon.evaluation import metrics as M


def _pairs(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Float32 RGB pairs ``(n, 3, size, size)`` in [0, 1]: a smooth truth and a noisy, shifted copy of it
    (SSIM far from 0 and from 1), one pair unrelated, one reconstruction blank (PixCorr undefined)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    truths, recons = [], []
    for i in range(n):
        f = rng.uniform(1, 6, size=3)
        truth = np.stack(
            [0.5 + 0.4 * np.sin(2 * np.pi * (f[c] * xx + f[(c + 1) % 3] * yy)) for c in range(3)]
        )
        truth = np.clip(truth + 0.05 * rng.standard_normal(truth.shape), 0, 1)
        recon = np.clip(np.roll(truth, i + 1, axis=2) + 0.15 * rng.standard_normal(truth.shape), 0, 1)
        truths.append(truth)
        recons.append(recon)
    recons[-2] = rng.uniform(size=recons[-2].shape)
    recons[-1] = np.full_like(recons[-1], 0.3)
    return np.stack(recons).astype(np.float32), np.stack(truths).astype(np.float32)


def _gray(x: np.ndarray) -> np.ndarray:
    return M.rgb_to_gray(x.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("variant", ["2d", "per_column"])
def test_ssim_equals_scikit_image_at_425_px(variant):
    """The field's setting (grayscale SSIM at 425 px, ``metrics.SSIM_KWARGS``), on random images."""
    recons, truths = _pairs(4, 425)
    expected = M.ssim(_gray(recons), _gray(truths), variant)
    got = DM.ssim(DM.rgb_to_gray(torch.from_numpy(recons)), DM.rgb_to_gray(torch.from_numpy(truths)), variant)
    assert np.abs(got - expected).max() < 1e-6, (got, expected)
    assert got.dtype == np.float64 and got.shape == (4,)
    assert 0.05 < expected[0] < 0.95  # a case where SSIM says something (not 0, not 1)


def test_ssim_equals_scikit_image_on_odd_sizes_and_identical_images():
    rng = np.random.default_rng(3)
    a = rng.uniform(size=(3, 37, 29))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    np.testing.assert_allclose(DM.ssim(a, b), M.ssim(a, b), atol=1e-9, rtol=0)
    np.testing.assert_allclose(DM.ssim(a, a), 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="at least 11 px"):
        DM.ssim(a[:, :10], b[:, :10])
    with pytest.raises(ValueError, match="variant"):
        DM.ssim(a, b, "3d")


def test_gray_conversion_equals_rgb2gray():
    recons, _ = _pairs(2, 64)
    expected = _gray(recons)
    got = DM.rgb_to_gray(torch.from_numpy(recons)).numpy()
    assert got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_pixcorr_equals_numpy_with_undefined_blank_images():
    recons, truths = _pairs(5, 425, seed=1)
    expected, expected_undefined = M.pixcorr(recons, truths, return_undefined=True)
    got, undefined = DM.pixcorr(torch.from_numpy(recons), torch.from_numpy(truths), return_undefined=True)
    assert np.abs(got - expected).max() < 1e-6
    np.testing.assert_array_equal(undefined, expected_undefined)
    assert undefined.tolist() == [False, False, False, False, True]  # the blank reconstruction
    # independent check on a defined pair: np.corrcoef
    np.testing.assert_allclose(got[0], np.corrcoef(recons[0].ravel(), truths[0].ravel())[0, 1], atol=1e-6)


def test_pixcorr_of_a_blank_image_resized_in_float32_is_undefined_as_in_numpy():
    """A blank image after a float32 bilinear resize is constant up to rounding (``CONSTANT_ROW_ULPS``)."""
    blank = torch.full((1, 3, 64, 64), 0.7)
    resized = torch.nn.functional.interpolate(blank, size=425, mode="bilinear", align_corners=False)
    truth = torch.rand(1, 3, 425, 425, generator=torch.Generator().manual_seed(0))
    _, undefined = DM.pixcorr(resized, truth, return_undefined=True)
    _, expected = M.pixcorr(resized.numpy(), truth.numpy(), return_undefined=True)
    assert undefined.tolist() == expected.tolist() == [True]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_device_metrics_compute_on_the_requested_device(device, monkeypatch):
    """Every filter runs in float64 on ``device`` (inputs on the CPU are moved there), same results."""
    recons, truths = _pairs(3, 32)
    seen = []
    real = torch.nn.functional.conv2d

    def conv2d(x, w, *args, **kw):
        seen.append((x.device.type, w.device.type, x.dtype))
        return real(x, w, *args, **kw)

    monkeypatch.setattr(torch.nn.functional, "conv2d", conv2d)
    got = DM.ssim(_gray(recons), _gray(truths), device=device)
    assert len(seen) == 10 and set(seen) == {(device, device, torch.float64)}  # 5 maps x 2 axes
    np.testing.assert_allclose(got, M.ssim(_gray(recons), _gray(truths)), atol=1e-9, rtol=0)
    r = DM.pixcorr(recons, truths, device=device)
    np.testing.assert_allclose(r, M.pixcorr(recons, truths), atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="same image count"):
        DM.pixcorr(recons[:1], truths, device=device)


def test_suite_with_loader_workers_gives_the_same_scores_and_numpy_pixel_metrics(tmp_path):
    """Decoding and resizing in 2 DataLoader workers change nothing; the suite's PixCorr / SSIM (device
    metrics) equal metrics.pixcorr / metrics.ssim on the same prepared images."""
    import json

    from PIL import Image

    from fmrirecon.evaluation.presets import get_preset
    from fmrirecon.evaluation.suite import _Prepared, evaluate_reconstructions

    rng = np.random.default_rng(0)
    ids = np.arange(100, 109)
    truth_dir, recon_dir = tmp_path / "truth", tmp_path / "recon"
    (recon_dir / "images").mkdir(parents=True)
    truth_dir.mkdir()
    truths = rng.integers(0, 256, size=(len(ids), 40, 40, 3), dtype=np.uint8)
    recons = np.clip(truths + rng.integers(-80, 80, size=truths.shape), 0, 255).astype(np.uint8)
    for i, t, r in zip(ids, truths, recons):
        Image.fromarray(t).save(truth_dir / f"{i}.png")
        Image.fromarray(r).save(recon_dir / "images" / f"{i}_0.png")
    manifest = {"method": "ridge", "subject": 1, "variant": "test", "ids": ids.tolist(), "samples": 1}
    (recon_dir / "manifest.json").write_text(json.dumps(manifest))
    preset = get_preset("mindeye")
    kw = dict(extractors={net: _NoFeatures() for net in preset.networks}, batch_size=4, progress=False)
    inline = evaluate_reconstructions(recon_dir, truth_dir, preset, loader_workers=0, **kw)
    workers = evaluate_reconstructions(recon_dir, truth_dir, preset, loader_workers=2, **kw)
    a, b = inline["results"][0], workers["results"][0]
    assert a["metrics"]["pixcorr"] == b["metrics"]["pixcorr"] and a["metrics"]["ssim"] == b["metrics"]["ssim"]
    r_pix, t_pix = (_Prepared(x, preset, (40, 40)).pixel.numpy() for x in (recons, truths))
    assert abs(a["metrics"]["pixcorr"] - M.pixcorr(r_pix, t_pix).mean()) < 1e-6
    gray = [M.rgb_to_gray(x.transpose(0, 2, 3, 1)) for x in (r_pix, t_pix)]
    assert abs(a["metrics"]["ssim"] - M.ssim(*gray, "2d").mean()) < 1e-6


class _NoFeatures:
    """A feature extractor with no nodes (the pixel metrics alone are under test)."""

    weights = "none (test)"

    def __call__(self, images):
        return {}


def test_ssim_where_fastest_is_the_reference_on_the_cpu():
    recons, truths = _pairs(3, 48)
    gray_r, gray_t = DM.rgb_to_gray(torch.from_numpy(recons)), DM.rgb_to_gray(torch.from_numpy(truths))
    expected = M.ssim(_gray(recons), _gray(truths), "per_column")
    np.testing.assert_allclose(
        DM.ssim_where_fastest(gray_r, gray_t, "per_column"), expected, atol=1e-6, rtol=0
    )
