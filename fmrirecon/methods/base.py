"""The interface every reconstruction method implements (method interface v2), and the run-dir bookkeeping.

A method is a :class:`ReconMethod` subclass in its own folder, registered by one line in
:mod:`fmrirecon.methods`. It declares:

- ``Config``: a dataclass whose defaults are the paper's values, with a ``reconstruction`` section
  (``Settings``, another dataclass) that :meth:`ReconMethod.reconstruct` takes (``--set key=value``);
- ``capabilities``: a :class:`Capabilities` (variants, training stages, second-order selection, retrieval
  embeddings, analyses) that the CLI, the demo and the report read instead of method names.

A **run** is one training stage of one method on named data, a :class:`RunData` (one or more prepared
stores, one or more subjects, a stage, optionally the run it starts from)::

    fmrirecon train neuraldiffuser --stage pretrain --subjects 2,3,4 --data STORE --out PRE
    fmrirecon train neuraldiffuser --subject 1 --init-from PRE --data STORE --out RUN

``fmrirecon train`` and the demo go through :mod:`fmrirecon.runs`: :func:`init_run_dir` (``RUN/config.json``
+ ``RUN/run.json``, or a check that an existing run dir is the same run), then ``method.fit(data, run_dir,
seed=seed)``, then ``RUN/done.json``; ``fmrirecon reconstruct`` calls ``Method.load(run_dir, device=...)`` and
``method.reconstruct(betas, samples, seed, variant=..., settings=...)``. See ``docs/adding-a-method.md``.
"""

from __future__ import annotations

import abc
import hashlib
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

import numpy as np

from fmrirecon.config import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    diff_configs,
    load_config,
    type_name,
)
from fmrirecon.data.integrity import (
    check_run_files,
    lock_run_dir,
    seal_run_files,
    store_digest,
    unlock_run_dir,
)
from fmrirecon.errors import ConfigError, CorruptFileError, DatasetLayoutError, SubjectMismatchError
from fmrirecon.io import library_versions, read_json, write_json_atomic

__all__ = [
    "PRETRAIN",
    "TARGET",
    "Capabilities",
    "ReconMethod",
    "RunData",
    "check_init_run",
    "check_run_store",
    "init_run_dir",
    "mark_done",
    "read_run",
    "store_fingerprint",
]

# Stage names: ``target`` fits the subject whose images are reconstructed; ``pretrain`` is a run of its own
# (other subjects, other stores) that target runs start from with ``init_from``.
TARGET = "target"
PRETRAIN = "pretrain"


@dataclass(frozen=True)
class Capabilities:
    """What a method offers beyond ``fit`` / ``load`` / ``reconstruct``; read by the CLI, demo and report.

    Attributes:
        variants: named reconstruction variants; the first is the default.
        stages: training stages the method accepts (``"target"``, ``"pretrain"``).
        pretrain_holds_out_targets: a pretraining run must not include the target subjects (NeuralDiffuser's
            leave-the-target-out pretraining, §4.2.3). The demo then pretrains once on the store's subjects
            that it does not reconstruct and starts every target run from that run.
        multi_subject_target: a target run may fit several subjects at once.
        second_order_selection: :meth:`ReconMethod.select_best` keeps the best of K samples.
        retrieval_embeddings: :meth:`ReconMethod.brain_embeddings` / ``image_embeddings`` share a space.
        analyses: names in :mod:`fmrirecon.analysis` meant for this method's runs (besides the generic ones).
        baseline: the method is a baseline: the report's paired table compares the other methods with it.
    """

    variants: tuple[str, ...] = ("default",)
    stages: tuple[str, ...] = (TARGET,)
    pretrain_holds_out_targets: bool = False
    multi_subject_target: bool = False
    second_order_selection: bool = False
    retrieval_embeddings: bool = False
    analyses: tuple[str, ...] = ()
    baseline: bool = False


