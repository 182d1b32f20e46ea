"""Collect what a report shows from the files the other layers write (docs/contracts.md).

Three kinds of input are recognised by their contents, never by their names:

- an **evaluation file** (``metrics.json``: ``{"preset", "settings", "versions", "results": [...]}``);
- a **run directory** (``RUN/run.json``, ``RUN/config.json``, ``RUN/<stage>/metrics.jsonl`` per-step losses);
- a **reconstruction folder** (``RECON/manifest.json`` with ``"method"``, ``RECON/images/<id73k>_<k>.png``).

A folder that is none of these is searched recursively, so ``fmrirecon report fmrirecon_demo`` finds the
demo's metrics, runs and reconstructions in one go. Ground truth comes from a prepared store
(``STORE/stimuli.hdf5``) or from a folder of ``<id73k>.png`` files.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fmrirecon.errors import DatasetLayoutError, EvaluationInputError
from fmrirecon.io import read_json

LOSS_LOG_NAME = "metrics.jsonl"
# Keys of a metrics.jsonl record that are bookkeeping, not losses: they would flatten every loss curve.
NON_LOSS_KEYS = frozenset(
    {"step", "epoch", "time", "wall_time", "elapsed", "lr", "learning_rate", "stage", "samples"}
)


@dataclass
class EvaluationFile:
    """One ``metrics.json`` (the evaluation schema); ``results`` keep their dicts as written."""

    path: Path
    preset: str | None
    settings: dict[str, Any]
    versions: dict[str, Any]
    results: list[dict[str, Any]]
    skipped: list[dict[str, str]] = field(default_factory=list)


@dataclass
class LossLog:
    """Per-step losses of one training stage: ``steps (S,)``, ``{loss name: values (S,)}`` (NaN = absent)."""

    stage: str
    steps: np.ndarray
    losses: dict[str, np.ndarray]


@dataclass
class RunInfo:
    """A training run directory: its ``run.json``, resolved ``config.json`` and loss logs per stage."""

    path: Path
    method: str
    subject: int | None
    run: dict[str, Any]
    config: dict[str, Any]
    loss_logs: list[LossLog]


@dataclass
class AnalysisFolder:
    """An analysis folder (``fmrirecon analyze``): ``analysis.json``, PNG figures, NIfTI volumes."""

    path: Path
    name: str
    method: str | None
    subject: int | None
    doc: dict[str, Any]

    @property
    def figures(self) -> list[Path]:
        return [self.path / name for name in self.doc.get("figures", []) if (self.path / name).is_file()]

    @property
    def volumes(self) -> list[Path]:
        return [self.path / name for name in self.doc.get("volumes", [])]


@dataclass
class ReconFolder:
    """A reconstruction folder: ``images[id73k] = [png path for k = 0..K-1]``."""

    path: Path
    method: str
    subject: int | None
    variant: str | None
    ids: list[int]
    samples: int
    manifest: dict[str, Any]
    images: dict[int, list[Path]]

    @property
    def key(self) -> tuple[str, int | None, str | None]:
        return (self.method, self.subject, self.variant)


@dataclass
class ReportInputs:
    evaluations: list[EvaluationFile] = field(default_factory=list)
    runs: list[RunInfo] = field(default_factory=list)
    recons: list[ReconFolder] = field(default_factory=list)
    analyses: list[AnalysisFolder] = field(default_factory=list)

    def add_recon(self, recon: ReconFolder) -> None:
        known = {r.path.resolve() for r in self.recons}
        if recon.path.resolve() not in known:
            self.recons.append(recon)


def _subject_int(value: Any) -> int | None:
    """Subjects are 1-based ints; accept ``"subj01"`` / ``"1"`` as written by hand or older files."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    text = str(value).lower().removeprefix("subj")
    try:
        return int(text)
    except ValueError:
        raise EvaluationInputError(f"subject must be an int like 1 or 'subj01', got {value!r}") from None


def load_evaluation(path: str | os.PathLike) -> EvaluationFile:
    """Read a ``metrics.json``; :class:`EvaluationInputError` if it does not follow the evaluation schema."""
    path = Path(path)
    try:
        doc = read_json(path)
    except (OSError, json.JSONDecodeError) as err:
        raise EvaluationInputError(f"cannot read evaluation file {path}: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        found = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise EvaluationInputError(
            f"{path} is not a metrics.json: expected 'preset', 'settings', 'versions', 'results' (a list), "
            f"found {found}"
        )
    results = []
    for i, result in enumerate(doc["results"]):
        missing = [k for k in ("method", "subject", "metrics") if k not in result]
        if missing:
            raise EvaluationInputError(f"{path}: results[{i}] lacks {missing}; found keys {sorted(result)}")
        results.append({**result, "subject": _subject_int(result["subject"])})
    return EvaluationFile(
        path=path,
        preset=doc.get("preset"),
        settings=dict(doc.get("settings") or {}),
        versions=dict(doc.get("versions") or {}),
        results=results,
        skipped=list(doc.get("skipped") or []),
    )


