"""A full disk (a write raising ENOSPC) in each writer: one clear error from the CLI, nothing half-written
under the final name, no temporary files left behind; the same command then completes."""

from __future__ import annotations

import errno
import json

import pytest
from conftest import record

from fmrirecon.cli import main


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _after(n, real):
    """A stand-in that lets ``n`` calls through to ``real``, then fails with ENOSPC."""
    calls = {"n": 0}

    def write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n:
            _full_disk()
        return real(*args, **kwargs)

    return write


def _entries(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _patch(monkeypatch, step):
    """Make the step's own writer hit a full disk part-way through."""
    if step == "world":
        import nibabel

        monkeypatch.setattr(nibabel, "save", _after(2, nibabel.save))
    elif step == "prepare":
        from fmrirecon.data.integrity import CheckedDatasetWriter

        monkeypatch.setattr(CheckedDatasetWriter, "write", _after(3, CheckedDatasetWriter.write))
    elif step == "train":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", _full_disk)
    elif step == "reconstruct":
        from PIL import Image

        monkeypatch.setattr(Image.Image, "save", _after(2, Image.Image.save))
    elif step == "evaluate":
        from pathlib import Path

        monkeypatch.setattr(Path, "write_text", _full_disk)


@pytest.mark.parametrize("step", ["world", "prepare", "train", "reconstruct", "evaluate"])
def test_full_disk_gives_one_clear_error_and_leaves_nothing_half_written(pipeline, tmp_path, capsys, step):
    out = tmp_path / "out"
    out.mkdir()
    args = pipeline.commands(out)[step]
    with pytest.MonkeyPatch.context() as mp:
        _patch(mp, step)
        code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "no space left on device" in err and "Traceback" not in err
    final = {
        "world": "world",
        "prepare": "store",
        "train": "run",
        "reconstruct": "recon",
        "evaluate": "metrics.json",
    }
    if step == "train":
        # the run was started (config.json, run.json) but holds no weights and is not marked done
        assert _entries(out) == ["run"]
        assert "ridge.safetensors" not in _entries(out / "run") and "done.json" not in _entries(out / "run")
        assert not [n for n in _entries(out / "run") if n.endswith((".tmp", ".safetensors"))]
    else:
        assert _entries(out) == [], f"left behind: {_entries(out)}"
    record(f"ENOSPC {step}", "detected", err.strip().splitlines()[-1])
    # the same command completes once there is space again
    assert main(args) == 0
    assert (out / final[step]).exists()
    if step == "train":
        assert (out / "run" / "ridge.safetensors").read_bytes() == (
            pipeline.run / "ridge.safetensors"
        ).read_bytes()
    if step == "evaluate":
        metrics = json.loads((out / "metrics.json").read_text())["results"][0]["metrics"]
        assert metrics == json.loads(pipeline.metrics.read_text())["results"][0]["metrics"]