class RunData:
    """The data a training run names: prepared stores, subjects, stage, and the run it starts from.

    Args:
        stores: one or more prepared stores (``PreparedStore`` objects or folders); the first is the primary
            store (the one whose subjects the run fits and reconstruction reads).
        subjects: 1-based subject numbers in the primary store.
        stage: one of the method's ``capabilities.stages``.
        init_from: a finished run this run starts from (e.g. a ``pretrain`` run), or None.
    """

    def __init__(self, stores, subjects, stage: str = TARGET, init_from: str | os.PathLike | None = None):
        from fmrirecon.data.store import PreparedStore

        if isinstance(stores, str | os.PathLike | PreparedStore):
            stores = [stores]
        # folders are opened; store objects (PreparedStore or a test double) are kept as they are
        self.stores = tuple(PreparedStore(s) if isinstance(s, str | os.PathLike) else s for s in stores)
        if not self.stores:
            raise ConfigError("a run needs at least one prepared store")
        subjects = [subjects] if isinstance(subjects, int | np.integer) else list(subjects)
        self.subjects = tuple(int(s) for s in subjects)
        if not self.subjects:
            raise ConfigError("a run needs at least one subject")
        if len(set(self.subjects)) != len(self.subjects):
            raise ConfigError(f"subjects repeat: {list(self.subjects)}")
        self.stage = str(stage)
        self.init_from = Path(init_from) if init_from is not None else None

    @classmethod
    def target(cls, store, subject: int, init_from: str | os.PathLike | None = None) -> RunData:
        """The common case: one store, one target subject."""
        return cls([store], [subject], TARGET, init_from)

    @property
    def store(self):
        """The primary store."""
        return self.stores[0]

    @property
    def subject(self) -> int:
        """The one subject of a single-subject run."""
        if len(self.subjects) != 1:
            raise ConfigError(f"this {self.stage} run names subjects {list(self.subjects)}; one was expected")
        return self.subjects[0]

    def describe(self) -> dict[str, Any]:
        """JSON-able provenance: stage, subjects, stores (path + fingerprint), init run."""
        return {
            "stage": self.stage,
            "subjects": list(self.subjects),
            "stores": [
                {
                    "path": str(Path(s.path).resolve()),
                    "fingerprint": store_fingerprint(s.path),
                    "digest": store_digest(s.path),  # content digest (fmrirecon.data.integrity)
                }
                for s in self.stores
            ],
            "init_from": str(self.init_from.resolve()) if self.init_from is not None else None,
        }

    def __repr__(self) -> str:
        return (
            f"RunData(stores={[str(s.path) for s in self.stores]}, subjects={list(self.subjects)}, "
            f"stage={self.stage!r}, init_from={self.init_from})"
        )


