"""GOD (bdpy BData HDF5): layout written as bdpy stores it, read back with bdpy's selection rules."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from fmrirecon.data.god import (
    prepare_god,
    read_god,
    split_stimulus_id,
    stimulus_id,
    subject_file,
    write_bdata,
    write_synthetic_god,
)
from fmrirecon.data.store import AveragedDataset, PreparedStore
from fmrirecon.errors import DatasetLayoutError, SubjectMismatchError


def _arrays(seed=0, n=30, v=17):
    rng = np.random.default_rng(seed)
    betas = rng.normal(0, 2, (n, v))
    samples = {
        "DataType": np.repeat([1, 2], [20, 10]),
        "Run": np.repeat([1, 2, 3], 10),
        "Block": np.tile(np.arange(1, 11), 3),
        "stimulus_id": stimulus_id(rng.integers(1_000_000, 9_999_999, n), rng.integers(0, 20000, n)),
    }
    voxel_meta = {
        "voxel_x": rng.normal(size=v),
        "voxel_y": rng.normal(size=v),
        "voxel_z": rng.normal(size=v),
        "ROI_V1": (np.arange(v) < 6).astype(float),
        "ROI_VC": np.ones(v),
    }
    return betas, samples, voxel_meta


def test_stimulus_id_format():
    assert stimulus_id(1518878, 5958) == pytest.approx(1518878.005958)
    synset, number = split_stimulus_id(np.array([1518878.005958, 2000000.123456]))
    assert synset.tolist() == [1518878, 2000000] and number.tolist() == [5958, 123456]


def test_bdata_layout_and_round_trip(tmp_path):
    betas, samples, voxel_meta = _arrays()
    path = write_bdata(tmp_path / "Subject1.h5", betas, samples, voxel_meta)
    with h5py.File(path, "r") as f:
        keys = [k.decode() for k in f["metadata/key"][()]]
        value = f["metadata/value"][()]
        dataset = f["dataset"][()]
        assert f["metadata/description"].shape == (len(keys),)
    assert dataset.dtype == np.float64 and dataset.shape == (30, 17 + 4)
    assert value.shape == (len(keys), 21)
    meta = dict(zip(keys, value))
    # bdpy select(): dataset[:, value[key] == 1]
    np.testing.assert_array_equal(dataset[:, meta["ROI_V1"] == 1], betas[:, :6])
    np.testing.assert_array_equal(dataset[:, meta["DataType"] == 1].ravel(), samples["DataType"])
    assert np.isnan(meta["VoxelData"][17:]).all() and np.isnan(meta["voxel_x"][17:]).all()

    data = read_god(path)
    np.testing.assert_allclose(data.betas, betas, rtol=1e-6)
    np.testing.assert_array_equal(data.data_type, samples["DataType"])
    np.testing.assert_array_equal(data.run, samples["Run"])
    np.testing.assert_array_equal(data.stimulus_id, samples["stimulus_id"])
    np.testing.assert_array_equal(data.rois["ROI_V1"], np.arange(17) < 6)
    np.testing.assert_allclose(data.voxel_xyz[:, 1], voxel_meta["voxel_y"])


def test_legacy_dataset_names(tmp_path):
    betas, samples, voxel_meta = _arrays(1)
    path = write_bdata(tmp_path / "Subject2.h5", betas, samples, voxel_meta)
    legacy = tmp_path / "legacy.h5"
    with h5py.File(path, "r") as src, h5py.File(legacy, "w") as dst:
        dst["dataSet"] = src["dataset"][()]
        for name in ("key", "description", "value"):
            dst[f"metaData/{name}"] = src[f"metadata/{name}"][()]
    np.testing.assert_allclose(read_god(legacy).betas, betas, rtol=1e-6)


def test_bad_bdata_files(tmp_path):
    with pytest.raises(DatasetLayoutError, match="Subject9.h5"):
        read_god(tmp_path / "Subject9.h5")
    not_bdata = tmp_path / "other.h5"
    with h5py.File(not_bdata, "w") as f:
        f["betas"] = np.zeros((2, 2))
    with pytest.raises(DatasetLayoutError, match=r"expected /dataset and /metadata.*\['betas'\]"):
        read_god(not_bdata)
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF garbage" * 20)
    with pytest.raises(DatasetLayoutError, match="corrupt.h5"):
        read_god(corrupt)
    betas, samples, voxel_meta = _arrays()
    del samples["DataType"]
    path = write_bdata(tmp_path / "Subject3.h5", betas, samples, voxel_meta)
    with pytest.raises(DatasetLayoutError, match="'DataType' missing"):
        read_god(path)


@pytest.fixture(scope="module")
def god_world(tmp_path_factory):
    base = tmp_path_factory.mktemp("god")
    root = write_synthetic_god(
        base / "root",
        n_subjects=2,
        n_train=40,
        n_test=6,
        test_repeats=4,
        run_length=12,
        image_size=16,
        n_voxels_base=250,
        progress=False,
    )
    return base, root


def test_synthetic_world_in_god_layout(god_world):
    _, root = god_world
    with pytest.raises(DatasetLayoutError, match="--force"):
        write_synthetic_god(root, n_subjects=1)
    data = read_god(subject_file(root, 2))
    assert (data.data_type == 1).sum() == 40 and (data.data_type == 2).sum() == 24
    assert data.rois["ROI_VC"].all() and data.rois["ROI_V1"].sum() > 0
    np.testing.assert_array_equal(
        data.rois["ROI_LVC"], data.rois["ROI_V1"] | data.rois["ROI_V2"] | data.rois["ROI_V3"]
    )
    # each test image is shown test_repeats times, every training image once
    _, numbers = split_stimulus_id(data.stimulus_id)
    assert np.bincount(numbers[data.data_type == 2]).max() == 4
    assert np.unique(numbers[data.data_type == 1]).size == 40
    lines = (root / "imageID_test.csv").read_text().splitlines()
    assert len(lines) == 6 and lines[0].endswith('.JPEG"')


def test_prepare_god_into_store(god_world):
    base, root = god_world
    store = PreparedStore(prepare_god(root, base / "store"))
    subject = store.subject(1)
    assert subject.split_ids("test").tolist() == list(range(40, 46))
    betas, run = subject.betas(), subject.trials["session"]
    for r in np.unique(run):
        np.testing.assert_allclose(betas[run == r].mean(0), 0, atol=1e-5)
    ids, avg = subject.averaged("test")
    assert avg.shape == (6, subject.n_voxels)
    assert store.subject(2).n_voxels != subject.n_voxels
    item = AveragedDataset(store, 1, "test")[0]
    assert item["image"].shape == (3, 16, 16)
    assert store.world_subject(1).n_voxels == subject.n_voxels
    with pytest.raises(SubjectMismatchError, match="unknown GOD subject 5"):
        prepare_god(root, base / "store5", subjects=[5])
    assert not (base / "store5").exists()
