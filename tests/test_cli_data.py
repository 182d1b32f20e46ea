"""`fmrirecon world make` and `fmrirecon prepare nsd|god` from the command line, on a tiny synthetic world."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from fmrirecon.cli import main
from fmrirecon.data.nsd import NsdReader
from fmrirecon.data.store import PreparedStore

TINY = ["--subjects", "2", "--image-size", "16", "--shared", "10", "--unique", "30", "--sessions", "6",
        "--voxels", "250", "--no-progress"]  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["world", "make"],
        ["world", "make-god"],
        ["prepare", "nsd"],
        ["prepare", "god"],
        ["world"],
        ["prepare"],
    ],
)
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: fmrirecon " + " ".join(argv))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    assert main(["world", "make", "--out", str(base / "world"), *TINY]) == 0
    assert (
        main(["prepare", "nsd", "--root", str(base / "world"), "--out", str(base / "store"), "--no-progress"])
        == 0
    )
    return base


def test_world_make_writes_nsd_layout_and_sidecar(made):
    root = made / "world"
    sidecar = json.loads((root / "fmrirecon_world.json").read_text())
    assert sidecar["sessions"] == {"1": 6, "2": 6}
    assert sidecar["trials_per_session"] == 20  # (10 + 30) x 3 / 6
    reader = NsdReader(root)
    assert reader.subjects() == [1, 2]
    assert reader.available_sessions(1, "nifti") == reader.available_sessions(1, "hdf5") == 6
    # voxels in the brain mask but outside nsdgeneral carry noise betas, voxels outside the brain are 0
    volume = np.asanyarray(nib.load(str(reader.paths.betas(1, 1))).dataobj)
    brain, general = reader.brainmask(1), reader.voxel_mask(1)
    assert volume.dtype == np.int16
    assert np.abs(volume[brain & ~general]).mean() > 50  # ~1 PSC noise x 300
    assert not volume[~brain].any()


def test_prepared_store_from_cli(made):
    store = PreparedStore(made / "store")
    assert store.subjects == [1, 2]
    counts = [store.subject(s).n_voxels for s in store.subjects]
    assert counts[0] == 250 and counts[0] != counts[1]
    assert store.manifest["world"]["params"]["n_voxels_base"] == 250
    for s in store.subjects:
        subject = store.subject(s)
        assert subject.split_ids("test").size == 10  # every shared image, all sessions prepared
        assert set(subject.split_ids("test")) == set(store.subject(1).split_ids("test"))


def test_world_subject_is_the_ground_truth_encoding_model(made):
    store = PreparedStore(made / "store")
    simulated = store.world_subject(2)
    ids = store.subject(2).split_ids("test")[:4]
    response = simulated.response(store.images(ids))
    assert response.shape == (4, store.subject(2).n_voxels)
    # the noiseless model explains the measured (z-scored, repeat-averaged) betas well above chance
    avg_ids, avg = store.subject(2).averaged("test")
    truth = simulated.response(store.images(avg_ids))
    corr = [np.corrcoef(truth[:, v], avg[:, v])[0, 1] for v in range(avg.shape[1])]
    assert np.nanmedian(corr) > 0.3


def test_rerun_is_noop_and_errors_exit_2(made, capsys):
    store_file = made / "store" / "subj01.hdf5"
    before = store_file.stat().st_mtime_ns
    args = ["prepare", "nsd", "--root", str(made / "world"), "--out", str(made / "store"), "--no-progress"]
    assert main(args) == 0
    assert store_file.stat().st_mtime_ns == before
    assert main(["world", "make", "--out", str(made / "world"), *TINY]) == 0  # same settings: nothing to do
    capsys.readouterr()
    assert main(["prepare", "nsd", "--root", str(made / "nowhere"), "--out", str(made / "s2")]) == 2
    assert "NSD root" in capsys.readouterr().err
    assert (
        main(["prepare", "nsd", "--root", str(made / "world"), "--out", str(made / "s3"), "--subjects", "5"])
        == 2
    )
    assert "unknown subject 5" in capsys.readouterr().err
    assert (
        main(["world", "make", "--out", str(made / "world"), *TINY[:-1], "--seed", "1", "--no-progress"]) == 2
    )
    assert "--force" in capsys.readouterr().err


def test_prepare_sessions_option(made):
    out = made / "store_k"
    args = ["prepare", "nsd", "--root", str(made / "world"), "--out", str(out), "--sessions", "3"]
    assert main([*args, "--betas-format", "hdf5", "--no-progress"]) == 0
    store = PreparedStore(out)
    assert store.manifest["sessions"] == {"1": 3, "2": 3}
    assert store.subject(1).n_trials == 60


def test_prepare_god_from_cli(tmp_path):
    import h5py

    from fmrirecon.data.god import stimulus_id, write_bdata

    rng = np.random.default_rng(0)
    ids = stimulus_id(np.full(8, 1001), np.arange(8))
    with h5py.File(tmp_path / "images.hdf5", "w") as f:
        f["images"] = rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
        f["stimulus_id"] = ids
    rows = np.concatenate([np.arange(6), np.tile([6, 7], 3)])
    samples = {
        "DataType": np.repeat([1, 2], [6, 6]),
        "Run": np.repeat([1, 2], 6),
        "Block": np.tile(np.arange(1, 7), 2),
        "stimulus_id": ids[rows],
    }
    write_bdata(tmp_path / "Subject3.h5", rng.normal(size=(12, 9)), samples, {"ROI_VC": np.ones(9)})
    assert main(["prepare", "god", "--root", str(tmp_path), "--out", str(tmp_path / "store")]) == 0
    store = PreparedStore(tmp_path / "store")
    assert store.subjects == [3] and store.subject(3).split_ids("test").tolist() == [6, 7]
    assert (
        main(["prepare", "god", "--root", str(tmp_path), "--out", str(tmp_path / "s2"), "--subjects", "1"])
        == 2
    )
