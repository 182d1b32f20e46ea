"""Benchmark `prepare` on real-size NSD sessions against simply loading them with nibabel.

One NSD session is 81 x 104 x 83 voxels x 750 trials int16 (subj01, func1pt8mm; reference §1.3). This script
generates K such sessions (random betas inside a brain mask, zeros outside, an nsdgeneral ROI of 15724 voxels
as subj01's) in a temporary NSD tree, then, each in a fresh process so peak RSS is its own:

- ``load``: ``np.asanyarray(nib.load(path).dataobj)`` of one session (int16, the cheapest full read; for
  HDF5 ``f["betas"][()]`` with h5py);
- ``prepare``: ``prepare_nsd`` of 1 and of K sessions (mask, /300, per-session z-score, HDF5 store).

Targets (issue 2): prepare time per session <= 1.5 x the nibabel load, and peak RSS not growing with the
number of sessions.

Run: ``python benchmarks/bench_prepare.py [--sessions 3] [--formats nifti hdf5] [--tmp DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

GRID = (81, 104, 83)
TRIALS = 750
N_GENERAL = 15724  # subj01 nsdgeneral voxels (reference §1.9)
N_IMAGES = 3000


def generate(root: Path, n_sessions: int, formats: list[str], seed: int = 0) -> None:
    """A minimal real-size NSD tree: one subject, ``n_sessions`` sessions."""
    from fmrirecon.data import nsd

    rng = np.random.default_rng(seed)
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    affine[:3, 3] = -1.8 * (np.array(GRID) - 1) / 2
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in GRID], indexing="ij"), -1)
    centre = (np.array(GRID) - 1) / 2
    radius = np.linalg.norm((ijk - centre) / (np.array(GRID) / 2), axis=-1)
    brain = radius < 0.9
    general = np.zeros(GRID, bool)
    candidates = np.argwhere(brain & (ijk[..., 1] < GRID[1] * 0.45))  # posterior slab, like visual cortex
    chosen = candidates[np.sort(rng.choice(len(candidates), N_GENERAL, replace=False))]
    general[tuple(chosen.T)] = True
    nsd.write_brainmask(root, 1, brain, affine)
    nsd.write_roi(
        root, 1, "nsdgeneral", np.where(general, 1.0, np.where(brain, 0.0, -1.0)), affine, ["nsdgeneral"]
    )

    n_list = N_IMAGES
    masterordering = rng.integers(0, n_list, TRIALS * n_sessions)
    subjectim = rng.permutation(N_IMAGES)[None, :n_list]
    nsd.write_expdesign(root, masterordering + 1, subjectim + 1, subjectim[0, :100] + 1)
    trials = np.zeros((N_IMAGES, 3), np.int64)
    nsd.write_stim_info(
        root, np.arange(N_IMAGES) + 1, ["train2017"] * N_IMAGES, np.arange(N_IMAGES) < 100, {1: trials}
    )
    nsd.write_stimuli(root, rng.integers(0, 256, (N_IMAGES, 8, 8, 3), dtype=np.uint8))
    nsd.write_captions(
        root,
        np.arange(N_IMAGES) + 1,
        ["train2017"] * N_IMAGES,
        [[f"caption {i}"] * 5 for i in range(N_IMAGES)],
        (8, 8),
    )
    brain_ijk = np.argwhere(brain)
    for session in range(1, n_sessions + 1):
        volume = np.zeros((*GRID, TRIALS), np.int16, order="F")
        values = rng.normal(0, 1.5, (len(brain_ijk), TRIALS)).astype(np.float32)
        volume[tuple(brain_ijk.T)] = nsd.psc_to_int16(values)
        for fmt in formats:
            # real NSD chunking for HDF5: (750, 1, 1, 1), uncompressed
            nsd.write_betas_session(root, 1, session, volume, affine, formats=(fmt,), hdf5_chunks="nsd")
        del volume, values


# Peak RSS from the child itself: VmHWM is reset by exec, whereas wait4's ru_maxrss on Linux also counts the
# parent's memory at fork time.
_HWM = """
print("HWM", [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""
_LOAD = (
    """
import sys, time, numpy as np, nibabel as nib
t = time.perf_counter(); data = np.asanyarray(nib.load(sys.argv[1]).dataobj); t = time.perf_counter() - t
print(t, data.dtype, data.shape)
"""
    + _HWM
)
_LOAD_HDF5 = (
    """
import sys, time, h5py
t = time.perf_counter()
with h5py.File(sys.argv[1], "r") as f:
    data = f["betas"][()]
print(time.perf_counter() - t, data.dtype, data.shape)
"""
    + _HWM
)
_PREPARE = (
    """
import sys, time, logging
from fmrirecon.data.prepare import prepare_nsd
t = time.perf_counter()
prepare_nsd(sys.argv[1], sys.argv[2], n_sessions=int(sys.argv[3]), betas_format=sys.argv[4], progress=False)
print(time.perf_counter() - t)
"""
    + _HWM
)


def run_measured(code: str, *args: str) -> tuple[float, float]:
    """(seconds printed by the child, peak RSS of the child in MiB)."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    lines = proc.stdout.splitlines()
    hwm_kib = int(next(line for line in lines if line.startswith("HWM")).split()[1])
    return float(lines[0].split()[0]), hwm_kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--formats", nargs="+", default=["nifti", "hdf5"], choices=["nifti", "hdf5"])
    parser.add_argument("--tmp", default=None, help="scratch folder (default: system temp)")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument(
        "--root", default=None, help="keep the generated NSD tree here and reuse it if present"
    )
    args = parser.parse_args()
    from fmrirecon.data.nsd import NsdPaths

    scratch = Path(tempfile.mkdtemp(prefix="bench_prepare_", dir=args.tmp))
    root = Path(args.root) if args.root else scratch / "nsd"
    results: dict = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "session_shape": [*GRID, TRIALS],
        "n_voxels": N_GENERAL,
        "formats": {},
    }
    try:
        if not (root / "nsddata").is_dir():
            t = time.perf_counter()
            generate(root, args.sessions, args.formats)
            results["generate_s"] = round(time.perf_counter() - t, 1)
            print(f"generated {args.sessions} sessions in {results['generate_s']} s", flush=True)
        for fmt in args.formats:
            session_file = NsdPaths(root).betas(1, 1, fmt)
            entry: dict = {"file_mib": round(session_file.stat().st_size / 2**20, 1)}
            # the baseline: read the whole session once (nibabel for NIfTI, h5py for HDF5)
            entry["load_s"], entry["load_rss_mib"] = run_measured(
                _LOAD if fmt == "nifti" else _LOAD_HDF5, str(session_file)
            )
            for k in sorted({1, args.sessions}):
                store = scratch / f"store_{fmt}_{k}"
                seconds, rss = run_measured(_PREPARE, str(root), str(store), str(k), fmt)
                entry[f"prepare_{k}_s"], entry[f"prepare_{k}_rss_mib"] = seconds, rss
                entry[f"prepare_{k}_s_per_session"] = seconds / k
                shutil.rmtree(store)
            entry["ratio_1"] = entry["prepare_1_s"] / entry["load_s"]
            per_session = entry[f"prepare_{args.sessions}_s_per_session"]
            entry[f"ratio_{args.sessions}_per_session"] = per_session / entry["load_s"]
            results["formats"][fmt] = {
                k: round(v, 3) if isinstance(v, float) else v for k, v in entry.items()
            }
            print(fmt, json.dumps(results["formats"][fmt]), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
