"""`fmrirecon train` / `fmrirecon reconstruct` end to end on a tiny store and a tiny random backbone."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from test_ridge import write_tiny_store

from fmrirecon.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fmrirecon.backbones.world.models import tiny_latent_diffusion

    root = tmp_path_factory.mktemp("cli")
    backbone = root / "tiny_ld"
    tiny_latent_diffusion(seed=0).save_pretrained(backbone)
    store = write_tiny_store(root / "store", voxels={1: 40, 2: 37})
    other_store = write_tiny_store(root / "other_store", voxels={1: 40}, seed=1)
    overrides = ["alphas=[1, 10, 100]", "cv_folds=3", f"backbone={backbone}", "num_steps=3", "strength=0.5"]
    run = root / "run"
    argv = ["train", "ridge", "--data", str(store), "--subject", "1", "--out", str(run), "--seed", "2"]
    assert main(argv + overrides) == 0
    return dict(root=root, store=store, other=other_store, run=run, argv=argv, overrides=overrides)


def test_train_writes_resolved_config_and_run_provenance(setup):
    run = setup["run"]
    config = json.loads((run / "config.json").read_text())
    assert config["alphas"] == [1.0, 10.0, 100.0] and config["cv_folds"] == 3 and config["strength"] == 0.5
    assert config["guidance_scale"] == 7.5  # untouched keys keep the defaults
    info = json.loads((run / "run.json").read_text())
    assert info["method"] == "ridge" and info["subject"] == 1 and info["seed"] == 2
    assert info["store"] == str(setup["store"].resolve()) and len(info["store_fingerprint"]) == 16
    assert {"torch", "himalaya", "fmrirecon"} <= set(info["versions"])
    assert (run / "ridge.safetensors").is_file()
    # the same command again is accepted (same run)
    assert main(setup["argv"] + setup["overrides"]) == 0


def test_reconstruct_writes_the_recon_folder_deterministically(setup):
    outs = [setup["root"] / f"recon{i}" for i in range(2)]
    for out in outs:
        argv = ["reconstruct", "--run", str(setup["run"]), "--data", str(setup["store"]), "--out", str(out)]
        assert main(argv + ["--samples", "2", "--limit", "3", "--seed", "5"]) == 0
    manifest = json.loads((outs[0] / "manifest.json").read_text())
    assert manifest["method"] == "ridge" and manifest["subject"] == 1 and manifest["variant"] == "img2img"
    assert manifest["samples"] == 2 and len(manifest["ids"]) == 3
    assert manifest["ids"] == sorted(manifest["ids"])
    names = sorted(p.name for p in (outs[0] / "images").iterdir())
    assert names == sorted(f"{i}_{k}.png" for i in manifest["ids"] for k in range(2))
    for name in names:
        a, b = (np.asarray(Image.open(out / "images" / name)) for out in outs)
        assert a.shape == (32, 32, 3) and np.array_equal(a, b)
    assert not (outs[0] / "brain_embeddings.npy").exists()  # the ridge baseline has no retrieval embeddings


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a, o: (a, o[:-1] + ["strength=0.6"]), r"different config \(strength: 0\.5 -> 0\.6\)"),
        (lambda a, o: (a[:5] + ["2"] + a[6:], o), r"started for subject 1, asked for subject 2"),
        (lambda a, o: (a[:-1] + ["3"], o), r"started with seed 2, got seed 3"),
        (lambda a, o: (["train", "ridgee"] + a[2:], o), r"unknown method 'ridgee'"),
        (lambda a, o: (a, o + ["alpha=3"]), r"unknown config key 'alpha' for RidgeConfig"),
        (lambda a, o: (a, o + ["cv_folds=three"]), r"'cv_folds' expects int, got 'three' \(str\)"),
        (lambda a, o: (a, o + ["--config", "nope"]), r"neither a file nor a shipped config of ridge"),
    ],
)
def test_train_rejects_a_different_run_or_bad_config(setup, capsys, change, message):
    argv, overrides = change(list(setup["argv"]), list(setup["overrides"]))
    assert main(argv + overrides) == 2
    assert re.search(message, capsys.readouterr().err)


def test_train_into_a_run_of_another_store_is_refused(setup, capsys):
    argv = list(setup["argv"])
    argv[3] = str(setup["other"])
    assert main(argv + setup["overrides"]) == 2
    assert "was started on store" in capsys.readouterr().err


def test_reconstruct_with_another_store_is_refused(setup, capsys):
    argv = ["reconstruct", "--run", str(setup["run"]), "--data", str(setup["other"]), "--out", "unused"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "was trained on store" in err and str(setup["store"].resolve()) in err


def test_reconstruct_of_a_folder_that_is_not_a_run(setup, capsys):
    argv = ["reconstruct", "--run", str(setup["root"]), "--data", str(setup["store"]), "--out", "unused"]
    assert main(argv) == 2
    assert "is not a fmrirecon run dir" in capsys.readouterr().err


def test_select_best_needs_a_method_with_second_order_selection(setup):
    argv = ["reconstruct", "--run", str(setup["run"]), "--data", str(setup["store"]), "--out", "unused"]
    with pytest.raises(SystemExit, match="ridge has no second-order selection"):
        main(argv + ["--samples", "2", "--select-best"])
