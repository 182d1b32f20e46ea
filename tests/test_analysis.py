"""Analyses: the registry, ``fmrirecon analyze``, the encoding map against an independent computation, its
NIfTI volumes in the subject's space, and the report showing analyses next to the runs."""

from __future__ import annotations

import json
import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import Ridge
from test_ridge import write_tiny_store

from fmrirecon.analysis import available_analyses, get_analysis
from fmrirecon.analysis.encoding_map import colour_grid_features
from fmrirecon.cli import main
from fmrirecon.data.store import PreparedStore
from fmrirecon.errors import ConfigError
from fmrirecon.methods.base import init_run_dir
from fmrirecon.methods.ridge import RidgeConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    store = write_tiny_store(root / "store", voxels={1: 40})
    # the same store with the planted code replaced by noise: an encoding model must find nothing there
    noise = root / "noise_store"
    shutil.copytree(store, noise)
    with h5py.File(noise / "subj01.hdf5", "r+") as f:
        f["betas"][...] = np.random.default_rng(1).standard_normal(f["betas"].shape).astype(np.float32)
    runs = {}
    for name, path in (("store", store), ("noise", noise)):
        runs[name] = root / f"run_{name}"
        init_run_dir(runs[name], method="ridge", config=RidgeConfig(), subject=1, store_path=path, seed=0)
    return dict(root=root, store=store, noise=noise, runs=runs)


def _analyze(setup, which="store", *extra):
    data = setup["store"] if which == "store" else setup["noise"]
    return main(["analyze", "encoding_map", "--run", str(setup["runs"][which]), "--data", str(data), *extra])


def test_registry_names_and_unknown_analysis():
    assert "encoding_map" in available_analyses()
    assert get_analysis("encoding_map").name == "encoding_map"
    with pytest.raises(ConfigError, match="unknown analysis 'nope'; expected one of"):
        get_analysis("nope")


def test_encoding_map_matches_an_independent_ridge_and_writes_nifti_in_subject_space(setup):
    assert _analyze(setup, "store", "--device", "cpu") == 0
    out = setup["runs"]["store"] / "analyses" / "encoding_map"
    doc = json.loads((out / "analysis.json").read_text())
    assert (doc["analysis"], doc["method"], doc["subject"]) == ("encoding_map", "ridge", 1)
    assert doc["volumes"] == ["encoding_r.nii.gz", "alpha.nii.gz"] and doc["figures"] == [
        "encoding_r_histogram.png"
    ]
    Image.open(out / "encoding_r_histogram.png").verify()

    subject = PreparedStore(setup["store"]).subject(1)
    r_img, alpha_img = nib.load(out / "encoding_r.nii.gz"), nib.load(out / "alpha.nii.gz")
    np.testing.assert_array_equal(r_img.affine, subject.affine)
    i, j, k = subject.voxel_ijk.T
    r, alphas = r_img.get_fdata()[i, j, k], alpha_img.get_fdata()[i, j, k]
    outside = np.ones(r_img.shape, bool)
    outside[i, j, k] = False
    assert np.isnan(r_img.get_fdata()[outside]).all()  # voxels outside the mask are empty in a viewer

    # independent computation: scikit-learn's Ridge at each voxel's chosen penalty, np.corrcoef on test betas
    store = PreparedStore(setup["store"])
    train_ids, train_betas = subject.averaged("train")
    test_ids, test_betas = subject.averaged("test")
    x, xt = (colour_grid_features(store.images(ids), 8) for ids in (train_ids, test_ids))
    mean, std = x.mean(0), x.std(0) + 1e-8
    for v in range(subject.n_voxels):
        model = Ridge(alpha=alphas[v]).fit((x - mean) / std, train_betas[:, v])
        expected = np.corrcoef(model.predict((xt - mean) / std), test_betas[:, v])[0, 1]
        assert r[v] == pytest.approx(expected, abs=1e-5)
    # the planted code is pixel-level: a colour-grid model predicts the voxels
    assert doc["results"]["median_r"] > 0.5 and doc["results"]["n_voxels"] == 40


def test_encoding_map_finds_nothing_in_noise(setup):
    out = setup["root"] / "noise_out"
    assert _analyze(setup, "noise", "--out", str(out)) == 0
    results = json.loads((out / "analysis.json").read_text())["results"]
    assert abs(results["median_r"]) < 0.25 and results["fraction_r_above_0.2"] < 0.5


def test_analyze_errors_are_clear(setup, capsys):
    assert _analyze(setup, "store", "--set", "grid=5", "--out", str(setup["root"] / "x")) == 2
    assert "grid 5 does not divide the 32×32 images" in capsys.readouterr().err
    assert _analyze(setup, "store", "--set", "grids=5", "--out", str(setup["root"] / "x")) == 2
    assert "unknown config key 'grids' for EncodingMapConfig" in capsys.readouterr().err
    other = write_tiny_store(setup["root"] / "other_store", voxels={1: 37}, seed=1)
    argv = ["analyze", "encoding_map", "--run", str(setup["runs"]["store"]), "--data", str(other)]
    assert main(argv) == 2
    assert "was trained on store" in capsys.readouterr().err


def test_report_shows_analyses_found_next_to_the_runs(setup):
    from fmrirecon.report import build_report

    assert _analyze(setup, "store") == 0
    html = build_report([setup["runs"]["store"]], setup["root"] / "report.html").read_text()
    assert "encoding_map" in html and 'class="plot analysis-figure"' in html
    assert "encoding_r.nii.gz" in html and "median_r" in html
