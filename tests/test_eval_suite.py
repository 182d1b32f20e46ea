"""The evaluation runner on tiny folders: schema, samples, one pass per network, bad inputs, CLI."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fmrirecon.errors import EvaluationInputError
from fmrirecon.evaluation import metrics
from fmrirecon.evaluation.features import FeatureExtractor
from fmrirecon.evaluation.io import Truth
from fmrirecon.evaluation.presets import get_preset
from fmrirecon.evaluation.suite import evaluate_reconstructions
from fmrirecon.io import library_versions

N_IMAGES, SIZE, SAMPLES = 12, 24, 2
EMBED_DIM = 8


class TinyNet(torch.nn.Module):
    """Random conv features; each node is a different pooled projection, ``fc`` gives 120 class logits."""

    def __init__(self, nodes, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.nodes = list(nodes)
        self.convs = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(6, 3, 3, 3, generator=gen)) for _ in self.nodes]
        )
        self.fc = torch.nn.Parameter(torch.randn(120, 6 * 16, generator=gen))

    def forward(self, x):
        out = {}
        for node, weight in zip(self.nodes, self.convs):
            feat = F.adaptive_avg_pool2d(F.relu(F.conv2d(x, weight)), 4)  # (B, 6, 4, 4)
            out[node] = feat if node != "fc" else feat.flatten(1) @ self.fc.T
        return out


def tiny_extractors(preset):
    return {
        net: FeatureExtractor(
            net, TinyNet(preset.nodes(net), seed=n), preset.nodes(net), "tiny random (test)"
        )
        for n, net in enumerate(preset.networks)
    }


def _write_png(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


@pytest.fixture
def folders(tmp_path):
    """Truth folder of 12 random images; recon folder: sample 0 = truth (perfect), sample 1 = noisy."""
    rng = np.random.default_rng(0)
    ids = rng.choice(73000, size=N_IMAGES, replace=False)
    truth_images = rng.integers(0, 256, size=(N_IMAGES, SIZE, SIZE, 3), dtype=np.uint8)
    truth_dir, recon_dir = tmp_path / "truth", tmp_path / "recon"
    for image_id, image in zip(ids, truth_images):
        _write_png(truth_dir / f"{image_id}.png", image)
        _write_png(recon_dir / "images" / f"{image_id}_0.png", image)
        noisy = np.clip(image.astype(int) + rng.integers(-90, 90, size=image.shape), 0, 255).astype(np.uint8)
        _write_png(recon_dir / "images" / f"{image_id}_1.png", noisy)
    manifest = {
        "method": "ridge",
        "subject": 1,
        "variant": "test",
        "ids": ids.tolist(),
        "samples": SAMPLES,
        "extra": "allowed",
    }
    (recon_dir / "manifest.json").write_text(json.dumps(manifest))
    brain = rng.standard_normal((N_IMAGES, EMBED_DIM))
    np.save(recon_dir / "brain_embeddings.npy", brain)
    np.save(recon_dir / "image_embeddings.npy", brain + 0.1 * rng.standard_normal(brain.shape))
    return {"truth": truth_dir, "recon": recon_dir, "ids": ids, "truth_images": truth_images}


def test_mindeye_preset_schema_samples_and_reference_values(folders):
    preset = get_preset("mindeye")
    report = evaluate_reconstructions(
        [folders["recon"]], folders["truth"], preset, extractors=tiny_extractors(preset), progress=False
    )
    assert set(report) == {"preset", "settings", "versions", "results"}
    assert report["preset"] == "mindeye"
    assert report["versions"] == library_versions()
    (result,) = report["results"]
    assert (result["method"], result["subject"], result["variant"], result["n_images"]) == (
        "ridge",
        1,
        "test",
        12,
    )
    m = result["metrics"]
    expected_keys = {
        "pixcorr",
        "ssim",
        "alexnet2",
        "alexnet5",
        "inception",
        "clip",
        "effnet",
        "swav",
        "retrieval_image",
        "retrieval_brain",
        "fid",
        "is",
        "nway_2",
        "nway_5",
        "nway_10",
        "nway_class_2",
        "nway_class_5",
        "nway_class_10",
        "nway_class_50",
        "nway_class_100",
    }
    assert set(m) == expected_keys
    # 12 images: 50-way identification and brain correlation (no store) are unavailable, with reasons
    unavailable = report["settings"]["unavailable"]
    assert "at least 50 images" in unavailable["nway_50"]
    assert "store" in unavailable["brain_corr_*"]

    # sample 0 is perfect, sample 1 noisy: the mean is below 1 and best-of-k picks the perfect sample
    best = result["best_of_k"]
    assert best["pixcorr"] == pytest.approx(1.0) and best["ssim"] == pytest.approx(1.0)
    assert best["alexnet2"] == 1.0 and best["effnet"] == pytest.approx(0.0, abs=1e-6)
    assert m["pixcorr"] < 1.0 and m["effnet"] > 0.0

    # PixCorr by hand with the preset's recorded pipeline: 256 px then 425 px, bilinear, no antialias
    noisy = np.stack(
        [np.asarray(Image.open(folders["recon"] / "images" / f"{i}_1.png")) for i in folders["ids"]]
    )

    def mindeye_pixels(images):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False, antialias=False)
        return F.interpolate(x, size=(425, 425), mode="bilinear", align_corners=False, antialias=False).clamp(
            0, 1
        )

    truth_px, noisy_px = mindeye_pixels(folders["truth_images"]), mindeye_pixels(noisy)
    noisy_r = [np.corrcoef(a.flatten(), b.flatten())[0, 1] for a, b in zip(truth_px, noisy_px)]
    expected = np.mean([1.0, np.mean(noisy_r)])
    assert m["pixcorr"] == pytest.approx(expected, rel=1e-5)
    # per image (for paired comparisons): the mean over its 2 samples, rows in the recorded id order
    assert result["ids"] == [int(i) for i in folders["ids"]]
    np.testing.assert_allclose(result["per_image"]["pixcorr"], (1.0 + np.array(noisy_r)) / 2, rtol=1e-5)
    assert np.mean(result["per_image"]["ssim"]) == pytest.approx(m["ssim"])
    settings = report["settings"]
    assert settings["pixel"]["size"] == 425 and settings["common_size"] == 256
    assert settings["common_antialias"] is False
    assert settings["chance"]["alexnet2"] == 0.5 and settings["chance"]["nway_5"] == pytest.approx(0.2)
    assert settings["chance"]["retrieval_image"] == pytest.approx(1 / 12)
    assert settings["higher_is_better"]["swav"] is False
    assert result["details"]["retrieval_image"]["pool_size"] == 12
    json.dumps(report)  # JSON-able as written to metrics.json


def test_each_network_runs_once_per_image_and_results_are_deterministic(folders):
    preset = get_preset("mindeye")
    extractors = tiny_extractors(preset)
    counts = {net: 0 for net in extractors}

    def counter(net):
        def hook(module, args):
            counts[net] += args[0].shape[0]

        return hook

    for net, extractor in extractors.items():
        extractor.module.register_forward_pre_hook(counter(net))
    first = evaluate_reconstructions(
        [folders["recon"]], folders["truth"], preset, extractors=extractors, batch_size=5, progress=False
    )
    # truth once + each reconstruction sample once
    assert counts == {net: N_IMAGES * (1 + SAMPLES) for net in extractors}
    second = evaluate_reconstructions(
        [folders["recon"]], folders["truth"], preset, extractors=extractors, batch_size=7, progress=False
    )
    assert first["results"][0]["metrics"] == pytest.approx(second["results"][0]["metrics"], rel=1e-6)


def test_braindiffuser_preset_uses_per_column_ssim(folders):
    preset = get_preset("braindiffuser")
    report = evaluate_reconstructions(
        folders["recon"], folders["truth"], preset, extractors=tiny_extractors(preset), progress=False
    )
    result = report["results"][0]
    assert report["settings"]["ssim_variant"] == "per_column"
    assert "retrieval_image" not in result["metrics"] and "fid" not in result["metrics"]
    # the noisy sample's SSIM equals the per-column SSIM of the PIL-bicubic 425 px gray images
    noisy = np.stack(
        [np.asarray(Image.open(folders["recon"] / "images" / f"{i}_1.png")) for i in folders["ids"]]
    )

    def gray425(images):
        big = np.stack(
            [np.asarray(Image.fromarray(im).resize((425, 425), Image.Resampling.BICUBIC)) for im in images]
        )
        return metrics.rgb_to_gray(big / 255.0)

    expected = metrics.ssim(gray425(noisy), gray425(folders["truth_images"]), "per_column").mean()
    assert result["metrics"]["ssim"] == pytest.approx((1.0 + expected) / 2, rel=1e-4)


def test_missing_weights_make_metrics_unavailable_never_random(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = evaluate_reconstructions(
        folders["recon"], folders["truth"], "mindeye", weights_dir=tmp_path / "empty", progress=False
    )
    metrics_ = report["results"][0]["metrics"]
    assert {"pixcorr", "ssim", "retrieval_image", "retrieval_brain"} <= set(metrics_)
    for key in ("alexnet2", "alexnet5", "inception", "clip", "effnet", "swav", "fid", "nway_2"):
        assert key not in metrics_
        assert "not found" in report["settings"]["unavailable"][key]
    assert report["settings"]["weights"] == {}


def test_retrieval_unavailable_without_embeddings(folders):
    (folders["recon"] / "brain_embeddings.npy").unlink()
    preset = get_preset("mindeye")
    report = evaluate_reconstructions(
        folders["recon"], folders["truth"], preset, extractors=tiny_extractors(preset), progress=False
    )
    assert "retrieval_image" not in report["results"][0]["metrics"]
    assert "brain_embeddings.npy missing" in report["settings"]["unavailable"]["retrieval_brain"]


def test_ids_that_do_not_match_name_the_missing_ids(folders):
    missing_id = int(folders["ids"][3])
    (folders["truth"] / f"{missing_id}.png").unlink()
    with pytest.raises(EvaluationInputError, match=rf"no image for 1 ids \({missing_id}\)"):
        evaluate_reconstructions(folders["recon"], folders["truth"], "braindiffuser", progress=False)


def test_images_of_different_sizes_are_rejected(folders):
    image_id = folders["ids"][0]
    _write_png(folders["recon"] / "images" / f"{image_id}_1.png", np.zeros((SIZE + 2, SIZE, 3), np.uint8))
    with pytest.raises(EvaluationInputError, match="one size"):
        evaluate_reconstructions(folders["recon"], folders["truth"], "braindiffuser", progress=False)


def test_unreadable_png_is_rejected(folders):
    image_id = folders["ids"][2]
    (folders["recon"] / "images" / f"{image_id}_0.png").write_bytes(b"not a png at all")
    with pytest.raises(EvaluationInputError, match=f"cannot read image .*{image_id}_0.png"):
        evaluate_reconstructions(folders["recon"], folders["truth"], "braindiffuser", progress=False)


def test_unknown_preset_and_bad_manifest(folders):
    with pytest.raises(EvaluationInputError, match="unknown evaluation preset 'mindeye2'"):
        evaluate_reconstructions(folders["recon"], folders["truth"], "mindeye2", progress=False)
    manifest = json.loads((folders["recon"] / "manifest.json").read_text())
    del manifest["samples"]
    (folders["recon"] / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EvaluationInputError, match="'samples' missing"):
        evaluate_reconstructions(folders["recon"], folders["truth"], "mindeye", progress=False)


class FakeSimulator:
    """Contract of SimulatedSubject: voxel_ijk and a noiseless response(uint8 images) -> (N, V_sim)."""

    def __init__(self, n_voxels, rng):
        self.voxel_ijk = rng.permutation(
            np.stack(np.unravel_index(np.arange(n_voxels), (8, 8, 8)), 1)[:n_voxels]
        )
        self.weights = rng.standard_normal((SIZE * SIZE * 3, n_voxels)) / 50

    def response(self, images):
        assert images.dtype == np.uint8 and images.shape[1:] == (SIZE, SIZE, 3)
        return (images.reshape(len(images), -1) / 255.0) @ self.weights


class FakeSubjectStore:
    def __init__(self, simulator, images_by_id, rng):
        order = rng.permutation(len(simulator.voxel_ijk))[:40]  # the store keeps 40 of them, in another order
        self.voxel_ijk = simulator.voxel_ijk[order]
        self.n_voxels = len(order)
        self.rois = {"prf-visualrois": np.repeat(np.arange(8), 5)}  # 0 (outside), V1v, V1d, ..., hV4
        ids = np.array(sorted(images_by_id))
        responses = simulator.response(np.stack([images_by_id[i] for i in ids]))[:, order]
        # a store keeps per-voxel z-scored betas
        self._averaged = (ids, (responses - responses.mean(0)) / responses.std(0))

    def averaged(self, split):
        return self._averaged if split == "test" else (np.zeros(0, np.int64), np.zeros((0, self.n_voxels)))


class FakeStoreTruth(Truth):
    """A Truth backed by an in-memory store that follows docs/contracts.md."""

    def __init__(self, images_by_id, rng):
        self.path, self.kind, self.available_ids = "fake-store", "store", set(images_by_id)
        self._images = images_by_id
        simulator = FakeSimulator(60, rng)
        sub = FakeSubjectStore(simulator, images_by_id, rng)
        self.store = type(
            "Store", (), {"world_subject": lambda s, n: simulator, "subject": lambda s, n: sub}
        )()

    def images(self, ids):
        return np.stack([self._images[int(i)] for i in ids])


def test_brain_correlation_matches_voxels_by_ijk_and_is_perfect_for_true_images(folders):
    rng = np.random.default_rng(1)
    truth = FakeStoreTruth(dict(zip(folders["ids"].tolist(), folders["truth_images"])), rng)
    preset = get_preset("braindiffuser")
    preset = type(preset)(**{**preset.__dict__, "brain_correlation": True})
    report = evaluate_reconstructions(
        folders["recon"], truth, preset, extractors=tiny_extractors(preset), progress=False
    )
    result = report["results"][0]
    best = result["best_of_k"]
    for roi in ("V1", "V2", "V3", "V4", "higher", "whole"):
        assert best[f"brain_corr_{roi}"] == pytest.approx(1.0), roi
        assert result["metrics"][f"brain_corr_{roi}"] < 1.0
    assert result["details"]["brain_corr"]["rois"]["V1"] == "prf-visualrois labels [1, 2]"
    assert report["settings"]["chance"]["brain_corr_V1"] == 0.0


def test_cli_writes_metrics_json_and_prints_a_table(folders, tmp_path, monkeypatch, capsys):
    from fmrirecon.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out" / "metrics.json"
    code = main(
        [
            "evaluate",
            "--recon",
            str(folders["recon"]),
            "--truth",
            str(folders["truth"]),
            "--preset",
            "braindiffuser",
            "--out",
            str(out),
            "--weights-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["preset"] == "braindiffuser"
    assert set(report["results"][0]["metrics"]) == {"pixcorr", "ssim"}
    printed = capsys.readouterr().out
    assert "pixcorr" in printed and "ridge" in printed and "alexnet2 unavailable" in printed
    assert (
        main(
            [
                "evaluate",
                "--recon",
                str(folders["recon"]),
                "--truth",
                str(folders["truth"]),
                "--preset",
                "nope",
                "--out",
                str(out),
            ]
        )
        == 2
    )


def test_pairing_is_by_id_not_by_position(folders, tmp_path):
    import shutil

    reordered = tmp_path / "reordered"
    shutil.copytree(folders["recon"], reordered)
    manifest = json.loads((reordered / "manifest.json").read_text())
    order = np.random.default_rng(5).permutation(N_IMAGES)
    manifest["ids"] = [manifest["ids"][i] for i in order]
    for name in ("brain_embeddings.npy", "image_embeddings.npy"):
        np.save(reordered / name, np.load(folders["recon"] / name)[order])
    (reordered / "manifest.json").write_text(json.dumps(manifest))
    preset = get_preset("braindiffuser")
    report = evaluate_reconstructions(
        [folders["recon"], reordered],
        folders["truth"],
        preset,
        extractors=tiny_extractors(preset),
        progress=False,
    )
    first, second = report["results"]
    assert first["metrics"] == pytest.approx(second["metrics"], rel=1e-9)
    assert first["best_of_k"] == pytest.approx(second["best_of_k"], rel=1e-9)


def _single_sample_folder(path, ids, images, variant):
    for image_id, image in zip(ids, images):
        _write_png(path / "images" / f"{image_id}_0.png", image)
    manifest = {
        "method": "ridge",
        "subject": 1,
        "variant": variant,
        "ids": [int(i) for i in ids],
        "samples": 1,
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_a_blank_reconstruction_scores_zero_stays_in_every_mean_and_is_counted(folders, tmp_path):
    from fmrirecon.evaluation.compare import paired_difference
    from fmrirecon.report import build_report

    ids, truths = folders["ids"], folders["truth_images"]
    rng = np.random.default_rng(3)
    tries = np.clip(truths.astype(int) + rng.integers(-90, 90, size=truths.shape), 0, 255).astype(np.uint8)
    gives_up = tries.copy()
    gives_up[0] = 128  # grey blank: constant up to rounding after the preset's float32 resizes
    gives_up[1] = 0  # black blank: exactly constant
    preset = get_preset("mindeye")
    report = evaluate_reconstructions(
        [
            _single_sample_folder(tmp_path / "tries", ids, tries, "tries"),
            _single_sample_folder(tmp_path / "gives_up", ids, gives_up, "gives_up"),
        ],
        folders["truth"],
        preset,
        extractors=tiny_extractors(preset),
        progress=False,
    )
    tried, blank = report["results"]

    # PixCorr by hand (mindeye pixels: 256 px then 425 px, bilinear, no antialias) for the 10 real images
    def mindeye_pixels(images):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False, antialias=False)
        return F.interpolate(x, size=(425, 425), mode="bilinear", align_corners=False, antialias=False)

    t_px, r_px = mindeye_pixels(truths[2:]), mindeye_pixels(tries[2:]).clamp(0, 1)
    real = np.array([np.corrcoef(a.flatten(), b.flatten())[0, 1] for a, b in zip(t_px, r_px)])
    assert real.mean() > 0
    # the blanks count as 0 in a mean over all 12 images: no higher than that, and below the mean over the
    # other 10 images that np.nanmean gave
    assert blank["metrics"]["pixcorr"] == pytest.approx(real.sum() / N_IMAGES, rel=1e-5)
    assert blank["metrics"]["pixcorr"] < real.mean()
    assert blank["per_image"]["pixcorr"][:2] == [0.0, 0.0]
    np.testing.assert_allclose(blank["per_image"]["pixcorr"][2:], real, rtol=1e-5)
    assert blank["undefined"]["pixcorr"] == 2 and tried["undefined"]["pixcorr"] == 0
    assert {"pixcorr", "effnet", "swav"} <= set(blank["undefined"])
    assert "0.0" in report["settings"]["undefined"]

    # the paired comparison pairs all 12 images, the blanks with their 0
    d = paired_difference(blank, tried)["pixcorr"]
    diff = np.array(blank["per_image"]["pixcorr"]) - np.array(tried["per_image"]["pixcorr"])
    assert d["n"] == N_IMAGES and d["mean"] == pytest.approx(diff.mean())
    assert d["mean"] == pytest.approx(-np.mean(tried["per_image"]["pixcorr"][:2]) / 6)

    # the report shows the count beside the score
    metrics_json = tmp_path / "metrics.json"
    metrics_json.write_text(json.dumps(report))
    html = build_report([metrics_json], tmp_path / "report.html").read_text(encoding="utf-8")
    assert f"{blank['metrics']['pixcorr']:.3f} (2 undefined)" in html
