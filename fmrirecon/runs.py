"""Run operations: the train / reconstruct / evaluate / report steps, used by the CLI commands and the demo.

One place decides how a step seeds, which device it runs on and what it writes, so ``fmrirecon train`` and
``fmrirecon demo`` produce the same run for the same method, config, data and seed (STYLE.md §17).

- :func:`method_config`: the method's paper defaults ← YAML files (``configs/<method>/<name>.yaml`` or paths)
  ← dotted overrides.
- :func:`train_run`: ``init_run_dir`` → seed → ``method.fit(data, run_dir)`` → ``RUN/done.json``.
- :func:`load_run`: ``Method.load(run_dir, device=...)`` after checking the run against the store.
- :func:`reconstruct_run`: repeat-averaged betas of a split → ``method.reconstruct`` (+ second-order
  selection, retrieval embeddings where the method declares them) → a reconstruction folder.
- :func:`evaluate_runs`, :func:`report_runs`: the evaluation suite and the HTML report.
- :func:`analyze_run`: a registered analysis (:mod:`fmrirecon.analysis`) of a run.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fmrirecon.errors import ConfigError
from fmrirecon.methods.base import (
    ReconMethod,
    RunData,
    check_run_store,
    init_run_dir,
    mark_done,
    store_fingerprint,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_DIR",
    "analyze_run",
    "evaluate_runs",
    "load_run",
    "method_config",
    "reconstruct_run",
    "report_runs",
    "resolve_config_path",
    "seed_everything",
    "train_run",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (every step does this before it runs)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_config_path(method: str, config: str | os.PathLike | None) -> Path | None:
    """A path as given, or a config name shipped under ``fmrirecon/configs/<method>/<name>.yaml``."""
    if config is None:
        return None
    path = Path(config)
    if path.is_file():
        return path
    shipped_dir = CONFIG_DIR / method
    shipped = shipped_dir / f"{str(config).removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in shipped_dir.glob("*.yaml"))
    raise ConfigError(
        f"config {str(config)!r} is neither a file nor a shipped config of {method} (shipped: {names})"
    )


def method_config(
    method_cls: type[ReconMethod], config: str | os.PathLike | None = None, overrides=()
) -> Any:
    """``Config`` defaults ← ``config`` (a YAML path or a shipped name; ``base:`` files first) ← overrides."""
    return method_cls.config_from(resolve_config_path(method_cls.name, config), list(overrides))


def train_run(
    method_cls: type[ReconMethod],
    config: Any,
    data: RunData,
    run_dir: str | os.PathLike,
    *,
    seed: int = 0,
    device="cpu",
    fresh: bool = False,
) -> ReconMethod:
    """Train one run: write/check ``RUN/config.json`` + ``run.json``, seed, ``fit``, ``RUN/done.json``.

    Args:
        fresh: delete ``run_dir`` first (the demo owns its run dirs); otherwise an existing run dir of the
            same run resumes and one of another run is refused.

    Returns:
        the fitted method (on ``device``).
    """
    run_dir = Path(run_dir)
    if fresh and run_dir.is_dir():
        shutil.rmtree(run_dir)
    init_run_dir(run_dir, method=method_cls.name, config=config, data=data, seed=seed)
    seed_everything(seed)
    method = method_cls(config).to(device)
    logger.info(
        "training %s (%s) on subjects %s -> %s", method_cls.name, data.stage, list(data.subjects), run_dir
    )
    method.fit(data, run_dir, seed=seed)
    mark_done(run_dir, stage=data.stage, subjects=list(data.subjects))
    return method


def load_run(run_dir: str | os.PathLike, store_path: str | os.PathLike | None = None, *, device="cpu"):
    """``(method, run_info)`` of a trained run on ``device``; with ``store_path``, checks the run used it."""
    from fmrirecon.methods import get_method
    from fmrirecon.methods.base import read_run

    info = check_run_store(run_dir, store_path) if store_path is not None else read_run(run_dir)
    return get_method(info["method"]).load(run_dir, device=device), info


def reconstruct_run(
    method: ReconMethod,
    store,
    subject: int,
    out: str | os.PathLike,
    *,
    split: str = "test",
    limit: int | None = None,
    samples: int = 1,
    seed: int = 0,
    variant: str | None = None,
    settings: Any | None = None,
    select_best: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Reconstruct ``subject``'s repeat-averaged betas of ``split`` (the first ``limit`` in 73k order) and
    write the reconstruction folder ``out`` (``evaluation.io.write_recon_dir``).

    ``select_best`` samples ``samples`` images per input and keeps the one the method's own second-order
    selection prefers (``capabilities.second_order_selection``).
    """
    from fmrirecon.evaluation.io import write_recon_dir
    from fmrirecon.io import library_versions

    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    if select_best and not method.capabilities.second_order_selection:
        raise ConfigError(f"--select-best: {method.name} declares no second-order selection")
    variant = method.resolve_variant(variant)
    settings = method.resolve_settings(settings)
    ids, betas = store.subject(subject).averaged(split)
    if limit is not None:
        ids, betas = ids[:limit], betas[:limit]  # test ids come sorted: the same images across subjects
    seed_everything(seed)
    images = method.reconstruct(betas, samples, seed, variant=variant, settings=settings)
    if select_best:
        images = method.select_best(betas, images, seed, settings)
    brain = image_side = None
    if method.capabilities.retrieval_embeddings:
        brain = method.brain_embeddings(betas)
        image_side = method.image_embeddings(store.images(ids))
    store_path = Path(store.path)
    fingerprint = store_fingerprint(store_path) if (store_path / "manifest.json").is_file() else None
    from fmrirecon.config import config_to_dict

    return write_recon_dir(
        out,
        method=method.name,
        subject=subject,
        variant=variant,
        ids=ids,
        images=images,
        brain_embeddings=brain,
        image_embeddings=image_side,
        extra={
            "store": str(store_path.resolve()),
            "store_fingerprint": fingerprint,
            "seed": seed,
            "split": split,
            "settings": config_to_dict(settings),
            "selected_of": samples if select_best else None,
            "versions": library_versions(),
            **(extra or {}),
        },
    )


