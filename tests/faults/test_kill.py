"""A process killed (SIGKILL) at a random point of each command: the same command run again completes and
its outputs equal the uninterrupted run's; two processes training into one run folder: one proceeds, the
other gets a clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import record, run_cli

from fmrirecon.cli import main
from fmrirecon.data.integrity import lock_run_dir, store_digest, unlock_run_dir

# prepare on the tiny world writes for well under a second after a few seconds of imports: kill it once its
# first output (the hidden temporary store folder) appears, within this many seconds.
AFTER_FIRST_WRITE = {"prepare": 0.6}


def _kill_at_random(args, rng, max_delay, out=None, after_first_write=None):
    """Start ``fmrirecon ARGS``, SIGKILL it after a random delay (counted from the first entry appearing in
    ``out`` when ``after_first_write`` is given); True if it was still running then."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fmrirecon", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    if after_first_write is not None:
        while proc.poll() is None and not any(out.iterdir()):
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0.0, after_first_write)))
    else:
        time.sleep(float(rng.uniform(0.5, max_delay)))
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    return killed


def _files(folder):
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _same_world(a, b):
    from scipy.io import loadmat

    assert _files(a) == _files(b)
    for name in _files(a):
        if name.endswith(".mat"):  # savemat stamps its header with the time; compare the variables
            x, y = loadmat(a / name), loadmat(b / name)
            keys = [k for k in x if not k.startswith("__")]
            assert keys == [k for k in y if not k.startswith("__")]
            assert all(np.array_equal(x[k], y[k]) for k in keys), name
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _outputs_equal(step, pipeline, out):
    if step == "world":
        _same_world(pipeline.world, out / "world")
    elif step == "prepare":
        assert store_digest(out / "store") == store_digest(pipeline.store)
    elif step == "train":
        assert (out / "run" / "ridge.safetensors").read_bytes() == (
            pipeline.run / "ridge.safetensors"
        ).read_bytes()
    elif step == "reconstruct":
        assert _files(out / "recon") == _files(pipeline.recon)
        for name in _files(pipeline.recon):
            if name.endswith(".png"):
                assert (out / "recon" / name).read_bytes() == (pipeline.recon / name).read_bytes()
    elif step == "evaluate":
        got = json.loads((out / "metrics.json").read_text())["results"][0]["metrics"]
        assert got == json.loads(pipeline.metrics.read_text())["results"][0]["metrics"]


def _kill_and_rerun(pipeline, tmp_path, step, seed, max_delay):
    rng = np.random.default_rng(seed)
    out = tmp_path / f"{step}-{seed}"
    out.mkdir()
    args = pipeline.commands(out)[step]
    killed = _kill_at_random(args, rng, max_delay, out, AFTER_FIRST_WRITE.get(step))
    again = run_cli(args)
    assert again.returncode == 0, again.stderr[-2000:]
    _outputs_equal(step, pipeline, out)
    record(f"SIGKILL {step}", "harmless" if killed else "not killed (finished first)")


@pytest.mark.parametrize("step", ["world", "prepare"])
def test_killed_data_commands_rerun_to_the_same_outputs(pipeline, tmp_path, step):
    _kill_and_rerun(pipeline, tmp_path, step, seed=0, max_delay=8.0)


@pytest.mark.slow
@pytest.mark.parametrize("step", ["world", "prepare", "train", "reconstruct", "evaluate"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_killed_commands_rerun_to_the_same_outputs(pipeline, tmp_path, step, seed):
    _kill_and_rerun(pipeline, tmp_path, step, seed=seed, max_delay=25.0)


def test_a_second_training_process_on_the_same_run_dir_gets_a_clear_error(pipeline, tmp_path, capsys):
    out = tmp_path / "shared"
    args = pipeline.commands(out)["train"]
    run_dir = out / "run"
    lock_run_dir(run_dir)  # this process is "training" into run_dir
    try:
        other = run_cli(args)
        assert other.returncode == 2
        assert "being trained by another process" in other.stderr and f"pid {os.getpid()}" in other.stderr
        assert "Traceback" not in other.stderr
        record("two trainings, one run dir", "detected", other.stderr.strip().splitlines()[-1])
    finally:
        unlock_run_dir(run_dir)
    # the first one proceeds and finishes; its lock is released, so a rerun (a resume) is allowed
    assert main(args) == 0
    assert (run_dir / "done.json").is_file()
    assert (run_dir / "ridge.safetensors").read_bytes() == (pipeline.run / "ridge.safetensors").read_bytes()
