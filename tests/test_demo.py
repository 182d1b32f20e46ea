"""`fmrirecon demo` orchestration with fake, fast layer calls: stages in order, skip-with-reason, metrics
merge, report, arguments. The full demo on the real layers is the ``slow`` test at the end."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmrirecon.demo import (
    FULL_WORLD,
    PROFILES,
    QUICK_WORLD,
    DemoStages,
    choose_world,
    resolve_method,
    run_demo,
    with_overrides,
)
from fmrirecon.errors import ConfigError
from fmrirecon.evaluation.metrics import pixcorr
from fmrirecon.io import write_json_atomic
from fmrirecon.methods.base import Capabilities, ReconMethod
from fmrirecon.report.fake import write_fake_report_inputs
from fmrirecon.report.inputs import GroundTruth


class _FakeSubject:
    def __init__(self, ids: list[int], n_voxels: int):
        self.ids = np.array(sorted(ids))
        self.n_voxels = n_voxels

    def averaged(self, split):
        assert split == "test"
        return self.ids, np.arange(len(self.ids) * self.n_voxels, dtype=np.float32).reshape(len(self.ids), -1)


class _FakeStore:
    """Store double: subjects with pairwise-different voxel counts, images from a real stimuli.hdf5."""

    def __init__(self, store_dir: Path, test_ids: dict[int, list[int]]):
        self.path = store_dir
        self.truth = GroundTruth(store_dir)
        self._subjects = {s: _FakeSubject(ids, 10 + s) for s, ids in test_ids.items()}
        self.subjects = sorted(test_ids)

    def subject(self, n):
        return self._subjects[n]

    def images(self, ids):
        return np.stack(self.truth.images(list(ids)))


@dataclass
class _Config:
    noise: float = 30.0


@dataclass
class _Settings:
    pass


def _make_method(
    method_name: str,
    method_variants: tuple[str, ...],
    fail: bool = False,
    stages: tuple[str, ...] = ("target",),
):
    class FakeMethod(ReconMethod):
        """Reconstructs the ground truth plus seeded noise, so metrics are meaningful and deterministic."""

        name = method_name
        Config = _Config
        Settings = _Settings
        capabilities = Capabilities(
            variants=method_variants,
            stages=stages,
            pretrain_holds_out_targets=True,
            retrieval_embeddings=True,
        )

        def __init__(self, config, store=None):
            super().__init__(config)
            self.store = store

        def fit(self, data, run_dir, *, seed=0):
            raise AssertionError("the demo tests train through the fake train stage")

        @classmethod
        def load(cls, run_dir, *, device=None):
            raise AssertionError("not used")

        def brain_embeddings(self, betas):
            return betas[:, :4]

        def image_embeddings(self, images):
            return images.reshape(len(images), -1)[:, :4].astype(np.float32)

        def reconstruct(self, betas, samples, seed, *, variant=None, settings=None):
            if fail:
                raise RuntimeError("diverged <b>badly</b>")
            ids = self.store.subject(self.subject).ids[: len(betas)]
            truth = self.store.images(ids).astype(float)
            rng = np.random.default_rng([seed, len(betas[0]), len(variant)])
            noisy = truth[:, None] + rng.normal(0, self.config.noise, (len(ids), samples, *truth.shape[1:]))
            return np.clip(noisy, 0, 255).astype(np.uint8)

    return FakeMethod


@pytest.fixture
def fake_world(tmp_path):
    fake = write_fake_report_inputs(tmp_path / "fake", subjects={1: 6, 2: 4, 3: 5}, image_size=16)
    return fake


def _stages(fake, calls: list[str], methods: dict[str, type], names: list[str]) -> DemoStages:
    def make_world(world_dir, world, seed):
        assert world_dir.name == world.name
        calls.append(f"world:{world.name}:{seed}")
        return world_dir

    def prepare_store(world_dir, store_dir, world):
        calls.append(f"prepare:{store_dir.name}")
        shutil.copytree(fake.store, store_dir)
        return store_dir

    def load_store(store_dir):
        calls.append(f"load:{store_dir.name}")
        return _FakeStore(fake.store, fake.test_ids)

    def resolve(name):
        if name not in methods:
            raise ConfigError(f"method '{name}' cannot be imported: No module named 'torch_sparse'")
        return methods[name]

    def train(method_cls, config, data, run_dir, seed, device):
        assert str(device) == "cpu"
        if data.stage == "pretrain":
            calls.append(f"train:{method_cls.name}:pretrain:{list(data.subjects)}")
        else:
            init = f":from:{data.init_from.name}" if data.init_from else ""
            calls.append(f"train:{method_cls.name}:{data.subject}{init}")
        subject, store = data.subjects[0], data.store
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", {"noise": config.noise})
        one = subject if data.stage == "target" else None  # as init_run_dir writes it
        write_json_atomic(
            run_dir / "run.json",
            {
                "method": method_cls.name,
                "stage": data.stage,
                "subject": one,
                "subjects": list(data.subjects),
                "seed": seed,
            },
        )
        (run_dir / "pretrain").mkdir(exist_ok=True)
        (run_dir / "pretrain" / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 1.0 / (s + 1)}) + "\n" for s in range(10))
        )
        method = method_cls(config, store)
        method.subject = subject
        return method

    def evaluate(recon_dirs, store_dir, preset, device):
        calls.append(f"evaluate:{preset}:{len(recon_dirs)}")
        results = []
        truth = GroundTruth(fake.store)
        for recon_dir in recon_dirs:
            manifest = json.loads((recon_dir / "manifest.json").read_text())
            from PIL import Image

            recons = np.stack(
                [np.asarray(Image.open(recon_dir / "images" / f"{i}_0.png")) for i in manifest["ids"]]
            )
            truths = np.stack(truth.images(manifest["ids"]))
            results.append(
                {
                    "method": manifest["method"],
                    "subject": manifest["subject"],
                    "variant": manifest["variant"],
                    "n_images": len(manifest["ids"]),
                    "metrics": {"pixcorr": float(pixcorr(recons / 255.0, truths / 255.0).mean())},
                }
            )
        return {"preset": preset, "settings": {}, "versions": {}, "results": results}

    return DemoStages(
        make_world=make_world,
        prepare_store=prepare_store,
        load_store=load_store,
        available_methods=lambda: names,
        resolve_method=resolve,
        method_config=lambda cls, profile: cls.Config(),
        train_method=train,
        evaluate=evaluate,
    )


class _Rows(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.subject, self.srcs = {}, None, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.subject = attrs["data-subject"]
            self.rows[self.subject] = 0
        if tag == "tr" and attrs.get("class") == "image-row":
            self.rows[self.subject] += 1
        if "src" in attrs:
            self.srcs.append(attrs["src"])


def test_demo_runs_stages_skips_unimportable_and_writes_metrics_and_report(fake_world, tmp_path):
    calls, messages = [], []
    methods = {
        "ridge": _make_method("ridge", ("default",)),
        "neuraldiffuser": _make_method(
            "neuraldiffuser", ("guided", "unguided"), stages=("target", "pretrain")
        ),
    }
    stages = _stages(fake_world, calls, methods, ["neuraldiffuser", "mindreader", "ridge"])
    out = tmp_path / "demo"
    result = run_demo(out, data=tmp_path / "data", stages=stages, echo=messages.append, device="cpu")

    # Default profile: 2 subjects; each stage once, in the one-direction order. A method with a pretraining
    # stage that holds the targets out pretrains once, on the store's other subject (3), and both target runs
    # start from that run.
    assert calls == [
        "world:world:0", "prepare:store", "load:store",
        "train:neuraldiffuser:pretrain:[3]",
        "train:neuraldiffuser:1:from:pretrain", "train:neuraldiffuser:2:from:pretrain",
        "train:ridge:1", "train:ridge:2",
        "evaluate:world:6",
    ]  # fmt: skip
    assert result.outcomes[0].pretrain_dir == out / "runs" / "neuraldiffuser" / "pretrain"
    assert result.skipped == [
        {
            "method": "mindreader",
            "reason": "method 'mindreader' cannot be imported: No module named 'torch_sparse'",
        }
    ]
    assert not result.failed

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["preset"] == "world"
    assert metrics["skipped"] == result.skipped
    keys = sorted((r["method"], r["subject"], r["variant"]) for r in metrics["results"])
    assert keys == [
        ("neuraldiffuser", 1, "guided"), ("neuraldiffuser", 1, "unguided"),
        ("neuraldiffuser", 2, "guided"), ("neuraldiffuser", 2, "unguided"),
        ("ridge", 1, "default"), ("ridge", 2, "default"),
    ]  # fmt: skip
    for r in metrics["results"]:
        # Every result points at its recon folder, and the folder holds that method/subject/variant.
        manifest = json.loads((out / r["recon_dir"] / "manifest.json").read_text())
        assert (manifest["method"], manifest["subject"], manifest["variant"]) == (
            r["method"], r["subject"], r["variant"],
        )  # fmt: skip
        assert manifest["ids"] == sorted(fake_world.test_ids[r["subject"]])
        assert manifest["samples"] == PROFILES["default"].samples
        assert len(list((out / r["recon_dir"] / "images").glob("*.png"))) == len(manifest["ids"]) * 2
        assert np.load(out / r["recon_dir"] / "brain_embeddings.npy").shape == (len(manifest["ids"]), 4)
        # Noise sd 30 on 0..255 images keeps reconstructions clearly correlated with the truth.
        assert r["metrics"]["pixcorr"] > 0.5

    html = (out / "report.html").read_text()
    page = _Rows()
    page.feed(html)
    # the pretraining run (several subjects, none reconstructed) has a section of its own: losses, no images
    assert page.rows == {"1": 6, "2": 4, "": 0}
    assert all(src.startswith("data:image/png;base64,") for src in page.srcs)
    assert "torch_sparse" in html and "mindreader" in html
    assert html.count('class="plot loss-plot"') == 5  # four target runs and the pretraining run
    assert any("report:" in m and str((out / "report.html").resolve()) in m for m in messages)
    assert any(m.startswith("[demo] train neuraldiffuser") for m in messages)
    demo_json = json.loads((out / "demo.json").read_text())
    assert demo_json["subjects"] == [1, 2] and demo_json["profile"]["name"] == "default"


def test_quick_profile_uses_one_subject_and_fewer_images(fake_world, tmp_path):
    calls = []
    stages = _stages(fake_world, calls, {"ridge": _make_method("ridge", ("default",))}, ["ridge"])
    result = run_demo(tmp_path / "q", quick=True, data=tmp_path / "data", stages=stages, echo=lambda m: None)
    assert calls == [
        "world:world_quick:0", "prepare:world_quick_store", "load:world_quick_store", "train:ridge:1",
        "evaluate:world:1",
    ]  # fmt: skip
    assert PROFILES["quick"].n_subjects == 1 and PROFILES["quick"].samples == 1
    manifest = json.loads((result.outcomes[0].recon_dirs[0] / "manifest.json").read_text())
    assert manifest["samples"] == 1
    assert len(manifest["ids"]) == min(PROFILES["quick"].max_test_images, len(fake_world.test_ids[1]))


def test_quick_profile_reuses_the_full_store_when_present(fake_world, tmp_path):
    calls = []
    stages = _stages(fake_world, calls, {"ridge": _make_method("ridge", ("default",))}, ["ridge"])
    shutil.copytree(fake_world.store, tmp_path / "data" / "store")
    assert choose_world(tmp_path / "data", PROFILES["quick"]) == FULL_WORLD
    assert choose_world(tmp_path / "elsewhere", PROFILES["quick"]) == QUICK_WORLD
    run_demo(tmp_path / "q", quick=True, data=tmp_path / "data", stages=stages, echo=lambda m: None)
    # The store is there: neither the world nor the store is made again.
    assert calls == ["load:store", "train:ridge:1", "evaluate:world:1"]


def test_failing_method_is_reported_and_others_still_evaluated(fake_world, tmp_path):
    calls = []
    methods = {"ridge": _make_method("ridge", ("default",)), "bad": _make_method("bad", ("x",), fail=True)}
    stages = _stages(fake_world, calls, methods, ["bad", "ridge"])
    result = run_demo(tmp_path / "f", data=tmp_path / "data", stages=stages, echo=lambda m: None)
    assert result.failed
    assert result.skipped == [
        {"method": "bad", "reason": "failed on subj01: RuntimeError: diverged <b>badly</b>"}
    ]
    metrics = json.loads(result.metrics.read_text())
    assert {r["method"] for r in metrics["results"]} == {"ridge"}
    html = result.report.read_text()
    assert "diverged &lt;b&gt;badly&lt;/b&gt;" in html
    # The failed method trained before failing: its losses are still in the report, next to ridge's.
    assert result.outcomes[0].run_dirs == [tmp_path / "f" / "runs" / "bad" / "subj01"]
    assert html.count('class="plot loss-plot"') == 3


def test_same_seed_same_reconstructions_another_seed_other_ones(tmp_path, monkeypatch):
    """Through a real (tiny) method, tests/toy_method.py, whose samples draw seeded noise: the demo's seed
    must reach training and sampling (run operations seed like the CLI)."""
    from test_ridge import write_tiny_store

    import fmrirecon.methods as registry

    monkeypatch.setitem(registry._REGISTRY, "toy", "toy_method")
    write_tiny_store(tmp_path / "d" / FULL_WORLD.store_name, voxels={1: 40, 2: 37, 3: 33})
    skip_metrics = DemoStages(evaluate=lambda dirs, store, preset, device: {"preset": preset, "results": []})

    def pngs(out, seed):
        result = run_demo(out, quick=True, data=tmp_path / "d", methods=["toy"], stages=skip_metrics,
                          echo=lambda m: None, seed=seed, device="cpu")  # fmt: skip
        assert not result.failed, result.skipped
        folder = result.outcomes[0].recon_dirs[0] / "images"
        return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}

    a, b, c = pngs(tmp_path / "a", 3), pngs(tmp_path / "b", 3), pngs(tmp_path / "c", 4)
    assert a.keys() == b.keys() == c.keys() and len(a) > 0
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert sum(not np.array_equal(a[k], c[k]) for k in a) == len(a)  # every image differs under another seed


def test_write_recon_dir_layout_and_checks(tmp_path):
    from fmrirecon.evaluation.io import write_recon_dir
    from fmrirecon.report.inputs import load_recon

    ids = np.array([5, 17, 40])
    images = np.random.default_rng(0).integers(0, 256, (3, 2, 8, 8, 3), dtype=np.uint8)
    recon_dir = write_recon_dir(
        tmp_path / "r", method="ridge", subject=2, variant="default", ids=ids, images=images,
        brain_embeddings=np.ones((3, 4), np.float32), image_embeddings=None, extra={"seed": 1},
    )  # fmt: skip
    recon = load_recon(recon_dir)
    assert (recon.method, recon.subject, recon.variant, recon.ids, recon.samples) == (
        "ridge",
        2,
        "default",
        [5, 17, 40],
        2,
    )
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(recon.images[17][1])), images[1, 1])
    assert np.load(recon_dir / "brain_embeddings.npy").shape == (3, 4)
    assert not (recon_dir / "image_embeddings.npy").exists()
    with pytest.raises(ValueError, match="uint8"):
        write_recon_dir(
            tmp_path / "bad", method="ridge", subject=2, variant="default", ids=ids[:2], images=images,
            brain_embeddings=None, image_embeddings=None, extra={},
        )  # fmt: skip
    assert not (tmp_path / "bad").exists()


def test_resolve_method_turns_import_failures_into_config_errors(tmp_path, monkeypatch):
    import fmrirecon.methods as registry

    (tmp_path / "crashes_on_import.py").write_text("raise RuntimeError('needs a GPU build')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry._REGISTRY, "crashy", "crashes_on_import")
    monkeypatch.setitem(registry._REGISTRY, "missing", "fmrirecon_no_such_module")
    with pytest.raises(ConfigError, match="crashy.*RuntimeError: needs a GPU build"):
        resolve_method("crashy")
    with pytest.raises(ConfigError, match="missing.*cannot be imported"):
        resolve_method("missing")


def test_method_config_layers_world_then_quick_yaml_then_overrides():
    from dataclasses import replace

    from fmrirecon.config import load_config, read_yaml
    from fmrirecon.demo import method_config
    from fmrirecon.methods import get_method

    nd = get_method("neuraldiffuser")
    configs = Path(__file__).resolve().parents[1] / "fmrirecon" / "configs" / "neuraldiffuser"
    world = load_config(nd.Config, configs / "world.yaml")
    assert method_config(nd, PROFILES["default"]) == world
    quick = method_config(nd, PROFILES["quick"])
    quick_yaml = read_yaml(configs / "world_quick.yaml")  # its base (world.yaml) first, then its own keys
    assert quick.model.hidden_dim == quick_yaml["model"]["hidden_dim"] != world.model.hidden_dim
    assert quick.model.projector_dim == world.model.projector_dim  # not restated: world.yaml's value
    assert "projector_dim" not in (configs / "world_quick.yaml").read_text()
    profile = with_overrides(
        PROFILES["quick"], ["neuraldiffuser.reconstruction.num_steps=3", "ridge.reconstruction.num_steps=4"]
    )
    assert profile.method_overrides == {
        "neuraldiffuser": ("reconstruction.num_steps=3",), "ridge": ("reconstruction.num_steps=4",),
    }  # fmt: skip
    assert method_config(nd, profile).reconstruction.num_steps == 3
    with pytest.raises(ConfigError, match="METHOD.key=value"):
        with_overrides(profile, ["num_steps=3"])
    with pytest.raises(ConfigError, match="no_such_key"):
        method_config(nd, replace(profile, method_overrides={"neuraldiffuser": ("no_such_key=1",)}))


def test_cli_arguments_reach_run_demo(monkeypatch, tmp_path, capsys):
    import fmrirecon.demo as demo_module
    from fmrirecon.cli import build_parser, main

    args = build_parser().parse_args(["demo"])
    assert (args.quick, args.out, args.data, args.methods, args.seed) == (
        False,
        Path("fmrirecon_demo"),
        None,
        None,
        0,
    )

    seen = {}

    def fake_run_demo(out, **kwargs):
        seen.update(out=out, **kwargs)
        return demo_module.DemoResult(
            out=out, metrics=out / "metrics.json", report=out / "report.html", outcomes=[], timings={}
        )

    monkeypatch.setattr(demo_module, "run_demo", fake_run_demo)
    code = main(["demo", "--quick", "--out", str(tmp_path / "o"), "--methods", "ridge", "--seed", "5"])
    assert code == 0
    assert seen == {
        "out": tmp_path / "o", "quick": True, "data": None, "methods": ["ridge"], "seed": 5, "overrides": [],
        "device": "auto",
    }  # fmt: skip
    main(["demo", "--out", str(tmp_path / "o"), "--set", "ridge.num_steps=3", "--set", "ridge.strength=0.5"])
    assert seen["overrides"] == ["ridge.num_steps=3", "ridge.strength=0.5"]
    assert str((tmp_path / "o" / "report.html").resolve()) in capsys.readouterr().out


@pytest.mark.slow
def test_quick_demo_end_to_end_on_the_real_layers(tmp_path):
    """The real thing: world, store, every registered method, evaluation, report (``pytest -m slow``)."""
    result = run_demo(tmp_path / "demo", quick=True, data=tmp_path / "data")
    metrics = json.loads(result.metrics.read_text())
    methods = {r["method"] for r in metrics["results"]}
    assert "ridge" in methods
    assert not result.failed, result.skipped
    page = _Rows()
    page.feed(result.report.read_text())
    assert list(page.rows.values())[0] > 0
