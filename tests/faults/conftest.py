"""A tiny world run through the whole pipeline once (in-process CLI), the reference every fault case is
compared with; and helpers that inject faults and classify what happened."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fmrirecon.cli import main

# `fmrirecon world make --subjects 1 --shared 10 --unique 30 --sessions 2 --voxels 300`: seconds per step.
WORLD_ARGS = [
    "--subjects", "1", "--shared", "10", "--unique", "30", "--sessions", "2", "--voxels", "300",
    "--image-size", "32", "--seed", "3", "--no-progress",
]  # fmt: skip


@dataclass
class Pipeline:
    base: Path
    world: Path
    store: Path
    run: Path
    recon: Path
    metrics: Path

    def commands(self, out: Path) -> dict[str, list[str]]:
        """The CLI argument lists of each step, writing under ``out`` (inputs from the reference)."""
        return {
            "world": ["world", "make", "--out", str(out / "world"), *WORLD_ARGS],
            "prepare": [
                "prepare", "nsd", "--root", str(self.world), "--out", str(out / "store"), "--no-progress",
            ],
            "train": [
                "train", "ridge", "--data", str(self.store), "--subject", "1", "--out", str(out / "run"),
                "--config", "world_quick",
            ],
            "reconstruct": [
                "reconstruct", "--run", str(self.run), "--data", str(self.store), "--out", str(out / "recon"),
                "--limit", "4",
            ],
            "evaluate": [
                "evaluate", "--recon", str(self.recon), "--truth", str(self.store), "--out",
                str(out / "metrics.json"),
            ],
        }  # fmt: skip


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Pipeline:
    base = tmp_path_factory.mktemp("faults")
    ref = Pipeline(base, base / "world", base / "store", base / "run", base / "recon", base / "metrics.json")
    commands = ref.commands(base)
    for step in ("world", "prepare", "train", "reconstruct", "evaluate"):
        assert main(commands[step]) == 0, step
    return ref


def run_cli(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fmrirecon", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def damage(path: Path, rng: np.random.Generator, nbytes: int = 64) -> int:
    """XOR ``nbytes`` at a random offset of ``path`` with non-zero random bytes (every byte changes)."""
    size = path.stat().st_size
    offset = int(rng.integers(0, max(1, size - nbytes)))
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(nbytes)
        noise = rng.integers(1, 256, len(old), dtype=np.uint8)
        f.seek(offset)
        f.write((np.frombuffer(old, np.uint8) ^ noise).tobytes())
    return offset


def same(a, b) -> bool:
    """Deep equality of nested dicts / lists / arrays (NaN-aware, exact)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return (
            a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
        )
    return a == b


def record(kind: str, outcome: str, detail: str = "") -> None:
    """Append one fault outcome ('detected' / 'harmless' / 'silent') to $FMRIRECON_FAULT_TABLE, if set
    (the fault table of benchmarks/bench_store.py)."""
    path = os.environ.get("FMRIRECON_FAULT_TABLE")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "outcome": outcome, "detail": detail[:200]}) + "\n")