def read_loss_log(path: str | os.PathLike, stage: str) -> LossLog | None:
    """Parse one ``metrics.jsonl`` (one JSON object per step); ``None`` if it holds no numeric loss."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                # A run killed mid-write leaves a truncated last line; the steps before it are still valid.
                if line_no == 1:
                    raise EvaluationInputError(f"{path}: line 1 is not JSON: {line[:80]!r}") from None
                break
    names: list[str] = []
    for record in records:
        for key, value in record.items():
            is_number = isinstance(value, int | float) and not isinstance(value, bool)
            if is_number and key not in NON_LOSS_KEYS and key not in names:
                names.append(key)
    if not names:
        return None
    steps = np.array([r.get("step", i) for i, r in enumerate(records)], dtype=float)
    losses = {
        name: np.array(
            [float(r[name]) if isinstance(r.get(name), int | float) else math.nan for r in records]
        )
        for name in names
    }
    return LossLog(stage=stage, steps=steps, losses=losses)


def load_run(path: str | os.PathLike) -> RunInfo:
    """Read a run directory (``run.json`` required; ``config.json`` and loss logs optional)."""
    path = Path(path)
    run_json = path / "run.json"
    if not run_json.is_file():
        raise DatasetLayoutError(
            f"{path} is not a run directory: expected {run_json} (written by fmrirecon train)"
        )
    run = read_json(run_json)
    config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    loss_logs = []
    log_paths = [(p.parent.name, p) for p in sorted(path.glob(f"*/{LOSS_LOG_NAME}"))]
    if (path / LOSS_LOG_NAME).is_file():
        log_paths.insert(0, (str(run.get("stage", "train")), path / LOSS_LOG_NAME))
    for stage, log_path in log_paths:
        log = read_loss_log(log_path, stage)
        if log is not None:
            loss_logs.append(log)
    return RunInfo(
        path=path,
        method=str(run.get("method", config.get("method", "unknown"))),
        subject=_subject_int(run.get("subject")),
        run=run,
        config=config,
        loss_logs=loss_logs,
    )


def load_recon(path: str | os.PathLike) -> ReconFolder:
    """Read a reconstruction folder and index its PNGs by 73k id and sample number."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise EvaluationInputError(
            f"{path} is not a reconstruction folder: expected manifest.json and images/<id73k>_<k>.png"
        )
    manifest = read_json(manifest_path)
    if "method" not in manifest:
        raise EvaluationInputError(f"{manifest_path} lacks 'method'; found keys {sorted(manifest)}")
    images: dict[int, list[tuple[int, Path]]] = {}
    for png in (path / "images").glob("*.png"):
        stem = png.stem.rsplit("_", 1)
        if len(stem) != 2 or not (stem[0].isdigit() and stem[1].isdigit()):
            continue
        images.setdefault(int(stem[0]), []).append((int(stem[1]), png))
    ids = [int(i) for i in manifest.get("ids", sorted(images))]
    return ReconFolder(
        path=path,
        method=str(manifest["method"]),
        subject=_subject_int(manifest.get("subject")),
        variant=manifest.get("variant"),
        ids=ids,
        samples=int(manifest.get("samples", 1)),
        manifest=manifest,
        images={i: [p for _, p in sorted(pngs)] for i, pngs in images.items()},
    )


def _is_recon_manifest(path: Path) -> bool:
    try:
        doc = read_json(path)
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(doc, dict) and "method" in doc and (path.parent / "images").is_dir()


def _is_evaluation(path: Path) -> bool:
    try:
        doc = read_json(path)
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("results"), list)


