"""A method defined in tests/ (toy_method.py) becomes usable by registering one name: it runs through
train → reconstruct → evaluate → report on the CLI and through the demo's method loop, with no shared module
edited (docs/adding-a-method.md)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from test_ridge import write_tiny_store

import fmrirecon.methods as registry
from fmrirecon.cli import main

VOXELS = {1: 40, 2: 37, 3: 33}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_tiny_store(tmp_path_factory.mktemp("toy") / "store", voxels=VOXELS)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "toy", "toy_method")  # the one registry line a method adds


def _train(store, out, *extra):
    return main(["train", "toy", "--data", str(store), "--out", str(out), "--device", "cpu", *extra])


def test_toy_method_through_train_reconstruct_evaluate_report(toy, store, tmp_path):
    pre, run, recon = tmp_path / "pre", tmp_path / "run", tmp_path / "recon"
    assert _train(store, pre, "--stage", "pretrain", "--subjects", "2,3") == 0
    assert _train(store, run, "--subject", "1", "--init-from", str(pre), "ridge=0.5") == 0
    info = json.loads((run / "run.json").read_text())
    assert (info["stage"], info["subjects"], info["init_from"]) == ("target", [1], str(pre.resolve()))
    assert json.loads((pre / "run.json").read_text())["subjects"] == [2, 3]
    assert json.loads((run / "config.json").read_text())["ridge"] == 0.5

    argv = ["reconstruct", "--run", str(run), "--data", str(store), "--out", str(recon), "--device", "cpu"]
    assert main([*argv, "--samples", "2", "--variant", "grid", "--set", "noise=0", "--set", "gain=1.0"]) == 0
    manifest = json.loads((recon / "manifest.json").read_text())
    assert (manifest["method"], manifest["variant"], manifest["settings"]) == (
        "toy", "grid", {"noise": 0.0, "gain": 1.0},
    )  # fmt: skip
    first = np.asarray(Image.open(recon / "images" / f"{manifest['ids'][0]}_0.png"))
    second = np.asarray(Image.open(recon / "images" / f"{manifest['ids'][0]}_1.png"))
    assert first.shape == (32, 32, 3) and np.array_equal(first, second)  # noise 0: samples coincide

    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", "--recon", str(recon), "--truth", str(store), "--out", str(metrics)]) == 0
    result = json.loads(metrics.read_text())["results"][0]
    assert (result["method"], result["subject"], result["variant"]) == ("toy", 1, "grid")
    # the store's betas are a noisy linear code of the 4x4 colour grid the toy decodes (44 training images):
    # reconstructions track the truth far above chance (PixCorr 0; 0.57 measured)
    assert result["metrics"]["pixcorr"] > 0.4

    report = tmp_path / "report.html"
    assert main(["report", str(metrics), str(run), str(pre), "--out", str(report)]) == 0
    html = report.read_text()
    assert "toy" in html and "grid" in html


def test_toy_init_runs_are_checked(toy, store, tmp_path, capsys):
    pre1 = tmp_path / "pre1"
    assert _train(store, pre1, "--stage", "pretrain", "--subjects", "1,3") == 0
    capsys.readouterr()
    # leave-the-target-out: a pretraining run that saw the target subject is refused
    assert _train(store, tmp_path / "a", "--subject", "1", "--init-from", str(pre1)) == 2
    assert "pretrained on subjects [1, 3], which include this run's subject(s) [1]" in capsys.readouterr().err
    # an unfinished run, and a run of another method
    shutil.copytree(pre1, tmp_path / "unfinished")
    (tmp_path / "unfinished" / "done.json").unlink()
    assert _train(store, tmp_path / "b", "--subject", "2", "--init-from", str(tmp_path / "unfinished")) == 2
    assert "has not finished (no done.json)" in capsys.readouterr().err
    run = json.loads((pre1 / "run.json").read_text())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "run.json").write_text(json.dumps({**run, "method": "ridge"}))
    (tmp_path / "other" / "config.json").write_text("{}")
    (tmp_path / "other" / "done.json").write_text("{}")
    assert _train(store, tmp_path / "c", "--subject", "2", "--init-from", str(tmp_path / "other")) == 2
    assert "is a 'ridge' run; a toy run starts only from a toy run" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c"))  # refused before anything is written


def test_toy_method_through_the_demo_method_loop(toy, store, tmp_path):
    from fmrirecon.demo import FULL_WORLD, run_demo

    home = tmp_path / "data"
    shutil.copytree(store, home / FULL_WORLD.store_name)  # the demo reuses a prepared store
    result = run_demo(
        tmp_path / "demo", quick=True, data=home, methods=["toy"], echo=lambda m: None, device="cpu"
    )
    (outcome,) = result.outcomes
    assert not outcome.failed, outcome.skipped_reason
    # quick profile: subject 1 is reconstructed; the toy holds targets out, so it pretrains once on 2 and 3
    assert json.loads((outcome.pretrain_dir / "run.json").read_text())["subjects"] == [2, 3]
    target = json.loads((tmp_path / "demo" / "runs" / "toy" / "subj01" / "run.json").read_text())
    assert target["init_from"] == str(outcome.pretrain_dir.resolve())
    metrics = json.loads(result.metrics.read_text())
    assert sorted(r["variant"] for r in metrics["results"]) == ["flat", "grid"]
    assert re.search(r"toy", result.report.read_text())
