"""NSD native layout: the writer puts files where and how the reference says; the reader gets them back."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy.io import loadmat

from fmrirecon.data import nsd
from fmrirecon.data.nsd import NsdReader, zscore_session
from fmrirecon.data.synthetic import make_design, session_counts, write_nsd_tree
from fmrirecon.errors import DatasetLayoutError

N_SHARED, N_UNIQUE, N_REPEATS, MAX_SESSIONS = 6, 10, 3, 4  # 48 trials, 12 per session


class TinySubject:
    """A fast stand-in with the SimulatedSubject interface; records every betas array it hands out."""

    def __init__(self, subject: int, grid_shape: tuple[int, int, int], n_general: int, seed: int):
        self.subject = subject
        self.grid_shape = grid_shape
        self.affine = np.diag([1.8, 1.8, 1.8, 1.0])
        rng = np.random.default_rng(seed)
        brain = np.zeros(grid_shape, bool)
        brain[1:-1, 1:-1, 1:-1] = True
        cortex_ijk = np.argwhere(brain)
        chosen = np.sort(rng.choice(len(cortex_ijk), n_general, replace=False))
        self.voxel_ijk = cortex_ijk[chosen]  # C order, like np.argwhere(mask)
        self._brain = brain
        self.n_voxels = n_general
        self.weights = rng.normal(0, 1, (3, n_general)).astype(np.float32)
        self.recorded: dict[int, np.ndarray] = {}

    def brainmask_volume(self):
        return self._brain.copy()

    def roi_volume(self, name):
        volume = np.where(self._brain, 0.0, -1.0)
        i, j, k = self.voxel_ijk.T
        if name == "nsdgeneral":
            volume[i, j, k] = 1
        else:  # prf-visualrois-like: three labels over the nsdgeneral voxels
            volume[i, j, k] = 1 + np.arange(self.n_voxels) % 3
        return volume

    def roi_labels(self, name):
        return ["nsdgeneral"] if name == "nsdgeneral" else ["V1v", "V1d", "V2v"]

    def measure(self, images, sessions, rng):
        colour = images.reshape(len(images), -1, 3).mean(1) / 255.0  # (N, 3)
        betas = (
            colour @ self.weights * 4
            + sessions[:, None] * 0.5
            + rng.normal(0, 1, (len(images), self.n_voxels))
        )
        betas = betas.astype(np.float32)
        for s in np.unique(sessions):
            self.recorded[int(s)] = betas[sessions == s]
        return betas


def build_tiny_nsd(root: Path, formats=nsd.BETAS_FORMATS, seed: int = 0):
    """Three subjects with pairwise-different grids and voxel counts; sessions [4, 4, 3]."""
    design = make_design(3, N_SHARED, N_UNIQUE, N_REPEATS, MAX_SESSIONS, n_images=40, seed=seed)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (40, 8, 10, 3), dtype=np.uint8)
    captions = [[f"image {i} caption {c}" for c in range(5 + i % 2)] for i in range(40)]
    subjects = [
        TinySubject(1, (9, 8, 7), 60, 1),
        TinySubject(2, (8, 10, 6), 52, 2),
        TinySubject(3, (7, 9, 8), 45, 3),
    ]
    write_nsd_tree(
        root,
        images,
        captions,
        subjects,
        design,
        seed=seed,
        formats=formats,
        rois=["nsdgeneral", "prf-visualrois"],
        progress=False,
    )
    return design, images, captions, subjects


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("nsd") / "root"
    design, images, captions, subjects = build_tiny_nsd(root)
    return root, design, images, captions, subjects


def test_session_counts_follow_nsd_proportions():
    assert session_counts(4, 15) == [15, 15, 12, 11]
    assert session_counts(8, 40) == [40, 40, 32, 30, 40, 32, 40, 30]


def test_tree_matches_reference_layout(tiny):
    root, *_ = tiny
    expected = [
        "nsddata/experiments/nsd/nsd_expdesign.mat",
        "nsddata/experiments/nsd/nsd_stim_info_merged.csv",
        "nsddata/ppdata/subj01/func1pt8mm/brainmask.nii.gz",
        "nsddata/ppdata/subj01/func1pt8mm/roi/nsdgeneral.nii.gz",
        "nsddata/ppdata/subj03/func1pt8mm/roi/prf-visualrois.nii.gz",
        "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session01.nii.gz",
        "nsddata_betas/ppdata/subj02/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session04.hdf5",
        "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5",
    ]
    for rel in expected:
        assert (root / rel).is_file(), rel
    # subject 3 completed fewer sessions, like NSD's subj03 (32 of 40)
    assert not (
        root / "nsddata_betas/ppdata/subj03/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session04.nii.gz"
    ).exists()


def test_expdesign_is_one_based_and_shared_first(tiny):
    root, design, *_ = tiny
    mat = loadmat(str(root / "nsddata/experiments/nsd/nsd_expdesign.mat"))
    assert mat["masterordering"].shape == (1, (N_SHARED + N_UNIQUE) * N_REPEATS)
    assert mat["subjectim"].shape == (3, N_SHARED + N_UNIQUE)
    assert mat["sharedix"].shape == (1, N_SHARED)
    assert mat["masterordering"].min() == 1 and mat["masterordering"].max() == N_SHARED + N_UNIQUE
    np.testing.assert_array_equal(mat["masterordering"].ravel() - 1, design.masterordering)
    np.testing.assert_array_equal(mat["sharedix"].ravel() - 1, design.sharedix)
    for row in mat["subjectim"]:
        np.testing.assert_array_equal(row[:N_SHARED], mat["sharedix"].ravel())
    reader = NsdReader(root)
    np.testing.assert_array_equal(reader.expdesign().subjectim, design.subjectim)


def test_betas_files_are_int16_x300_with_reversed_hdf5_axes(tiny):
    root, _, _, _, subjects = tiny
    reader = NsdReader(root)
    img = nib.load(str(reader.paths.betas(2, 1, "nifti")))
    assert img.get_data_dtype() == np.int16
    assert img.shape == (8, 10, 6, 12)
    with h5py.File(reader.paths.betas(2, 1, "hdf5"), "r") as f:
        assert f["betas"].dtype == np.int16
        assert f["betas"].shape == (12, 6, 10, 8)  # (T, Z, Y, X)
        from_hdf5 = f["betas"][()].transpose(3, 2, 1, 0)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), from_hdf5)
    i, j, k = subjects[1].voxel_ijk[0]
    expected = np.rint(subjects[1].recorded[1][:, 0] * 300).astype(np.int16)
    np.testing.assert_array_equal(from_hdf5[i, j, k], expected)


@pytest.mark.parametrize("betas_format", ["nifti", "hdf5"])
def test_round_trip_equals_simulated_betas_up_to_int16(tiny, betas_format):
    root, _, _, _, subjects = tiny
    reader = NsdReader(root)
    for subject in subjects:
        mask = reader.voxel_mask(subject.subject, "nsdgeneral")
        voxel_ijk = np.argwhere(mask)
        np.testing.assert_array_equal(voxel_ijk, subject.voxel_ijk)
        n_sessions = reader.available_sessions(subject.subject, betas_format)
        assert n_sessions == session_counts(3, MAX_SESSIONS)[subject.subject - 1]
        for session in range(1, n_sessions + 1):
            betas = reader.read_session(subject.subject, session, voxel_ijk, betas_format)
            assert betas.dtype == np.float32
            np.testing.assert_allclose(betas, subject.recorded[session], atol=0.5 / 300 + 1e-6)


def test_trial_table_from_design_and_files(tiny):
    root, design, *_ = tiny
    reader = NsdReader(root)
    for subject in (1, 3):
        table = reader.trial_table(subject)
        k = reader.available_sessions(subject)
        assert reader.trials_per_session(subject, k).tolist() == [12] * k  # read from the files, not 750
        np.testing.assert_array_equal(table["image_id_73k"], design.subject_trial_ids(subject))
        np.testing.assert_array_equal(table["global_trial"], np.arange(12 * k))
        np.testing.assert_array_equal(table["session"], np.repeat(np.arange(1, k + 1), 12))
        np.testing.assert_array_equal(table["shared"], np.isin(table["image_id_73k"], design.sharedix))
        for image_id in np.unique(table["image_id_73k"]):
            reps = table["repeat"][table["image_id_73k"] == image_id]
            np.testing.assert_array_equal(reps, np.arange(reps.size))


def test_stim_info_csv_columns_and_one_based_trials(tiny):
    root, design, *_ = tiny
    table = pd.read_csv(root / "nsddata/experiments/nsd/nsd_stim_info_merged.csv")
    assert list(table.columns[:9]) == [
        "Unnamed: 0",
        "cocoId",
        "cocoSplit",
        "cropBox",
        "loss",
        "nsdId",
        "flagged",
        "BOLD5000",
        "shared1000",
    ]
    assert {"subject1", "subject3", "subject1_rep0", "subject3_rep2"} <= set(table.columns)
    np.testing.assert_array_equal(table["nsdId"], np.arange(40))
    assert set(table["cocoSplit"]) <= {"train2017", "val2017"}
    np.testing.assert_array_equal(np.flatnonzero(table["shared1000"]), design.sharedix)
    trial_ids = design.subject_trial_ids(3)
    for rep in range(3):
        presented = table[table[f"subject3_rep{rep}"] > 0]
        # 1-based global trial number -> that trial shows this nsdId
        np.testing.assert_array_equal(trial_ids[presented[f"subject3_rep{rep}"] - 1], presented["nsdId"])
    assert (table.loc[table["subject3"], "subject3_rep0"] > 0).all()


def test_stimuli_and_captions_by_coco_id(tiny):
    root, _, images, captions, _ = tiny
    reader = NsdReader(root)
    assert reader.image_shape() == (40, 8, 10, 3)
    ids = np.array([7, 3, 7, 39])
    np.testing.assert_array_equal(reader.images(ids), images[ids])
    got = reader.captions(ids)
    assert got[1] == captions[3][:5] and got[0] == got[2]
    assert len(got[3]) == 5  # images with 6 captions are cut to 5


def test_first_k_sessions_shrink_the_test_set_like_nsd():
    # Defaults of `world make`: sessions 15 vs 12 play the part of NSD's 40 vs 37.
    design = make_design(4, 100, 500, 3, 15, seed=0)
    shared_full = np.isin(design.subject_trial_ids(1), design.sharedix)
    assert np.unique(design.subject_trial_ids(1)[shared_full]).size == 100
    assert shared_full.sum() == 300
    first12 = design.subject_trial_ids(1)[: 12 * design.trials_per_session]
    seen12 = np.unique(first12[np.isin(first12, design.sharedix)])
    assert 80 <= seen12.size < 100  # some shared images only appear in the last sessions (982 < 1000 in NSD)
    assert np.isin(first12, design.sharedix).sum() < 3 * seen12.size  # and some repeats are missing


def test_reader_selects_k_sessions(tiny):
    root, *_ = tiny
    reader = NsdReader(root)
    full, two = reader.trial_table(1, 4), reader.trial_table(1, 2)
    assert two["session"].max() == 2 and two["global_trial"].size == 24
    np.testing.assert_array_equal(two["image_id_73k"], full["image_id_73k"][:24])
    assert two["shared"].sum() < full["shared"].sum()


def test_zscore_session_moments():
    rng = np.random.default_rng(0)
    betas = rng.normal(3, 5, (50, 7)).astype(np.float32)
    betas[:, 2] = 1.0  # constant voxel -> 0, not NaN
    z = zscore_session(betas)
    np.testing.assert_allclose(z[:, [0, 1, 3]].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, [0, 1, 3]].std(0), 1, atol=1e-4)
    np.testing.assert_array_equal(z[:, 2], 0)


# ---- bad input --------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_copy(tiny, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tiny[0], root)
    return root


def test_missing_session_file_is_named(tiny_copy):
    reader = NsdReader(tiny_copy)
    missing = reader.paths.betas(1, 2, "nifti")
    missing.unlink()
    with pytest.raises(DatasetLayoutError, match="betas_session02.nii.gz"):
        reader.available_sessions(1)
    with pytest.raises(DatasetLayoutError, match="missing session file"):
        NsdReader(tiny_copy).resolve_sessions(3, 4)


def test_unknown_subject(tiny):
    with pytest.raises(DatasetLayoutError, match=r"unknown subject 9.*\[1, 2, 3\]"):
        NsdReader(tiny[0]).trial_table(9)


def test_roi_grid_mismatch(tiny_copy):
    reader = NsdReader(tiny_copy)
    nsd.write_roi(tiny_copy, 1, "nsdgeneral", np.ones((5, 5, 5)), np.eye(4))
    with pytest.raises(DatasetLayoutError, match=r"grid \(9, 8, 7\).*\(5, 5, 5\)"):
        reader.check_grid(1, 1, reader.voxel_mask(1).shape, "nifti")


def test_truncated_nifti_and_corrupt_hdf5(tiny_copy):
    reader = NsdReader(tiny_copy)
    ijk = np.argwhere(reader.voxel_mask(1))
    path = reader.paths.betas(1, 1, "nifti")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetLayoutError, match="betas_session01.nii.gz"):
        reader.read_session(1, 1, ijk, "nifti")
    hpath = reader.paths.betas(1, 1, "hdf5")
    hpath.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(DatasetLayoutError, match="betas_session01.hdf5"):
        reader.read_session(1, 1, ijk, "hdf5")
    with gzip.open(reader.paths.roi(1, "nsdgeneral"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(DatasetLayoutError, match="nsdgeneral.nii.gz"):
        reader.voxel_mask(1)


def test_nan_betas_error_by_default_zero_fill_on_request(tiny_copy):
    reader = NsdReader(tiny_copy)
    ijk = np.argwhere(reader.voxel_mask(2))
    volume = np.asanyarray(nib.load(str(reader.paths.betas(2, 1))).dataobj).astype(np.float32) / 300
    i, j, k = ijk[3]
    volume[i, j, k, 5] = np.nan
    path = reader.paths.betas(2, 1, "hdf5")
    with h5py.File(path, "w") as f:  # a float file, as a converted dataset might ship
        f["betas"] = volume.transpose(3, 2, 1, 0)
    with pytest.raises(DatasetLayoutError, match="1 NaN"):
        reader.read_session(2, 1, ijk, "hdf5")
    with pytest.warns(UserWarning, match="replaced 1 NaN"):
        betas = reader.read_session(2, 1, ijk, "hdf5", nan_policy="zero")
    assert betas[5, 3] == 0 and np.isfinite(betas).all()
