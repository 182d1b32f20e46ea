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
    overrides = [
        "alphas=[1, 10, 100]", "cv_folds=3", f"backbone={backbone}", "reconstruction.num_steps=3",
        "reconstruction.strength=0.5",
    ]  # fmt: skip
    run = root / "run"
    argv = ["train", "ridge", "--data", str(store), "--subject", "1", "--out", str(run), "--seed", "2"]
    assert main(argv + overrides) == 0
    return dict(root=root, store=store, other=other_store, run=run, argv=argv, overrides=overrides)


def test_train_writes_resolved_config_and_run_provenance(setup):
    run = setup["run"]
    config = json.loads((run / "config.json").read_text())
    assert config["alphas"] == [1.0, 10.0, 100.0] and config["cv_folds"] == 3
    assert config["reconstruction"]["strength"] == 0.5
    assert config["reconstruction"]["cfg_scale"] == 7.5  # untouched keys keep the defaults
    info = json.loads((run / "run.json").read_text())
    assert info["method"] == "ridge" and info["subject"] == 1 and info["seed"] == 2
    assert info["stage"] == "target" and info["subjects"] == [1] and info["init_from"] is None
    assert json.loads((run / "done.json").read_text())["finished"] is True
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
        (
            lambda a, o: (a, o[:-1] + ["reconstruction.strength=0.6"]),
            r"different config \(reconstruction\.strength: 0\.5 -> 0\.6\)",
        ),
        (lambda a, o: (a[:5] + ["2"] + a[6:], o), r"started for subjects \[1\], asked for subjects \[2\]"),
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


def _reconstruct_argv(setup, out, *extra):
    return [
        "reconstruct",
        "--run",
        str(setup["run"]),
        "--data",
        str(setup["store"]),
        "--out",
        str(out),
        *extra,
    ]


def test_reconstruct_set_changes_a_setting_and_is_recorded(setup):
    base, changed = setup["root"] / "set_base", setup["root"] / "set_steps"
    assert main(_reconstruct_argv(setup, base, "--limit", "2", "--device", "cpu")) == 0
    assert (
        main(
            _reconstruct_argv(setup, changed, "--limit", "2", "--set", "cfg_scale=1.0", "--set", "strength=1")
        )
        == 0
    )
    settings = json.loads((changed / "manifest.json").read_text())["settings"]
    assert settings["cfg_scale"] == 1.0 and settings["strength"] == 1.0 and settings["num_steps"] == 3
    assert json.loads((base / "manifest.json").read_text())["settings"]["cfg_scale"] == 7.5
    a, b = (
        np.asarray(Image.open(d / "images" / sorted(p.name for p in (d / "images").iterdir())[0]))
        for d in (base, changed)
    )
    assert not np.array_equal(a, b)  # another setting, another image


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("num_step=3", r"unknown config key 'num_step' for RidgeReconstruction"),
        ("cfg_scale=high", r"'cfg_scale' expects float, got 'high' \(str\)"),
        ("precision=float64", r"'precision' expects 'float32' \| 'bfloat16' \| 'float16'"),
    ],
)
def test_reconstruct_set_refuses_unknown_keys_and_wrong_types_in_one_message(setup, capsys, setting, message):
    assert main(_reconstruct_argv(setup, setup["root"] / "unused", "--set", setting)) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and len(err.splitlines()) == 1
    # the allowed keys with their types are named in the same message
    assert "num_steps (int), cfg_scale (float)" in err and "batch_size (int)" in err


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the message on a machine without GPU"
)
@pytest.mark.parametrize("command", ["train", "reconstruct", "evaluate", "analyze", "demo"])
def test_device_cuda_without_a_gpu_is_a_clear_error_not_a_cpu_fallback(setup, capsys, command):
    argv = {
        "train": setup["argv"] + setup["overrides"],
        "reconstruct": _reconstruct_argv(setup, setup["root"] / "unused"),
        "evaluate": ["evaluate", "--recon", str(setup["root"]), "--truth", str(setup["store"])],
        "analyze": ["analyze", "encoding_map", "--run", str(setup["run"]), "--data", str(setup["store"])],
        "demo": ["demo", "--quick", "--out", str(setup["root"] / "demo"), "--data", str(setup["root"] / "d")],
    }[command]
    assert main(argv + ["--device", "cuda:0"]) == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err
    assert main(argv + ["--device", "tpu"]) == 2
    assert "--device expects auto, cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stage", "pretrain"], r"ridge has no stage 'pretrain'; its stages are \['target'\]"),
        (["--init-from", "."], r"ridge has no pretraining stage"),
    ],
)
def test_train_refuses_stages_and_init_runs_the_method_does_not_declare(setup, capsys, extra, message):
    argv = list(setup["argv"])
    argv[argv.index("--out") + 1] = str(setup["root"] / "other_run")
    assert main(argv + setup["overrides"] + extra) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (setup["root"] / "other_run").exists()  # refused before anything is written


def test_train_subjects_for_a_one_subject_stage_is_refused(setup, capsys):
    argv = [
        "train",
        "ridge",
        "--data",
        str(setup["store"]),
        "--subjects",
        "1,2",
        "--out",
        str(setup["root"] / "x"),
    ]
    assert main(argv + setup["overrides"]) == 2
    assert "ridge's target stage fits one subject, got subjects [1, 2]" in capsys.readouterr().err
