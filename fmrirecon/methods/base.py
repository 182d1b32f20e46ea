"""The interface every reconstruction method implements, and the run-dir bookkeeping they share.

A method is a :class:`ReconMethod` subclass with a ``Config`` dataclass (defaults = the paper's values),
registered by name in :mod:`fmrirecon.methods`. ``fmrirecon train`` builds ``Method(config)``, calls
:func:`init_run_dir` (writes ``RUN/config.json`` and ``RUN/run.json``, or checks an existing run dir is the
same run) and then ``method.fit(store, subject, run_dir, seed=seed)``; ``fmrirecon reconstruct`` calls
``Method.load(run_dir)`` and
``method.reconstruct(betas, samples, seed)``.

Example (a subclass; training goes through the shared trainer)::

    @dataclass
    class MyConfig:
        hidden: int = 1024                                   # paper value
        train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=150, lr=3e-4))

    class MyMethod(ReconMethod):
        name = "mymethod"
        Config = MyConfig

        def fit(self, store, subject, run_dir, *, seed=0):
            model = MyModel(...)  # nn.Module with training_step(batch) -> {"loss": ...}
            loader = DataLoader(TrainDataset(store, subject, "train"), batch_size=32, shuffle=True)
            trainer = Trainer(self.config.train, run_dir, seed=seed, run_config=self.config)
            trainer.fit(model, loader, stage="pretrain")
            save_safetensors_atomic(model.state_dict(), Path(run_dir) / "model.safetensors")

        @classmethod
        def load(cls, run_dir):
            method = cls(cls.read_run_config(run_dir)); ...; return method

        def reconstruct(self, betas, samples=1, seed=0, *, variant=None):  # (N, V) -> uint8 (N, K, H, W, 3)
            ...
"""

from __future__ import annotations

import abc
import hashlib
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fmrirecon.config import config_from_dict, config_to_dict, diff_configs, load_config
from fmrirecon.errors import ConfigError, DatasetLayoutError, SubjectMismatchError
from fmrirecon.io import library_versions, read_json, write_json_atomic

__all__ = ["ReconMethod", "init_run_dir", "read_run", "store_fingerprint", "check_run_store"]


class ReconMethod(abc.ABC):
    """Base class of reconstruction methods.

    Class attributes:
        name: registry name (``fmrirecon train NAME``).
        Config: the method's config dataclass; its defaults are the paper's values.

    Attributes:
        config: an instance of ``Config``.
        subject: the subject the method was fitted on (set by ``fit`` / ``load``), or None.
        n_voxels: voxel count the method expects in ``betas``, or None before fitting.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type]

    def __init__(self, config: Any | None = None):
        if config is None:
            config = self.Config()
        if not isinstance(config, self.Config):
            raise ConfigError(
                f"{type(self).__name__} expects a {self.Config.__name__} config, got {type(config).__name__}"
            )
        self.config = config
        self.subject: int | None = None
        self.n_voxels: int | None = None

    # --------------------------------------------------------------- interface
    @abc.abstractmethod
    def fit(self, store, subject: int, run_dir: str | os.PathLike, *, seed: int = 0) -> None:
        """Train on ``store``'s ``subject`` (train split); save all that ``load`` needs in ``run_dir``."""

    @classmethod
    @abc.abstractmethod
    def load(cls, run_dir: str | os.PathLike) -> ReconMethod:
        """Rebuild a fitted method from ``run_dir`` (config.json + safetensors; nothing unpickled)."""

    @abc.abstractmethod
    def reconstruct(
        self, betas: np.ndarray, samples: int = 1, seed: int = 0, *, variant: str | None = None
    ) -> np.ndarray:
        """Reconstruct images from betas.

        Args:
            betas: float32 (N, V) repeat-averaged test betas of the fitted subject.
            samples: K images per input.
            seed: same seed → same images.
            variant: one of :meth:`variants` (None = the first).

        Returns:
            uint8 (N, K, H, W, 3).
        """

    def brain_embeddings(self, betas: np.ndarray) -> np.ndarray | None:
        """(N, V) → (N, D) embeddings for retrieval against :meth:`image_embeddings`, or None."""
        return None

    def image_embeddings(self, images: np.ndarray) -> np.ndarray | None:
        """uint8 (N, H, W, 3) → (N, D) in the space of :meth:`brain_embeddings`, or None."""
        return None

    def variants(self) -> list[str]:
        """Named reconstruction variants (e.g. with/without guidance); the first is the default."""
        return ["default"]

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
    subject: int,
    store_path: str | os.PathLike,
    seed: int,
) -> dict[str, Any]:
    """Write ``RUN/config.json`` + ``RUN/run.json``, or check that an existing run dir is the same run.

    Raises:
        SubjectMismatchError: the run dir holds a run of another subject or another store.
        ConfigError: the run dir holds another method, seed or config.
    """
    run_dir = Path(run_dir)
    resolved = config_to_dict(config) if not isinstance(config, dict) else config
    info = {
        "method": method,
        "subject": int(subject),
        "store": str(Path(store_path).resolve()),
        "store_fingerprint": store_fingerprint(store_path),
        "seed": int(seed),
    }
    run_file = run_dir / "run.json"
    if run_file.is_file():
        old = read_json(run_file)
        if old.get("method") != method:
            raise ConfigError(
                f"run dir {run_dir} holds a '{old.get('method')}' run, not '{method}'; use a new --out"
            )
        if old.get("subject") != info["subject"]:
            raise SubjectMismatchError(
                f"run dir {run_dir} was started for subject {old.get('subject')}, asked for subject {subject}"
            )
        if old.get("store_fingerprint") != info["store_fingerprint"]:
            raise SubjectMismatchError(
                f"run dir {run_dir} was started on store {old.get('store')} (fingerprint "
                f"{old.get('store_fingerprint')}), got {info['store']} "
                f"(fingerprint {info['store_fingerprint']})"
            )
        if old.get("seed") != info["seed"]:
            raise ConfigError(f"run dir {run_dir} was started with seed {old.get('seed')}, got seed {seed}")
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


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``RUN/run.json`` (method, subject, store, store_fingerprint, seed, versions)."""
    run_file = Path(run_dir) / "run.json"
    if not run_file.is_file() or not (Path(run_dir) / "config.json").is_file():
        raise DatasetLayoutError(
            f"{run_dir} is not a fmrirecon run dir: expected run.json and config.json "
            "(written by fmrirecon train)"
        )
    return read_json(run_file)


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
