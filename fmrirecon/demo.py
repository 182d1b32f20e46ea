"""`fmrirecon demo`: the whole pipeline on the embedded synthetic world, with no arguments.

Stages (one direction, DESIGN.md): make the synthetic world in the NSD layout (reused if present) → prepare
the store (reused if present) → for every registered method: a pretraining run when the method declares one
and its config wants it (once, on the store's subjects the demo does not reconstruct when the method holds the
targets out), then for every demo subject a target run (started from the pretraining run) and the shared test
images reconstructed in every declared variant → evaluate every reconstruction folder with the ``world``
preset → ``DIR/metrics.json`` (evaluation schema, plus a ``"skipped"`` list) → ``DIR/report.html``.

Every step goes through :mod:`fmrirecon.runs`, the same run operations as ``fmrirecon train`` /
``reconstruct`` / ``evaluate``, so a demo run seeds and writes exactly what the CLI would.

A method whose module cannot be imported is *skipped with its reason* (shown in the report), and a method
that fails while training or reconstructing is reported the same way, so one broken method never hides the
others.

Output folder::

    DIR/runs/<method>/subjXX/               target run dirs (config.json, run.json, <stage>/metrics.jsonl)
    DIR/runs/<method>/pretrain/             the method's pretraining run, when it has one
    DIR/runs/<method>/subjXX/analyses/<a>/  the analyses the method declares (JSON, PNG, NIfTI)
    DIR/recon/<method>/<variant>/subjXX/    reconstruction folders (manifest.json, images/<id73k>_<k>.png)
    DIR/metrics.json  DIR/report.html  DIR/demo.json (profile, timings, skipped)

The calls into the other layers are the fields of :class:`DemoStages`, so tests can swap the expensive ones.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fmrirecon.errors import ConfigError
from fmrirecon.evaluation.io import write_recon_dir  # noqa: F401  (re-exported for older callers)
from fmrirecon.io import library_versions, read_json, write_json_atomic
from fmrirecon.paths import data_home

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("fmrirecon_demo")
EVALUATION_PRESET = "world"


@dataclass(frozen=True)
class WorldSpec:
    """Which synthetic world the demo makes and how it is prepared.

    Attributes:
        name: folder of the NSD-layout world under the data home.
        store_name: folder of its prepared store under the data home.
        params: keyword arguments of :func:`fmrirecon.data.synthetic.write_synthetic_nsd` (empty = its
            defaults, the world ``fmrirecon world make`` writes, so an existing one is reused).
        betas_format: which betas files ``prepare`` reads (``"nifti"`` or ``"hdf5"``).
    """

    name: str
    store_name: str
    params: dict[str, Any] = field(default_factory=dict)
    betas_format: str = "nifti"


# The full world takes minutes to write on 2 cores (4 subjects, NIfTI + HDF5); the quick demo writes one
# subject in HDF5 only, unless the full world's store is already there to reuse.
# FULL_WORLD's folders are the defaults of `fmrirecon world make` and `fmrirecon prepare nsd`.
FULL_WORLD = WorldSpec(name="world", store_name="store")
QUICK_WORLD = WorldSpec(
    name="world_quick",
    store_name="world_quick_store",
    params={"n_subjects": 1, "formats": ("hdf5",)},
    betas_format="hdf5",
)


@dataclass(frozen=True)
class DemoProfile:
    """How much work the demo does. ``default`` fits 20 minutes on 2 CPU cores, ``quick`` 3 minutes.

    Attributes:
        name: ``"default"`` or ``"quick"``.
        world: the world to make when no store is there yet.
        n_subjects: demo subjects (the first ``n_subjects`` of the store).
        samples: reconstructions per test image (K).
        max_test_images: reconstruct only the first n shared test images (73k-id order); None = all.
        report_images: image rows per subject in the report.
        config: the shipped config ``configs/<method>/<config>.yaml`` used where a method ships it (its
            ``base:`` file first), else the method's defaults.
        method_overrides: dotted config overrides per method (on top of the method's world config), e.g. fewer
            training steps for ``quick``.
    """

    name: str
    world: WorldSpec
    n_subjects: int
    samples: int
    max_test_images: int | None
    report_images: int = 12
    config: str = "world"
    method_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)


PROFILES: dict[str, DemoProfile] = {
    "default": DemoProfile(name="default", world=FULL_WORLD, n_subjects=2, samples=2, max_test_images=None),
    "quick": DemoProfile(
        name="quick",
        world=QUICK_WORLD,
        n_subjects=1,
        samples=1,
        max_test_images=16,
        report_images=8,
        config="world_quick",
    ),
}


def with_overrides(profile: DemoProfile, overrides: Sequence[str]) -> DemoProfile:
    """Add ``METHOD.key=value`` overrides (user's, applied last) to the profile's per-method overrides."""
    per_method = {name: list(items) for name, items in profile.method_overrides.items()}
    for item in overrides:
        method, dot, rest = item.partition(".")
        if not dot or "=" not in rest or "=" in method:
            raise ConfigError(
                "demo override must look like METHOD.key=value (e.g. ridge.reconstruction.num_steps=10), "
                f"got {item!r}"
            )
        per_method.setdefault(method, []).append(rest)
    return replace(profile, method_overrides={name: tuple(items) for name, items in per_method.items()})


def choose_world(home: Path, profile: DemoProfile) -> WorldSpec:
    """The profile's world, except that any profile reuses the full world's store when it exists."""
    if (home / FULL_WORLD.store_name / "manifest.json").is_file():
        return FULL_WORLD
    return profile.world


@dataclass
class MethodOutcome:
    """What happened to one method: its run and recon dirs, or why it was skipped."""

    method: str
    run_dirs: list[Path] = field(default_factory=list)
    pretrain_dir: Path | None = None
    recon_dirs: list[Path] = field(default_factory=list)
    skipped_reason: str | None = None
    failed: bool = False


@dataclass
class DemoResult:
    out: Path
    metrics: Path
    report: Path
    outcomes: list[MethodOutcome]
    timings: dict[str, float]

    @property
    def skipped(self) -> list[dict[str, str]]:
        return [{"method": o.method, "reason": o.skipped_reason} for o in self.outcomes if o.skipped_reason]

    @property
    def failed(self) -> bool:
        return any(o.failed for o in self.outcomes)


# ------------------------------------------------------------------------------------------------------------
# Stage implementations calling the other layers (replaceable in tests through DemoStages)
# ------------------------------------------------------------------------------------------------------------


def make_world(world_dir: Path, world: WorldSpec, seed: int) -> Path:
    """Write the synthetic world in the NSD layout under ``world_dir``; a no-op if that world is there."""
    from fmrirecon.data.synthetic import write_synthetic_nsd

    return write_synthetic_nsd(world_dir, seed=seed, **world.params)


def prepare_store(world_dir: Path, store_dir: Path, world: WorldSpec) -> Path:
    """Prepare the world into a store under ``store_dir``; a no-op if the same store is there."""
    from fmrirecon.data.prepare import prepare_nsd

    return prepare_nsd(world_dir, store_dir, betas_format=world.betas_format)


def load_store(store_dir: Path):
    from fmrirecon.data.store import PreparedStore

    return PreparedStore(store_dir)


def resolve_method(name: str) -> type:
    """The method's class; any failure to import it becomes a :class:`ConfigError` carrying the reason."""
    from fmrirecon.methods import get_method

    try:
        return get_method(name)
    except ConfigError:
        raise
    except Exception as err:  # a method module that crashes on import must not stop the demo
        raise ConfigError(f"method '{name}' failed to import: {type(err).__name__}: {err}") from err


def method_config(method_cls: type, profile: DemoProfile) -> Any:
    """Method defaults ← the profile's shipped ``configs/<method>/<config>.yaml`` (when the method ships it)
    ← the profile's dotted overrides."""
    from fmrirecon.runs import CONFIG_DIR
    from fmrirecon.runs import method_config as resolve

    shipped = CONFIG_DIR / method_cls.name / f"{profile.config}.yaml"
    overrides = list(profile.method_overrides.get(method_cls.name, ()))
    return resolve(method_cls, shipped if shipped.is_file() else None, overrides)


def train_method(method_cls: type, config: Any, data, run_dir: Path, seed: int, device="cpu"):
    """:func:`fmrirecon.runs.train_run` into a fresh ``run_dir`` (the demo owns its run dirs: a rerun, maybe
    with the other profile, trains afresh instead of refusing a run dir that holds another config)."""
    from fmrirecon.runs import train_run

    return train_run(method_cls, config, data, run_dir, seed=seed, device=device, fresh=True)


def reconstruct_test_set(
    method, store, store_dir: Path, subject: int, recon_root: Path, profile: DemoProfile, seed: int
) -> list[Path]:
    """Reconstruct the subject's repeat-averaged shared test images, one folder per declared variant
    (:func:`fmrirecon.runs.reconstruct_run`)."""
    from fmrirecon.runs import reconstruct_run

    return [
        reconstruct_run(
            method,
            store,
            subject,
            recon_root / variant / f"subj{subject:02d}",
            split="test",
            limit=profile.max_test_images,
            samples=profile.samples,
            seed=seed,
            variant=variant,
        )
        for variant in method.variants()
    ]


def evaluate(recon_dirs: list[Path], store_dir: Path, preset: str, device="cpu") -> dict[str, Any]:
    from fmrirecon.runs import evaluate_runs

    return evaluate_runs(recon_dirs, store_dir, preset, device=device)


def analyze(name: str, run_dir: Path, store_dir: Path, device="cpu") -> Path:
    """:func:`fmrirecon.runs.analyze_run` into ``RUN/analyses/<name>``."""
    from fmrirecon.runs import analyze_run

    return analyze_run(name, run_dir, store_dir, device=device)


def available_methods() -> list[str]:
    from fmrirecon.methods import available_methods as registry

    return registry()


@dataclass
class DemoStages:
    """The calls the demo makes into the other layers, one per stage (defaults: the real ones)."""

    make_world: Callable[[Path, WorldSpec, int], Path] = make_world
    prepare_store: Callable[[Path, Path, WorldSpec], Path] = prepare_store
    load_store: Callable[[Path], Any] = load_store
    available_methods: Callable[[], list[str]] = available_methods
    resolve_method: Callable[[str], type] = resolve_method
    method_config: Callable[[type, DemoProfile], Any] = method_config
    train_method: Callable[..., Any] = train_method
    reconstruct_test_set: Callable[..., list[Path]] = reconstruct_test_set
    evaluate: Callable[..., dict[str, Any]] = evaluate
    analyze: Callable[..., Path] = analyze


# ------------------------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------------------------


def _relink_results(evaluation: dict[str, Any], recon_dirs: list[Path], out: Path) -> dict[str, Any]:
    """Add the ``"recon_dir"`` the report needs (relative to ``out``) to results that lack it."""
    by_key = {}
    for recon_dir in recon_dirs:
        manifest = read_json(recon_dir / "manifest.json")
        by_key[(manifest["method"], int(manifest["subject"]), manifest.get("variant"))] = recon_dir
    for result in evaluation.get("results", []):
        if "recon_dir" in result:
            continue
        recon_dir = by_key.get((result["method"], int(result["subject"]), result.get("variant")))
        if recon_dir is not None:
            result["recon_dir"] = os.path.relpath(recon_dir.resolve(), out.resolve())
    return evaluation


def run_demo(
    out: str | os.PathLike = DEFAULT_OUT,
    *,
    quick: bool = False,
    data: str | os.PathLike | None = None,
    methods: Sequence[str] | None = None,
    seed: int = 0,
    overrides: Sequence[str] = (),
    device: str = "auto",
    stages: DemoStages | None = None,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo end to end; see the module docstring for the stages and the output folder.

    Args:
        out: output folder (``./fmrirecon_demo`` by default).
        quick: the 3-minute profile (1 subject, fewer test images, samples and steps).
        data: data home holding the world (``world/``, NSD layout) and its store (``store/``), the folders
            ``fmrirecon world make`` / ``prepare nsd`` use; the quick profile makes a one-subject
            ``world_quick/`` unless ``store/`` exists. Default :func:`data_home`.
        methods: method names to run; default every registered method.
        seed: one seed for the world, training and sampling (same seed → same outputs).
        overrides: ``METHOD.key=value`` config overrides applied after the profile's, e.g.
            ``"ridge.reconstruction.num_steps=5"``.
        device: ``auto`` / ``cpu`` / ``cuda[:N]`` for training, reconstruction and evaluation.
        stages: replacements for the layer calls (tests).
        echo: where per-stage progress messages go.
    """
    from fmrirecon.device import resolve_device
    from fmrirecon.methods.base import PRETRAIN, RunData
    from fmrirecon.runs import report_runs

    device = resolve_device(device)
    stages = stages or DemoStages()
    profile = with_overrides(PROFILES["quick" if quick else "default"], overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    home = data_home(data)
    world = choose_world(home, profile)
    world_dir, store_dir = home / world.name, home / world.store_name
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def stage(name: str, message: str) -> float:
        echo(f"[demo] {name}: {message}")
        return time.perf_counter()

    if (store_dir / "manifest.json").is_file():
        # A prepared store is all the later stages read; the world it came from is not needed again.
        t = stage("prepare", f"reusing the prepared store at {store_dir}")
    else:
        t = stage("world", f"synthetic world in NSD layout at {world_dir} (reused if present)")
        world_dir = Path(stages.make_world(world_dir, world, seed))
        timings["world"] = time.perf_counter() - t
        t = stage("prepare", f"preparing the store at {store_dir}")
        store_dir = Path(stages.prepare_store(world_dir, store_dir, world))
    store = stages.load_store(store_dir)
    subjects = list(store.subjects)[: profile.n_subjects]
    if not subjects:
        raise ConfigError(f"the store at {store_dir} holds no subjects; delete it and run the demo again")
    timings["prepare"] = time.perf_counter() - t

    names = list(methods) if methods is not None else stages.available_methods()
    outcomes: list[MethodOutcome] = []
    for name in names:
        outcome = MethodOutcome(method=name)
        outcomes.append(outcome)
        try:
            method_cls = stages.resolve_method(name)
            config = stages.method_config(method_cls, profile)
        except ConfigError as err:
            outcome.skipped_reason = str(err)
            echo(f"[demo] {name}: skipped — {err}")
            continue
        init_from = None
        if PRETRAIN in method_cls.capabilities.stages and method_cls(config).uses_pretraining():
            # One pretraining run per held-out subject set, reused by every target run (DESIGN.md "Runs").
            held_out = subjects if method_cls.capabilities.pretrain_holds_out_targets else []
            others = [s for s in store.subjects if s not in held_out]
            run_dir = out / "runs" / name / PRETRAIN
            t = stage(f"pretrain {name}", f"subjects {others} → {run_dir}")
            try:
                if not others:
                    raise ConfigError(
                        f"{name} pretrains on subjects other than {held_out}, but the store holds only "
                        f"{list(store.subjects)}; set {name}.training.pretrain=false or use a larger world"
                    )
                stages.train_method(
                    method_cls, config, RunData([store], others, PRETRAIN), run_dir, seed, device
                )
                timings[f"train/{name}/{PRETRAIN}"] = time.perf_counter() - t
                outcome.pretrain_dir = init_from = run_dir
                outcome.run_dirs.append(run_dir)
            except Exception as err:  # one broken method must not hide the others' results
                logger.debug("demo: %s failed\n%s", name, traceback.format_exc())
                outcome.failed = True
                outcome.skipped_reason = f"failed while pretraining: {type(err).__name__}: {err}"
                echo(f"[demo] {name}: FAILED — {outcome.skipped_reason}")
                continue
        for subject in subjects:
            run_dir = out / "runs" / name / f"subj{subject:02d}"
            t = stage(f"train {name}", f"subj{subject:02d} → {run_dir}")
            try:
                data = RunData([store], [subject], init_from=init_from)
                method = stages.train_method(method_cls, config, data, run_dir, seed, device)
                timings[f"train/{name}/subj{subject:02d}"] = time.perf_counter() - t
                outcome.run_dirs.append(run_dir)
                t = stage(
                    f"reconstruct {name}", f"subj{subject:02d} test images, {profile.samples} sample(s)"
                )
                outcome.recon_dirs += stages.reconstruct_test_set(
                    method, store, store_dir, subject, out / "recon" / name, profile, seed
                )
                timings[f"reconstruct/{name}/subj{subject:02d}"] = time.perf_counter() - t
                for (
                    analysis
                ) in method_cls.capabilities.analyses:  # written next to the run: the report shows it
                    t = stage(f"analyze {name}", f"{analysis} of subj{subject:02d}")
                    stages.analyze(analysis, run_dir, store_dir, device)
                    timings[f"analyze/{name}/{analysis}/subj{subject:02d}"] = time.perf_counter() - t
            except Exception as err:  # one broken method must not hide the others' results
                logger.debug("demo: %s failed\n%s", name, traceback.format_exc())
                outcome.failed = True
                outcome.skipped_reason = f"failed on subj{subject:02d}: {type(err).__name__}: {err}"
                echo(f"[demo] {name}: FAILED — {outcome.skipped_reason}")
                if (run_dir / "run.json").is_file() and run_dir not in outcome.run_dirs:
                    outcome.run_dirs.append(run_dir)  # its losses so far help to see what went wrong
                break

    recon_dirs = [d for o in outcomes if not o.failed for d in o.recon_dirs]
    t = stage("evaluate", f"{len(recon_dirs)} reconstruction folder(s), preset '{EVALUATION_PRESET}'")
    if recon_dirs:
        evaluation = stages.evaluate(recon_dirs, store_dir, EVALUATION_PRESET, device)
        evaluation = _relink_results(dict(evaluation), recon_dirs, out)
    else:
        evaluation = {
            "preset": EVALUATION_PRESET,
            "settings": {},
            "versions": library_versions(),
            "results": [],
        }
    evaluation.setdefault("settings", {}).setdefault("store", str(store_dir.resolve()))
    result = DemoResult(
        out=out, metrics=out / "metrics.json", report=out / "report.html", outcomes=outcomes, timings=timings
    )
    evaluation["skipped"] = result.skipped
    write_json_atomic(result.metrics, evaluation)
    timings["evaluate"] = time.perf_counter() - t

    t = stage("report", f"{result.report}")
    run_dirs = [d for o in outcomes for d in o.run_dirs]
    report_runs(
        [result.metrics, *run_dirs],
        result.report,
        truth=store_dir,
        max_images=profile.report_images,
        title=f"fmrirecon demo ({profile.name})",
    )
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    write_json_atomic(
        out / "demo.json",
        {
            "profile": asdict(profile),
            "seed": seed,
            "device": str(device),
            "data": {"world": str(world_dir), "store": str(store_dir)},
            "subjects": subjects,
            "methods": names,
            "skipped": result.skipped,
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "versions": library_versions(),
        },
    )
    echo(f"[demo] done in {timings['total']:.0f} s — report: {result.report.resolve()}")
    return result