class ReconMethod(abc.ABC):
    """Base class of reconstruction methods.

    Class attributes:
        name: registry name (``fmrirecon train NAME``).
        Config: the method's config dataclass (paper defaults); its ``reconstruction`` field is a
            ``Settings``.
        Settings: the reconstruction-settings dataclass (paper defaults).
        capabilities: a :class:`Capabilities`.

    Attributes:
        config: an instance of ``Config``.
        subject: the subject the method was fitted on (set by ``fit`` / ``load``), or None.
        n_voxels: voxel count the method expects in ``betas``, or None before fitting.
        device: the torch device the method computes on (:meth:`to`).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    Settings: ClassVar[type]
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, config: Any | None = None):
        import torch

        if config is None:
            config = self.Config()
        if not isinstance(config, self.Config):
            raise ConfigError(
                f"{type(self).__name__} expects a {self.Config.__name__} config, got {type(config).__name__}"
            )
        self.config = config
        self.subject: int | None = None
        self.n_voxels: int | None = None
        self.device = torch.device("cpu")

    # --------------------------------------------------------------- interface
    @abc.abstractmethod
    def fit(self, data: RunData, run_dir: str | os.PathLike, *, seed: int = 0) -> None:
        """Train the stage ``data.stage`` on ``data``; save all that ``load`` (or a later run) needs in
        ``run_dir``. Call :meth:`check_run_data` first."""

    @classmethod
    @abc.abstractmethod
    def load(cls, run_dir: str | os.PathLike, *, device=None) -> ReconMethod:
        """Rebuild a fitted method from ``run_dir`` (config.json + safetensors; nothing unpickled)."""

    @abc.abstractmethod
    def reconstruct(
        self,
        betas: np.ndarray,
        samples: int = 1,
        seed: int = 0,
        *,
        variant: str | None = None,
        settings: Any | None = None,
    ) -> np.ndarray:
        """Reconstruct images from betas.

        Args:
            betas: float32 (N, V) repeat-averaged test betas of the fitted subject.
            samples: K images per input.
            seed: same seed → same images.
            variant: one of :meth:`variants` (None = the first).
            settings: a ``Settings`` (None = the config's ``reconstruction`` section).

        Returns:
            uint8 (N, K, H, W, 3).
        """

    def to(self, device) -> ReconMethod:
        """Compute on ``device`` (a ``torch.device`` or its name) from now on."""
        import torch

        self.device = torch.device(device)
        return self

    # ------------------------------------------------------- optional capabilities
    def brain_embeddings(self, betas: np.ndarray) -> np.ndarray | None:
        """(N, V) → (N, D) embeddings for retrieval against :meth:`image_embeddings`, or None."""
        return None

    def image_embeddings(self, images: np.ndarray) -> np.ndarray | None:
        """uint8 (N, H, W, 3) → (N, D) in the space of :meth:`brain_embeddings`, or None."""
        return None

    def select_best(
        self, betas: np.ndarray, recons: np.ndarray, seed: int = 0, settings: Any | None = None
    ) -> np.ndarray:
        """Second-order selection: uint8 ``(N, K, H, W, 3)`` → ``(N, 1, H, W, 3)``."""
        raise ConfigError(f"method {self.name} declares no second-order selection")

    def uses_pretraining(self) -> bool:
        """Whether this config wants a ``pretrain`` run before its target runs (read by the demo)."""
        return PRETRAIN in self.capabilities.stages

    def variants(self) -> list[str]:
        """Named reconstruction variants (``capabilities.variants``); the first is the default."""
        return list(self.capabilities.variants)

    # ----------------------------------------------------------------- helpers
    @classmethod
    def config_from(cls, path: str | os.PathLike | None = None, overrides=()) -> Any:
        """``Config`` defaults ← YAML file ← dotted overrides (see :func:`fmrirecon.config.load_config`)."""
        return load_config(cls.Config, path, overrides)

    @classmethod
    def read_run_config(cls, run_dir: str | os.PathLike) -> Any:
        """The ``Config`` stored in ``RUN/config.json``."""
        info = read_run(run_dir)
        if info["method"] != cls.name:
            raise ConfigError(f"run {run_dir} was trained with method '{info['method']}', not '{cls.name}'")
        return config_from_dict(cls.Config, read_json(Path(run_dir) / "config.json"))

    def default_settings(self) -> Any:
        """The config's ``reconstruction`` section (paper defaults unless the run's config changed them)."""
        settings = getattr(self.config, "reconstruction", None)
        return settings if settings is not None else self.Settings()

    def settings_from(self, overrides=(), base: Any | None = None) -> Any:
        """``base`` (default :meth:`default_settings`) with ``key=value`` overrides (``--set``), validated.

        Raises:
            ConfigError: one message naming the key, the expected type and the allowed keys.
        """
        base = self.default_settings() if base is None else base
        if not overrides:
            return base
        try:
            return apply_overrides(base, overrides)
        except ConfigError as err:
            names = {f.name for f in fields(base)}
            hints = get_type_hints(type(base))
            allowed = ", ".join(f"{n} ({type_name(hints[n])})" for n in hints if n in names)
            raise ConfigError(
                f"--set: {err}; the reconstruction settings of {self.name} are: {allowed}"
            ) from None

    def resolve_settings(self, settings: Any | None) -> Any:
        """``settings`` checked to be a ``Settings``, or the default."""
        if settings is None:
            return self.default_settings()
        if not isinstance(settings, self.Settings):
            raise ConfigError(
                f"{self.name} expects reconstruction settings of type {self.Settings.__name__}, "
                f"got {type(settings).__name__}"
            )
        return settings

    def check_run_data(self, data: RunData) -> None:
        """Check ``data`` against the declared stages and subject rules, and its init run (if any).

        Raises:
            ConfigError: unknown stage, several subjects for a one-subject target, a bad init run.
            SubjectMismatchError: a subject missing from the store, an init run on other data.
        """
        caps = self.capabilities
        if data.stage not in caps.stages:
            raise ConfigError(f"{self.name} has no stage {data.stage!r}; its stages are {list(caps.stages)}")
        if data.stage == TARGET and len(data.subjects) > 1 and not caps.multi_subject_target:
            raise ConfigError(
                f"{self.name}'s target stage fits one subject, got subjects {list(data.subjects)} "
                f"(several subjects: --stage {PRETRAIN}, where the method has it)"
            )
        for subject in data.subjects:
            data.store.subject(subject)  # SubjectMismatchError naming the store's subjects
        if data.init_from is not None:
            if PRETRAIN not in caps.stages:
                raise ConfigError(
                    f"{self.name} has no pretraining stage, so a run cannot start from another run"
                )
            check_init_run(data.init_from, self.name, data, holds_out=caps.pretrain_holds_out_targets)

    def check_betas(self, betas: np.ndarray) -> np.ndarray:
        """Validate (N, V) betas against the fitted voxel count; returns float32."""
        betas = np.asarray(betas, dtype=np.float32)
        if betas.ndim != 2:
            raise ValueError(f"betas must be 2-D (N, V), got shape {betas.shape}")
        if self.n_voxels is not None and betas.shape[1] != self.n_voxels:
            raise SubjectMismatchError(
                f"betas have {betas.shape[1]} voxels but this {self.name} model was fitted on subject "
                f"{self.subject} with {self.n_voxels} voxels — were they prepared for another subject?"
            )
        return betas

    def resolve_variant(self, variant: str | None) -> str:
        names = self.variants()
        if variant is None:
            return names[0]
        if variant not in names:
            raise ConfigError(f"unknown variant '{variant}' for method {self.name}; expected one of {names}")
        return variant


# ------------------------------------------------------------------- run dirs
def store_fingerprint(store_path: str | os.PathLike) -> str:
    """sha256 over the store's manifest.json and the names and sizes of its HDF5 files (cheap,
    copy-stable)."""
    store_path = Path(store_path)
    manifest = store_path / "manifest.json"
    if not manifest.is_file():
        raise DatasetLayoutError(
            f"{store_path} is not a prepared store: expected {manifest} (run fmrirecon prepare)"
        )
    h = hashlib.sha256(manifest.read_bytes())
    for p in sorted(store_path.glob("*.hdf5")):
        h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


def init_run_dir(
    run_dir: str | os.PathLike,
    *,
    method: str,
    config: Any,
    seed: int,
    data: RunData | None = None,
    subject: int | None = None,
    store_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write ``RUN/config.json`` + ``RUN/run.json``, or check that an existing run dir is the same run.

    The run is named by ``data`` (or, for one store and one target subject, ``subject`` + ``store_path``).
    ``run.json``: ``method, stage, subjects, stores`` (path + fingerprint each), ``init_from``, ``seed``,
    ``versions``, and for the primary store ``store`` / ``store_fingerprint``; ``subject`` is the subject of
    a single-subject run, else None.

    Raises:
        SubjectMismatchError: the run dir holds a run of other subjects or other stores.
        ConfigError: the run dir holds another method, stage, seed, init run or config.
    """
    if data is None:
        if subject is None or store_path is None:
            raise TypeError("init_run_dir needs data=RunData(...), or subject= and store_path=")
        data = RunData.target(store_path, subject)
    run_dir = Path(run_dir)
    lock_run_dir(run_dir)  # one training process per run dir (RunLockedError); released by mark_done
    resolved = config_to_dict(config) if not isinstance(config, dict) else config
    described = data.describe()
    info = {
        "method": method,
        "stage": data.stage,
        "subject": data.subjects[0] if len(data.subjects) == 1 else None,
        "subjects": described["subjects"],
        "store": described["stores"][0]["path"],
        "store_fingerprint": described["stores"][0]["fingerprint"],
        "store_digest": described["stores"][0]["digest"],
        "stores": described["stores"],
        "init_from": described["init_from"],
        "seed": int(seed),
    }
    run_file = run_dir / "run.json"
    if run_file.is_file():
        old = read_json(run_file)
        if old.get("method") != method:
            raise ConfigError(
                f"run dir {run_dir} holds a '{old.get('method')}' run, not '{method}'; use a new --out"
            )
        if old.get("stage", TARGET) != info["stage"]:
            raise ConfigError(f"run dir {run_dir} holds a '{old.get('stage')}' run, asked for '{data.stage}'")
        old_subjects = old.get("subjects", [old.get("subject")])
        if old_subjects != info["subjects"]:
            raise SubjectMismatchError(
                f"run dir {run_dir} was started for subjects {old_subjects}, "
                f"asked for subjects {info['subjects']}"
            )
        old_prints = [s["fingerprint"] for s in old.get("stores", [])] or [old.get("store_fingerprint")]
        if old_prints != [s["fingerprint"] for s in info["stores"]]:
            raise SubjectMismatchError(
                f"run dir {run_dir} was started on store(s) {old.get('stores', old.get('store'))} "
                f"(fingerprints {old_prints}), got {info['stores']}"
            )
        if old.get("seed") != info["seed"]:
            raise ConfigError(f"run dir {run_dir} was started with seed {old.get('seed')}, got seed {seed}")
        if old.get("init_from") != info["init_from"]:
            raise ConfigError(
                f"run dir {run_dir} was started from {old.get('init_from')}, "
                f"got --init-from {info['init_from']}"
            )
        diffs = diff_configs(read_json(run_dir / "config.json"), resolved)
        if diffs:
            raise ConfigError(
                f"run dir {run_dir} was started with a different config ({'; '.join(diffs)}); "
                "resume with the original config or use a new --out"
            )
        return old
    write_json_atomic(run_dir / "config.json", resolved)
    write_json_atomic(run_file, {**info, "versions": library_versions()})
    return info