def collect_inputs(
    sources: list[str | os.PathLike], recon_dirs: list[str | os.PathLike] = ()
) -> ReportInputs:
    """Recognise each source (metrics file, run dir, recon folder, or a folder holding them) and load it.

    Recon folders named in a result's ``"recon_dir"`` (absolute, or relative to its metrics.json) are loaded
    too.
    """
    inputs = ReportInputs()
    seen_runs: set[Path] = set()

    def add_file(path: Path) -> None:
        if path.name == "analysis.json":
            if path.parent.resolve() not in {a.path.resolve() for a in inputs.analyses}:
                doc = read_json(path)
                inputs.analyses.append(
                    AnalysisFolder(
                        path.parent,
                        doc.get("analysis", path.parent.name),
                        doc.get("method"),
                        _subject_int(doc.get("subject")),
                        doc,
                    )  # fmt: skip
                )
        elif path.name == "run.json":
            if path.parent.resolve() not in seen_runs:
                seen_runs.add(path.parent.resolve())
                inputs.runs.append(load_run(path.parent))
        elif path.name == "manifest.json" and _is_recon_manifest(path):
            inputs.add_recon(load_recon(path.parent))
        elif path.suffix == ".json" and _is_evaluation(path):
            known = {e.path.resolve() for e in inputs.evaluations}
            if path.resolve() not in known:
                inputs.evaluations.append(load_evaluation(path))

    for source in sources:
        source = Path(source)
        if source.is_file():
            if not _is_evaluation(source):
                raise EvaluationInputError(
                    f"{source} is not a metrics.json (expected a JSON object with a 'results' list); "
                    "pass run directories and reconstruction folders as folders"
                )
            add_file(source)
        elif source.is_dir():
            found = sorted(
                p
                for name in ("run.json", "manifest.json", "*.json")
                for p in source.rglob(name)
                if p.is_file()
            )
            before = (len(inputs.evaluations), len(inputs.runs), len(inputs.recons), len(inputs.analyses))
            for path in dict.fromkeys(found):
                add_file(path)
            if (
                len(inputs.evaluations),
                len(inputs.runs),
                len(inputs.recons),
                len(inputs.analyses),
            ) == before:
                raise EvaluationInputError(
                    f"{source} holds no metrics.json, run directory (run.json) or reconstruction folder "
                    "(manifest.json + images/)"
                )
        else:
            raise EvaluationInputError(f"report input {source} does not exist")

    for recon_dir in recon_dirs:
        inputs.add_recon(load_recon(recon_dir))
    for evaluation in inputs.evaluations:
        for result in evaluation.results:
            recon_dir = result.get("recon_dir")
            if recon_dir:
                recon_path = Path(recon_dir)
                if not recon_path.is_absolute():
                    recon_path = evaluation.path.parent / recon_path
                if recon_path.is_dir():
                    inputs.add_recon(load_recon(recon_path))
    return inputs


class GroundTruth:
    """Ground-truth images by 73k id, from a prepared store or a folder of ``<id73k>.png`` files.

    ``images(ids) -> uint8 (n, H, W, 3)``; ``captions(ids) -> list[str]`` (first caption, or ``""``).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._ids: np.ndarray | None = None
        if (self.path / "stimuli.hdf5").is_file():
            self.kind = "store"
        elif self.path.is_dir() and any(p.stem.isdigit() for p in self.path.glob("*.png")):
            self.kind = "folder"
        else:
            raise DatasetLayoutError(
                f"ground truth {self.path} must be a prepared store (STORE/stimuli.hdf5, written by "
                "fmrirecon prepare) or a folder of <id73k>.png images"
            )

    def _store_rows(self, h5, ids: list[int]) -> list[int | None]:
        if self._ids is None:
            self._ids = np.asarray(h5["ids_73k"][:], dtype=np.int64)
        rows = np.searchsorted(self._ids, ids)
        return [
            int(r) if r < len(self._ids) and self._ids[r] == i else None
            for r, i in zip(rows, ids, strict=True)
        ]

    def images(self, ids: list[int]) -> list[np.ndarray | None]:
        """One ``uint8 (H, W, 3)`` array per id, ``None`` where the id is not in the ground truth."""
        if self.kind == "folder":
            from PIL import Image

            out = []
            for i in ids:
                png = self.path / f"{i}.png"
                out.append(np.asarray(Image.open(png).convert("RGB")) if png.is_file() else None)
            return out
        import h5py

        with h5py.File(self.path / "stimuli.hdf5", "r") as h5:
            rows = self._store_rows(h5, ids)
            return [h5["images"][r] if r is not None else None for r in rows]

    def captions(self, ids: list[int]) -> list[str]:
        if self.kind == "folder":
            captions_json = self.path / "captions.json"
            table = read_json(captions_json) if captions_json.is_file() else {}
            return [str(table.get(str(i), "")) for i in ids]
        import h5py

        with h5py.File(self.path / "stimuli.hdf5", "r") as h5:
            if "captions" not in h5:
                return ["" for _ in ids]
            rows = self._store_rows(h5, ids)
            out = []
            for r in rows:
                if r is None:
                    out.append("")
                    continue
                first = h5["captions"][r][0]
                out.append(first.decode("utf-8") if isinstance(first, bytes) else str(first))
            return out


def find_truth(inputs: ReportInputs) -> Path | None:
    """Ground-truth store recorded by the inputs: metrics settings, then run.json, then recon manifests."""
    candidates: list[Any] = []
    for evaluation in inputs.evaluations:
        truth = evaluation.settings.get("truth")
        # The evaluation records ``{"path", "kind"}``; a plain path string is accepted too.
        candidates += [
            truth.get("path") if isinstance(truth, dict) else truth,
            evaluation.settings.get("store"),
        ]
    candidates += [run.run.get("store") for run in inputs.runs]
    candidates += [r.manifest.get("store") for r in inputs.recons]
    for candidate in candidates:
        if isinstance(candidate, str) and (Path(candidate) / "stimuli.hdf5").is_file():
            return Path(candidate)
    return None