def evaluate_runs(
    recon_dirs: Sequence[str | os.PathLike],
    truth: str | os.PathLike,
    preset: str = "world",
    *,
    device="cpu",
    weights_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """The evaluation suite over reconstruction folders (the ``metrics.json`` dict)."""
    from fmrirecon.evaluation.suite import evaluate_reconstructions

    return evaluate_reconstructions(
        list(recon_dirs), truth, preset, weights_dir=weights_dir, device=str(device), batch_size=batch_size
    )


def report_runs(sources: Sequence[str | os.PathLike], out: str | os.PathLike, **kwargs) -> Path:
    """The HTML report over metrics files, run dirs, reconstruction and analysis folders."""
    from fmrirecon.report import build_report

    return build_report(list(sources), out, **kwargs)


def analyze_run(
    name: str,
    run_dir: str | os.PathLike,
    store_path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    settings=(),
    seed: int = 0,
    device="auto",
) -> Path:
    """Run the registered analysis ``name`` on ``run_dir`` (checked against ``store_path``) and write its
    folder (default ``RUN/analyses/<name>``); see :mod:`fmrirecon.analysis`."""
    from fmrirecon.analysis import get_analysis, write_analysis
    from fmrirecon.config import apply_overrides
    from fmrirecon.data.store import PreparedStore
    from fmrirecon.device import resolve_device

    analysis_cls = get_analysis(name)
    config = apply_overrides(analysis_cls.Config(), list(settings)) if settings else analysis_cls.Config()
    analysis = analysis_cls(config)
    device = resolve_device(device)
    info = check_run_store(run_dir, store_path)
    store = PreparedStore(store_path)
    seed_everything(seed)
    result = analysis.run(Path(run_dir), info, store, device=device, seed=seed)
    out = Path(out) if out is not None else Path(run_dir) / "analyses" / name
    subject_store = store.subject(info["subject"]) if info.get("subject") is not None else None
    return write_analysis(
        out, analysis, result, run_dir=Path(run_dir), run_info=info, subject_store=subject_store
    )
