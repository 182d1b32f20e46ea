"""Bytes damaged at random offsets of every file of a store, a run folder and a reconstruction folder: each
case is detected with a clear fmrirecon error or provably harmless (what the readers return is identical to
the intact copy's) — never a silently different result."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import damage, record, same

from fmrirecon.data.integrity import verify_store
from fmrirecon.errors import FmriReconError

FAST_CASES = 3  # per file, default suite
SLOW_CASES = 25  # per file, the sweep


def read_store(store_dir) -> dict:
    """Everything training, reconstruction and evaluation read from a store."""
    from fmrirecon.data.store import PreparedStore

    store = PreparedStore(store_dir)
    subject = store.subject(1)
    ids = store.ids_73k
    return {
        "manifest": {k: store.manifest[k] for k in ("subjects", "sessions", "roi", "world")},
        "betas": subject.betas(),
        "trials": subject.trials,
        "voxel_ijk": subject.voxel_ijk,
        "affine": subject.affine,
        "rois": subject.rois,
        "roi_labels": subject.roi_labels,
        "attrs": {k: np.asarray(v) for k, v in subject.attrs.items()},
        "ids": ids,
        "images": store.images(ids),
        "captions": store.captions(ids),
    }


def read_run(run_dir, store_dir, betas) -> dict:
    """A run loaded as reconstruct loads it, and its reconstructions of two fixed inputs."""
    from fmrirecon.runs import load_run

    method, info = load_run(run_dir, store_dir)
    return {"info": info, "images": method.reconstruct(betas, 1, 0)}


def read_recon(recon_dir) -> dict:
    """A reconstruction folder as evaluate reads it: manifest fields and every image's pixels."""
    from PIL import Image

    from fmrirecon.evaluation.io import read_recon_dir

    recon = read_recon_dir(recon_dir)
    images = [
        np.asarray(Image.open(recon.image_path(i, k)).convert("RGB"))
        for i in recon.ids
        for k in range(recon.samples)
    ]
    return {"ids": recon.ids, "method": recon.method, "subject": recon.subject, "images": np.stack(images)}


def classify(reader, folder, reference) -> tuple[str, str]:
    try:
        got = reader(folder)
    except FmriReconError as err:
        return "detected", f"{type(err).__name__}: {err}"
    return ("harmless", "") if same(got, reference) else ("silent", "readers returned different values")


def sweep(kind, source, files, reader, tmp_path, cases, seed, check=None):
    """Damage each file ``cases`` times (a fresh copy each time); returns the outcomes; fails on a silent
    one, and on a detection whose message does not name the damaged folder."""
    reference = reader(source)
    rng = np.random.default_rng(seed)
    outcomes = []
    for name in files:
        for case in range(cases):
            copy = tmp_path / f"{kind}-{name.replace('/', '_')}-{case}"
            shutil.copytree(source, copy)
            offset = damage(copy / name, rng)
            outcome, detail = classify(reader, copy, reference)
            if outcome == "harmless" and check is not None:
                outcome, detail = check(copy, outcome)
            record(f"corrupt {kind}: {name.split('/')[0]}", outcome, detail)
            assert outcome != "silent", f"{name} damaged at byte {offset}: {detail}"
            if outcome == "detected" and detail != "store verify":
                assert copy.name in detail, detail
            outcomes.append(outcome)
            shutil.rmtree(copy)
    return outcomes


def _verify_agrees(copy, outcome):
    # Readers saw the same values; verify must say the same or name the damage (never crash).
    report = verify_store(copy)
    return ("detected", "store verify") if not report.ok else (outcome, "")


def _store_files(store):
    return sorted(p.name for p in store.iterdir() if p.is_file())


def _run_files(run):
    return sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and p.name != ".lock")


def _recon_files(recon):
    names = sorted(p.relative_to(recon).as_posix() for p in recon.rglob("*") if p.is_file())
    images = [n for n in names if n.startswith("images/")]
    return [n for n in names if n not in images] + images[:2]


def _betas(pipeline):
    from fmrirecon.data.store import PreparedStore

    return PreparedStore(pipeline.store).subject(1).averaged("test")[1][:2]


def test_damaged_store_files_are_detected_or_harmless(pipeline, tmp_path):
    outcomes = sweep(
        "store", pipeline.store, _store_files(pipeline.store), read_store, tmp_path, FAST_CASES, 0,
        _verify_agrees,
    )  # fmt: skip
    assert "detected" in outcomes


def test_damaged_run_files_are_detected_or_harmless(pipeline, tmp_path):
    betas = _betas(pipeline)
    outcomes = sweep(
        "run", pipeline.run, _run_files(pipeline.run),
        lambda d: read_run(d, pipeline.store, betas), tmp_path, FAST_CASES, 1,
    )  # fmt: skip
    assert "detected" in outcomes


def test_damaged_reconstruction_files_are_detected_or_harmless(pipeline, tmp_path):
    files = _recon_files(pipeline.recon)
    outcomes = sweep("recon", pipeline.recon, files, read_recon, tmp_path, FAST_CASES, 2)
    assert "detected" in outcomes


@pytest.mark.slow
def test_sweep_many_damages_per_file(pipeline, tmp_path):
    betas = _betas(pipeline)
    sweep("store", pipeline.store, _store_files(pipeline.store), read_store, tmp_path, SLOW_CASES, 10,
          _verify_agrees)  # fmt: skip
    sweep("run", pipeline.run, _run_files(pipeline.run), lambda d: read_run(d, pipeline.store, betas),
          tmp_path, SLOW_CASES, 11)  # fmt: skip
    sweep("recon", pipeline.recon, _recon_files(pipeline.recon), read_recon, tmp_path, SLOW_CASES, 12)
