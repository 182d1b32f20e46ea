"""Benchmark the store's reliability features at NSD scale (issue 25).

1. ``verify``: ``fmrirecon store verify`` (read every chunk, Fletcher-32 checked, SHA-256 digests) beside a
   raw read of the same files: ``cat`` into /dev/null and h5py reading every dataset with no digest.
   Target: verify <= 1.5 x the h5py read.
2. ``epoch``: one pretraining-style epoch over 8 NSD-sized subjects (nsdgeneral voxel counts of subj01..08,
   ``fmrirecon.data.brain.NSD_NSDGENERAL_COUNTS``; 750 trials per session, ``--sessions`` sessions so that it
   fits the disk), a linear model (V -> 64, one SGD step per 64-row block) per subject, interleaved over
   subjects as multi-subject pretraining does. ``before``: every subject's whole betas matrix loaded first
   (what ``SubjectStore.betas()`` cached before); ``after``: chunk-aligned streaming through the bounded
   cache. Each mode runs in a fresh process; peak RSS is its ``ru_maxrss``. Targets: RSS grows with the
   cache, not with subjects x sessions; throughput within 10 %.
3. ``dtypes``: betas stored float32 / float16 / int16 x 1/300 on a small world: a closed-form ridge from
   repeat-averaged betas to the images' pixels, scored by test PixCorr — differences must be float noise.

Run: ``python benchmarks/bench_store.py [--sessions 2] [--repeats 3] [--tmp DIR]``; prints one JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

TRIALS_PER_SESSION = 750
BLOCK = 64
OUT_DIM = 64


def build_store(folder: Path, sessions: int, subjects: int = 8, seed: int = 0) -> Path:
    """An NSD-sized store: random z-scored betas (float32) with the nsdgeneral voxel counts."""
    from fmrirecon.data.brain import NSD_NSDGENERAL_COUNTS
    from fmrirecon.data.integrity import (
        CheckedDatasetWriter,
        open_checked_file,
        seal_store,
        write_checked_dataset,
    )
    from fmrirecon.data.store import STORE_FORMAT, STORE_VERSION, SUBJECT_FORMAT, subject_file_name

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    n = sessions * TRIALS_PER_SESSION
    for s in range(1, subjects + 1):
        v = NSD_NSDGENERAL_COUNTS[s - 1]
        with open_checked_file(folder / subject_file_name(s)) as f:
            f.attrs.update(
                {"format": SUBJECT_FORMAT, "subject": s, "n_sessions": sessions, "roi": "nsdgeneral"}
            )
            betas = CheckedDatasetWriter(f, "betas", (n, v), np.float32)
            for start in range(0, n, 256):
                betas.write(rng.standard_normal((min(256, n - start), v), dtype=np.float32))
            betas.close()
            trials = {
                "image_id_73k": rng.permutation(73000)[:n],
                "session": np.repeat(np.arange(1, sessions + 1), TRIALS_PER_SESSION),
                "repeat": np.zeros(n, np.int64),
                "shared": np.zeros(n, bool),
                "global_trial": np.arange(n),
                "trial_in_session": np.tile(np.arange(TRIALS_PER_SESSION), sessions),
            }
            for name, values in trials.items():
                write_checked_dataset(f.require_group("trials"), name, values)
            write_checked_dataset(f, "voxel_ijk", np.zeros((v, 3), np.int32))
            write_checked_dataset(f, "affine", np.eye(4))
    with open_checked_file(folder / "stimuli.hdf5") as f:
        write_checked_dataset(f, "ids_73k", np.arange(8, dtype=np.int64))
        write_checked_dataset(f, "images", np.zeros((8, 4, 4, 3), np.uint8))
        write_checked_dataset(f, "captions", np.array([[""] * 5] * 8, dtype=object))
    seal_store(
        folder,
        {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "subjects": list(range(1, subjects + 1)),
            "sessions": {str(s): sessions for s in range(1, subjects + 1)},
            "roi": "nsdgeneral",
            "world": None,
        },
    )
    return folder


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_verify(store: Path, repeats: int) -> dict:
    import h5py

    from fmrirecon.data.integrity import dataset_names, iter_dataset_blocks, verify_store

    files = sorted(store.glob("*.hdf5"))

    def cat():
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)

    def h5_read():
        for path in files:
            with h5py.File(path, "r") as f:
                for name in dataset_names(f):
                    for _ in iter_dataset_blocks(f[name], path):
                        pass

    def verify():
        assert verify_store(store).ok

    cat()  # warm the page cache: every mode then reads from memory
    out = {"bytes": sum(p.stat().st_size for p in files)}
    for name, fn in (("cat", cat), ("h5py_read", h5_read), ("verify", verify)):
        walls, cpus = [], []
        for _ in range(repeats):
            cpu = time.process_time()
            walls.append(round(_timed(fn)[0], 3))
            cpus.append(round(time.process_time() - cpu, 3))
        out[name + "_s"], out[name + "_cpu_s"] = walls, cpus  # cpu > wall: the hash thread overlapped
    out["verify_over_h5py"] = round(min(out["verify_s"]) / min(out["h5py_read_s"]), 3)
    out["verify_over_cat"] = round(min(out["verify_s"]) / min(out["cat_s"]), 3)
    return out


def epoch(store_dir: str, mode: str, cache_mb: int) -> dict:
    """One epoch (child process): returns seconds, rows and peak RSS (MB)."""
    import torch

    from fmrirecon.data.store import PreparedStore

    torch.set_num_threads(1)
    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # interpreter + torch + numpy
    store = PreparedStore(store_dir, cache_bytes=cache_mb * 1024**2)
    subjects = [store.subject(s) for s in store.subjects]
    rng = np.random.default_rng(0)
    weights = {s.subject: torch.zeros(s.n_voxels, OUT_DIM) for s in subjects}
    start = time.perf_counter()
    loaded = {s.subject: s.betas() for s in subjects} if mode == "before" else None
    rows = 0
    # Interleave subjects block by block, as a multi-subject pretraining batch sampler does.
    n_blocks = max(s.n_trials for s in subjects) // BLOCK
    for b in range(n_blocks):
        for s in subjects:
            lo, hi = b * BLOCK, min(s.n_trials, (b + 1) * BLOCK)
            if lo >= hi:
                continue
            x = loaded[s.subject][lo:hi] if loaded is not None else s.betas(np.arange(lo, hi))
            x = torch.from_numpy(x)
            y = torch.from_numpy(rng.standard_normal((hi - lo, OUT_DIM), dtype=np.float32))
            w = weights[s.subject]
            grad = x.T @ (x @ w - y) / (hi - lo)
            w -= 1e-4 * grad
            rows += hi - lo
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "seconds": round(seconds, 3), "rows": rows, "rows_per_s": round(rows / seconds, 1),
            "peak_rss_mb": round(peak_mb, 1), "rss_before_epoch_mb": round(baseline_mb, 1),
            "cache_mb_per_subject": cache_mb}  # fmt: skip


def bench_epoch(store: Path, repeats: int, cache_mb: int) -> dict:
    out: dict = {}
    for mode in ("before", "after"):
        runs = []
        for _ in range(repeats):
            proc = subprocess.run(
                [sys.executable, __file__, "--child-epoch", str(store), mode, str(cache_mb)],
                capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
            )  # fmt: skip
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        out[mode] = runs
    best = {m: max(r["rows_per_s"] for r in out[m]) for m in out}
    out["throughput_after_over_before"] = round(best["after"] / best["before"], 3)
    return out


def bench_dtypes(folder: Path) -> dict:
    from fmrirecon.cli import main
    from fmrirecon.data.store import PreparedStore

    world = folder / "world"
    args = ["--subjects", "1", "--shared", "40", "--unique", "300", "--sessions", "4", "--voxels", "1500",
            "--image-size", "32", "--seed", "5", "--no-progress"]  # fmt: skip
    assert main(["world", "make", "--out", str(world), *args]) == 0
    out = {}
    for dtype in ("float32", "float16", "int16"):
        store_dir = folder / f"store_{dtype}"
        assert main(["prepare", "nsd", "--root", str(world), "--out", str(store_dir), "--betas-dtype", dtype,
                     "--no-progress"]) == 0  # fmt: skip
        store = PreparedStore(store_dir)
        subject = store.subject(1)
        train_ids, x_train = subject.averaged("train")
        test_ids, x_test = subject.averaged("test")
        y_train = store.images(train_ids).reshape(len(train_ids), -1).astype(np.float64) / 255
        y_test = store.images(test_ids).reshape(len(test_ids), -1).astype(np.float64) / 255
        x = x_train.astype(np.float64)
        alpha = 1e3  # closed-form ridge in the dual (n < V)
        coef = x.T @ np.linalg.solve(x @ x.T + alpha * np.eye(len(x)), y_train - y_train.mean(0))
        pred = x_test @ coef + y_train.mean(0)
        pixcorr = np.mean([np.corrcoef(p, t)[0, 1] for p, t in zip(pred, y_test, strict=True)])
        out[dtype] = {
            "pixcorr": float(pixcorr),
            "max_abs_beta_diff": float(
                np.abs(subject.betas() - PreparedStore(folder / "store_float32").subject(1).betas()).max()
            ),  # fmt: skip
            "subject_file_mb": round((store_dir / "subj01.hdf5").stat().st_size / 1e6, 2),
        }
    for dtype in ("float16", "int16"):
        out[dtype]["pixcorr_diff_vs_float32"] = out[dtype]["pixcorr"] - out["float32"]["pixcorr"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cache-mb", type=int, default=16, help="betas cache per subject in the 'after' epoch"
    )
    parser.add_argument("--tmp", default=None)
    parser.add_argument("--skip", nargs="*", default=[], choices=["verify", "epoch", "dtypes"])
    parser.add_argument("--child-epoch", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_epoch:
        store, mode, cache_mb = args.child_epoch
        print(json.dumps(epoch(store, mode, int(cache_mb))))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_store_", dir=args.tmp))
    try:
        report: dict = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs "
            "(shared with other engineers' jobs)",
            "sessions": args.sessions,
        }
        build_s, store = _timed(lambda: build_store(tmp / "nsd8", args.sessions))
        report["build_store_s"] = round(build_s, 1)
        if "verify" not in args.skip:
            report["verify"] = bench_verify(store, args.repeats)
        if "epoch" not in args.skip:
            report["epoch"] = bench_epoch(store, args.repeats, args.cache_mb)
        if "dtypes" not in args.skip:
            report["dtypes"] = bench_dtypes(tmp / "dtypes")
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
