"""Prepared store: session-by-session prepare, z-scoring, splits, datasets, atomicity and subject checks."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
from test_nsd import build_tiny_nsd

from fmrirecon.data import prepare as prepare_module
from fmrirecon.data.nsd import NsdReader
from fmrirecon.data.prepare import prepare_nsd
from fmrirecon.data.store import AveragedDataset, PreparedStore, TrialDataset
from fmrirecon.errors import DatasetLayoutError, SubjectMismatchError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("store")
    design, images, captions, subjects = build_tiny_nsd(base / "root")
    store = prepare_nsd(base / "root", base / "store", progress=False)
    return base, design, images, captions, subjects, PreparedStore(store)


def test_manifest_and_sessions(tiny):
    _, _, _, _, _, store = tiny
    assert store.manifest["format"] == "fmrirecon-store" and store.manifest["version"] == 1
    assert store.subjects == [1, 2, 3]
    assert store.manifest["sessions"] == {"1": 4, "2": 4, "3": 3}
    assert store.manifest["roi"] == "nsdgeneral"
    assert store.manifest["world"] is None  # no sidecar in this fixture


def test_betas_are_session_zscored_simulated_betas(tiny):
    _, _, _, _, subjects, store = tiny
    for sim in subjects:
        subject = store.subject(sim.subject)
        betas, session = subject.betas(), subject.trials["session"]
        assert betas.dtype == np.float32 and betas.shape == (subject.n_trials, sim.n_voxels)
        for s in np.unique(session):
            rows = betas[session == s]
            np.testing.assert_allclose(rows.mean(0), 0, atol=1e-5)
            np.testing.assert_allclose(rows.std(0), 1, atol=1e-4)
            raw = sim.recorded[int(s)]
            expected = (raw - raw.mean(0)) / raw.std(0)
            np.testing.assert_allclose(rows, expected, atol=0.02)  # int16 quantisation only
        np.testing.assert_array_equal(subject.voxel_ijk, sim.voxel_ijk)


def test_voxel_counts_differ_and_rois_are_kept(tiny):
    _, _, _, _, subjects, store = tiny
    counts = [store.subject(s).n_voxels for s in store.subjects]
    assert counts == [60, 52, 45]
    rois = store.subject(2).rois
    assert set(rois) == {"nsdgeneral", "prf-visualrois"}
    np.testing.assert_array_equal(rois["nsdgeneral"], 1)
    np.testing.assert_array_equal(rois["prf-visualrois"], 1 + np.arange(52) % 3)
    assert store.subject(2).roi_labels["prf-visualrois"] == ["V1v", "V1d", "V2v"]


def test_test_split_is_the_shared_images_in_every_subject(tiny):
    _, design, _, _, _, store = tiny
    for s in store.subjects:
        subject = store.subject(s)
        test_ids = subject.split_ids("test")
        assert set(test_ids) <= set(design.sharedix)
        assert not set(subject.split_ids("train")) & set(design.sharedix)
        rows = subject.split_rows("test")
        assert rows.size + subject.split_rows("train").size == subject.n_trials
    # subjects 1 and 2 completed every session: all shared images, three times each
    assert store.subject(1).split_ids("test").tolist() == sorted(design.sharedix)


def test_averaged_is_mean_over_repeats(tiny):
    _, _, _, _, _, store = tiny
    subject = store.subject(1)
    ids, avg = subject.averaged("test")
    assert avg.shape == (ids.size, subject.n_voxels)
    trials = subject.trials["image_id_73k"]
    for n, image_id in enumerate(ids[:3]):
        np.testing.assert_allclose(avg[n], subject.betas()[trials == image_id].mean(0), atol=1e-6)


def test_datasets_items(tiny):
    _, _, images, _, _, store = tiny
    trial_ds = TrialDataset(store, 2, "train")
    assert len(trial_ds) == int((~store.subject(2).trials["shared"]).sum())
    item = trial_ds[3]
    assert item["betas"].shape == (52,) and item["betas"].dtype == torch.float32
    assert item["image"].shape == (3, 8, 10) and item["image"].min() >= 0 and item["image"].max() <= 1
    expected = torch.from_numpy(images[item["image_id"]]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(item["image"], expected)
    avg_ds = AveragedDataset(store, 1, "test")
    batch = next(iter(torch.utils.data.DataLoader(avg_ds, batch_size=4)))
    assert batch["betas"].shape == (4, 60) and batch["image"].shape == (4, 3, 8, 10)
    assert store.captions(np.array([avg_ds.image_ids[0]]))[0][0].startswith(f"image {avg_ds.image_ids[0]} ")


def test_first_k_sessions_change_the_test_set(tiny):
    base, *_ = tiny
    full = PreparedStore(base / "store").subject(1)
    part = PreparedStore(prepare_nsd(base / "root", base / "store2", n_sessions=2, progress=False)).subject(1)
    assert part.n_sessions == 2 and part.n_trials == 24
    assert part.split_rows("test").size < full.split_rows("test").size
    assert set(part.split_ids("test")) <= set(full.split_ids("test"))


def test_nifti_and_hdf5_give_the_same_store(tiny):
    base, *_ = tiny
    a = PreparedStore(base / "store").subject(3).betas()
    b = PreparedStore(prepare_nsd(base / "root", base / "store_h5", betas_format="hdf5", progress=False))
    np.testing.assert_array_equal(a, b.subject(3).betas())


def test_rerun_is_noop_other_settings_need_force(tiny):
    base, *_ = tiny
    out = base / "store_rerun"
    prepare_nsd(base / "root", out, subjects=[2], progress=False)
    mtime = (out / "subj02.hdf5").stat().st_mtime_ns
    prepare_nsd(base / "root", out, subjects=[2], progress=False)
    assert (out / "subj02.hdf5").stat().st_mtime_ns == mtime
    with pytest.raises(DatasetLayoutError, match="--force"):
        prepare_nsd(base / "root", out, subjects=[3], progress=False)
    prepare_nsd(base / "root", out, subjects=[3], force=True, progress=False)
    assert PreparedStore(out).subjects == [3] and not (out / "subj02.hdf5").exists()


def test_failure_mid_prepare_leaves_nothing_under_final_name(tiny, monkeypatch):
    base, *_ = tiny
    calls = {"n": 0}
    original = NsdReader.read_session

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(prepare_module.NsdReader, "read_session", failing)
    out = base / "store_fail"
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_nsd(base / "root", out, progress=False)
    assert not out.exists()
    assert not [p for p in base.iterdir() if p.name.startswith(".store_fail")]


def test_subject_errors(tiny, tmp_path):
    base, *_ = tiny
    store = PreparedStore(base / "store")
    with pytest.raises(SubjectMismatchError, match=r"subject 7 .* \[1, 2, 3\]"):
        store.subject(7)
    with pytest.raises(SubjectMismatchError, match="must be \\(N, 52\\).*got \\(2, 60\\)"):
        store.subject(2).check_betas(np.zeros((2, 60)))
    # a store whose subj01 file was really prepared for subject 2
    swapped = tmp_path / "swapped"
    shutil.copytree(base / "store", swapped)
    shutil.copy(swapped / "subj02.hdf5", swapped / "subj01.hdf5")
    with pytest.raises(SubjectMismatchError, match="holds subject 2 but subject 1"):
        PreparedStore(swapped).subject(1)
    with h5py.File(swapped / "subj03.hdf5", "a") as f:
        del f["betas"]
    with pytest.raises(DatasetLayoutError, match="lacks \\['betas'\\]"):
        PreparedStore(swapped).subject(3)
    with pytest.raises(DatasetLayoutError, match="not a prepared store"):
        PreparedStore(tmp_path)


def test_roi_grid_mismatch_stops_prepare(tiny, tmp_path):
    from fmrirecon.data import nsd

    base, *_ = tiny
    root = tmp_path / "root"
    shutil.copytree(base / "root", root)
    nsd.write_roi(root, 2, "nsdgeneral", np.ones((4, 4, 4)), np.eye(4))
    with pytest.raises(
        DatasetLayoutError, match=r"grid \(8, 10, 6\) but the ROI volume has grid \(4, 4, 4\)"
    ):
        prepare_nsd(root, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_image_size_resizes_the_copied_stimuli(tiny):
    base, _, images, *_ = tiny
    store = PreparedStore(prepare_nsd(base / "root", base / "store_px", image_size=6, progress=False))
    assert store.image_shape == (6, 6, 3)
    ids = store.subject(1).split_ids("test")[:2]
    small = store.images(ids)
    assert small.dtype == np.uint8 and small.shape == (2, 6, 6, 3)
    # resizing keeps the mean colour of each image
    np.testing.assert_allclose(small.mean((1, 2)), images[ids].mean((1, 2)), atol=12)
    assert TrialDataset(store, 1, "test")[0]["image"].shape == (3, 6, 6)