def mark_done(run_dir: str | os.PathLike, **summary: Any) -> None:
    """Write ``RUN/done.json`` once a run has finished (what ``--init-from`` requires), with the digest of
    every file of the run (checked when the run is loaded), and release the run dir's lock."""
    files = seal_run_files(run_dir)
    write_json_atomic(Path(run_dir) / "done.json", {"finished": True, **summary, "files": files})
    unlock_run_dir(run_dir)


def check_init_run(
    init_dir: str | os.PathLike, method: str, data: RunData, *, holds_out: bool = False
) -> dict[str, Any]:
    """Check that the finished run ``init_dir`` may start a ``method`` run on ``data``; returns its run.json.

    Raises:
        ConfigError: the init run is of another method, or has not finished (no ``done.json``).
        SubjectMismatchError: it was trained on other stores than ``data``'s primary store, or (``holds_out``)
            on one of ``data``'s subjects.
    """
    info = read_run(init_dir)
    if info.get("method") != method:
        raise ConfigError(
            f"--init-from {init_dir} is a '{info.get('method')}' run; a {method} run starts only from a "
            f"{method} run"
        )
    if not (Path(init_dir) / "done.json").is_file():
        raise ConfigError(f"--init-from {init_dir} has not finished (no done.json): finish that run first")
    prints = [s["fingerprint"] for s in info.get("stores", [])] or [info.get("store_fingerprint")]
    primary = store_fingerprint(data.store.path)
    if primary not in prints:
        raise SubjectMismatchError(
            f"--init-from {init_dir} was trained on store(s) {info.get('stores', info.get('store'))}, "
            f"not on {Path(data.store.path).resolve()} (fingerprint {primary})"
        )
    if holds_out:
        overlap = sorted(set(info.get("subjects", [])) & set(data.subjects))
        if overlap:
            raise SubjectMismatchError(
                f"--init-from {init_dir} was pretrained on subjects {info.get('subjects')}, "
                "which include this "
                f"run's subject(s) {overlap}; {method} pretrains leaving the target out"
            )
    return info


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``RUN/run.json`` (method, subject, store, store_fingerprint, seed, versions); a finished run's files
    are checked against the digests in its ``done.json`` first (CorruptFileError)."""
    run_file = Path(run_dir) / "run.json"
    if not run_file.is_file() or not (Path(run_dir) / "config.json").is_file():
        raise DatasetLayoutError(
            f"{run_dir} is not a fmrirecon run dir: expected run.json and config.json "
            "(written by fmrirecon train)"
        )
    check_run_files(run_dir)
    try:
        return read_json(run_file)
    except ValueError as err:
        raise CorruptFileError(f"{run_file} is not valid JSON ({err}); the run folder is damaged") from err


def check_run_store(run_dir: str | os.PathLike, store_path: str | os.PathLike) -> dict[str, Any]:
    """Raise :class:`SubjectMismatchError` unless ``run_dir`` was trained on the store at ``store_path``."""
    info = read_run(run_dir)
    found = store_fingerprint(store_path)
    if info.get("store_fingerprint") != found:
        raise SubjectMismatchError(
            f"run {run_dir} was trained on store {info.get('store')} "
            f"(fingerprint {info.get('store_fingerprint')}), "
            f"but --data is {Path(store_path).resolve()} (fingerprint {found})"
        )
    return info
