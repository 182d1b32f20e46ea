"""Store integrity: checksummed chunks, dataset digests, `store verify`, betas dtypes, bounded streaming."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil

import h5py
import numpy as np
import pytest
from test_nsd import build_tiny_nsd

from fmrirecon.cli import main
from fmrirecon.data import integrity
from fmrirecon.data.prepare import prepare_nsd
from fmrirecon.data.store import INT16_SCALE, PreparedStore
from fmrirecon.errors import DatasetLayoutError, StoreCorruptionError

# 8 rows of 60 float32 voxels per chunk: subject 1's betas span several chunks.
SMALL_CHUNK_BYTES = 8 * 60 * 4


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("integrity")
    build_tiny_nsd(base / "root")
    mp = pytest.MonkeyPatch()
    mp.setattr(integrity, "TARGET_CHUNK_BYTES", SMALL_CHUNK_BYTES)
    try:
        out = {
            dtype: prepare_nsd(base / "root", base / f"store_{dtype}", betas_dtype=dtype, progress=False)
            for dtype in ("float32", "float16", "int16")
        }
    finally:
        mp.undo()
    return base, out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _zero_in_chunk(path, dataset, chunk_index, nbytes=64):
    """Zero ``nbytes`` inside the stored chunk ``chunk_index`` of ``dataset``; returns its first row."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk_index)
        rows = f[dataset].chunks[0]
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(b"\0" * nbytes)
    return info.chunk_offset[0], rows


def test_every_dataset_is_checksummed_and_its_digest_matches_an_independent_hash(stores):
    _, out = stores
    manifest = json.loads((out["float32"] / "manifest.json").read_text())
    files = manifest["integrity"]["files"]
    assert set(files) == {"stimuli.hdf5", "subj01.hdf5", "subj02.hdf5", "subj03.hdf5"}
    for name, entries in files.items():
        with h5py.File(out["float32"] / name, "r") as f:
            assert integrity.dataset_names(f) == sorted(entries)
            for ds_name, entry in entries.items():
                ds = f[ds_name]
                assert ds.fletcher32 and ds.chunks is not None, (name, ds_name)
                expected = hashlib.sha256(np.ascontiguousarray(ds[()]).tobytes()).hexdigest()
                assert entry["digest"] == f"sha256:{expected}"
                assert entry["shape"] == list(ds.shape)
    with h5py.File(out["float32"] / "subj01.hdf5", "r") as f:
        assert f["betas"].chunks[0] == 8  # chunked by TARGET_CHUNK_BYTES
        assert f["betas"].shape[0] > 3 * 8
    assert integrity.manifest_self_digest(manifest) == manifest["manifest_digest"]


def test_captions_stay_readable_as_text_from_checksummed_fixed_length_strings(stores):
    _, out = stores
    store = PreparedStore(out["float32"])
    captions = store.captions(store.ids_73k[:3])
    assert captions[0][0].startswith(f"image {store.ids_73k[0]} caption")
    with h5py.File(out["float32"] / "stimuli.hdf5", "r") as f:
        assert f["captions"].dtype.kind == "S"  # no variable-length strings in the unchecked global heap


def test_zeroed_4kib_in_the_middle_of_a_subject_file_is_detected_by_readers_and_verify(
    stores, tmp_path, capsys
):
    _, out = stores
    store_dir = _copy(out["float32"], tmp_path / "bad")
    path = store_dir / "subj01.hdf5"
    size = path.stat().st_size
    with open(path, "r+b") as fh:  # the case: a bad sector in the middle of the file
        fh.seek(size // 2)
        fh.write(b"\0" * 4096)
    with pytest.raises(StoreCorruptionError, match="subj01.hdf5"):
        store = PreparedStore(store_dir)
        store.subject(1).betas()
    assert main(["store", "verify", str(store_dir), "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert "corrupt   subj01.hdf5" in printed and "intact    subj02.hdf5" in printed


def test_a_corrupt_chunk_names_the_file_the_dataset_and_its_rows(stores, tmp_path):
    _, out = stores
    store_dir = _copy(out["float32"], tmp_path / "bad")
    first, rows = _zero_in_chunk(store_dir / "subj01.hdf5", "betas", 2)
    subject = PreparedStore(store_dir).subject(1)
    with pytest.raises(StoreCorruptionError) as err:
        subject.betas()
    message = str(err.value)
    assert (
        "subj01.hdf5" in message and "'betas'" in message and f"rows {first}..{first + rows - 1}" in message
    )
    # rows outside the bad chunk still read, and equal the intact store's
    clean = PreparedStore(out["float32"]).subject(1)
    np.testing.assert_array_equal(subject.betas(np.arange(first)), clean.betas(np.arange(first)))


def test_verify_reports_intact_store_and_digest_mismatch(stores, tmp_path, capsys):
    _, out = stores
    assert main(["store", "verify", str(out["float32"]), "--no-progress"]) == 0
    assert "store" in capsys.readouterr().out
    # A dataset rewritten with other values but valid checksums: only the digest can tell.
    store_dir = _copy(out["float32"], tmp_path / "edited")
    with h5py.File(store_dir / "subj02.hdf5", "r+") as f:
        f["betas"][0, 0] = f["betas"][0, 0] + 1
    report = integrity.verify_store(store_dir)
    assert not report.ok
    bad = {r.name: r for r in report.files}["subj02.hdf5"]
    assert bad.status == "corrupt" and "digest" in bad.problems[0]


def test_an_edited_manifest_fails_its_own_digest(stores, tmp_path):
    _, out = stores
    store_dir = _copy(out["float32"], tmp_path / "manifest")
    manifest = json.loads((store_dir / "manifest.json").read_text())
    manifest["sessions"]["1"] = 3
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreCorruptionError, match="its own digest"):
        PreparedStore(store_dir)
    assert main(["store", "verify", str(store_dir), "--no-progress"]) == 1


def test_store_digest_is_content_based_and_cheap(stores, tmp_path):
    _, out = stores
    digest = integrity.store_digest(out["float32"])
    assert digest == integrity.store_digest(_copy(out["float32"], tmp_path / "copy"))
    assert digest != integrity.store_digest(out["float16"])
    with pytest.raises(DatasetLayoutError, match="not a prepared store"):
        integrity.store_digest(tmp_path)


@pytest.mark.parametrize("dtype, atol", [("float16", 2e-3 * 8), ("int16", INT16_SCALE / 2 + 1e-6)])
def test_betas_dtypes_decode_to_float32_within_quantisation(stores, dtype, atol):
    _, out = stores
    reference = PreparedStore(out["float32"]).subject(1).betas()
    subject = PreparedStore(out[dtype]).subject(1)
    betas = subject.betas()
    assert betas.dtype == np.float32 and betas.shape == reference.shape
    np.testing.assert_allclose(betas, reference, atol=atol, rtol=0 if dtype == "int16" else 1e-3)
    with h5py.File(out[dtype] / "subj01.hdf5", "r") as f:
        assert f["betas"].dtype == np.dtype(dtype)


def test_streaming_reads_equal_the_stored_matrix_and_the_cache_is_bounded(stores):
    _, out = stores
    with h5py.File(out["float32"] / "subj01.hdf5", "r") as f:
        stored = f["betas"][()]
    block_bytes = 8 * stored.shape[1] * 4
    store = PreparedStore(out["float32"], cache_bytes=2 * block_bytes)
    subject = store.subject(1)
    rng = np.random.default_rng(0)
    rows = rng.permutation(subject.n_trials)[:30]
    np.testing.assert_array_equal(subject.betas(rows), stored[rows])
    assert subject._cached_bytes <= 2 * block_bytes and len(subject._cache) <= 2
    ids, averaged = subject.averaged("train")
    train = subject.split_rows("train")
    for k in (0, len(ids) - 1):
        hits = train[subject.trials["image_id_73k"][train] == ids[k]]
        np.testing.assert_allclose(averaged[k], stored[hits].mean(0), rtol=1e-6, atol=1e-6)
    uncached = PreparedStore(out["float32"], cache_bytes=0).subject(1)
    np.testing.assert_array_equal(uncached.betas(), stored)
    assert uncached._cached_bytes == 0


def _child_reads(subject, rows, queue):
    queue.put(subject.betas(rows).sum())


def test_a_forked_worker_reopens_the_file(stores):
    _, out = stores
    subject = PreparedStore(out["float32"]).subject(1)
    rows = np.arange(10)
    expected = subject.betas(rows).sum()  # opens the handle in the parent
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_reads, args=(subject, rows, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0 and got == pytest.approx(expected)
    assert subject._handle_pid is not None  # parent's handle untouched
    np.testing.assert_array_equal(subject.betas(rows).sum(), expected)
