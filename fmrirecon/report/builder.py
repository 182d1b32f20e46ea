"""Build the single-file HTML report: reconstructions beside truth, metrics with chance, losses, settings.

The page is self-contained: every image (reconstructions, ground truth, loss plots) is an embedded base64 PNG
data URI, the stylesheet is inline and nothing is fetched, so the file can be mailed or archived as it is.
Every string that comes from a dataset or a user (captions, method names, paths, configs) goes through
jinja2's autoescaping.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import os
from pathlib import Path
from typing import Any

from fmrirecon.evaluation.metric_info import RETRIEVAL_POOL, higher_is_better, metric_sort_key
from fmrirecon.evaluation.metric_info import chance_level as metric_info_chance
from fmrirecon.io import write_text_atomic
from fmrirecon.report.inputs import (
    GroundTruth,
    ReconFolder,
    ReportInputs,
    RunInfo,
    collect_inputs,
    find_truth,
)
from fmrirecon.report.plots import array_to_png, loss_plot_png

DEFAULT_MAX_IMAGES = 12
# The retrieval settings' keys that name the pool size (the chance level of top-1 retrieval is 1/pool).
_SETTINGS_POOL_KEYS = ("retrieval_pool", "retrieval_batch", "retrieval_batch_size")


def chance_level(
    metric: str, n_images: int | None = None, settings: dict[str, Any] | None = None
) -> float | None:
    """Expected score of a random reconstruction, or ``None`` where chance is not a single number.

    ``settings["chance"][metric]`` (written by the evaluation) wins; otherwise: PixCorr and brain
    correlations 0, two-way identification 0.5, top-1 retrieval 1/pool (pool = ``settings`` retrieval batch,
    else ``min(300, n_images)``), ``nway_<n>`` 1/n. SSIM, correlation distances, FID and IS have no fixed
    chance level.
    """
    settings = settings or {}
    table = settings.get("chance")
    if isinstance(table, dict) and isinstance(table.get(metric), int | float):
        return float(table[metric])
    pool = next((settings[k] for k in _SETTINGS_POOL_KEYS if isinstance(settings.get(k), int)), None)
    if pool is None and n_images:
        pool = min(RETRIEVAL_POOL, n_images)
    return metric_info_chance(metric, pool)


def format_value(value: Any) -> str:
    """A metric as the evaluation writes it: a number, ``{"mean", "ci": [lo, hi]}`` or ``{"mean", "std"}``."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) >= 100 else f"{value:.3f}"
    if isinstance(value, dict) and isinstance(value.get("mean"), int | float):
        text = format_value(value["mean"])
        ci = value.get("ci") or value.get("ci95")
        if isinstance(ci, list | tuple) and len(ci) == 2:
            return f"{text} [{format_value(ci[0])}, {format_value(ci[1])}]"
        if isinstance(value.get("std"), int | float):
            return f"{text} ± {format_value(value['std'])}"
        return text
    return str(value)


def _label(method: str, variant: str | None) -> str:
    return method if not variant or variant == "default" else f"{method} · {variant}"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _subject_label(subject: int | None) -> str:
    return f"subj{subject:02d}" if subject is not None else "subject unknown"


def _pretty_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)


def _image_section(
    recons: list[ReconFolder],
    truth: GroundTruth | None,
    max_images: int,
    samples_per_cell: int,
) -> dict[str, Any]:
    """Rows = test images (73k ids, the first ``max_images`` in id order); columns = truth + each recon."""
    all_ids = sorted({i for r in recons for i in r.ids if i in r.images})
    ids = all_ids[:max_images]
    truth_images = truth.images(ids) if truth is not None else [None] * len(ids)
    captions = truth.captions(ids) if truth is not None else [""] * len(ids)
    rows = []
    for image_id, truth_image, caption in zip(ids, truth_images, captions, strict=True):
        cells = []
        for recon in recons:
            pngs = recon.images.get(image_id, [])[:samples_per_cell]
            cells.append([_data_uri(p.read_bytes()) for p in pngs])
        rows.append(
            {
                "id": image_id,
                "caption": caption,
                "truth": _data_uri(array_to_png(truth_image)) if truth_image is not None else None,
                "cells": cells,
            }
        )
    return {
        "columns": [{"label": _label(r.method, r.variant), "path": str(r.path)} for r in recons],
        "rows": rows,
        "n_total": len(all_ids),
    }


def _columns(metrics: list[str], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Table columns: the metric and whether lower is better (the evaluation's settings, else the default)."""
    higher = settings.get("higher_is_better") if isinstance(settings.get("higher_is_better"), dict) else {}
    return [
        {"name": m, "lower_is_better": (not higher[m]) if m in higher else not higher_is_better(m)}
        for m in metrics
    ]


def _with_undefined(text: str, result: dict[str, Any], metric: str) -> str:
    """A score and, if any, how many reconstructions had it undefined (``results[].undefined``, e.g. a blank
    image's PixCorr: scored 0 and kept in the mean)."""
    count = (result.get("undefined") or {}).get(metric, 0)
    return f"{text} ({count} undefined)" if count else text


def _metric_section(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Metric table for one subject: a chance row, then one row per (method, variant) result."""
    if not results:
        return None
    metrics = sorted({m for r in results for m in r["metrics"]}, key=metric_sort_key)
    first = results[0]
    settings = first["_settings"]
    chance = [chance_level(m, first.get("n_images"), settings) for m in metrics]
    unavailable = settings.get("unavailable") if isinstance(settings.get("unavailable"), dict) else {}
    return {
        "columns": _columns(metrics, settings),
        "unavailable": [
            {"name": name, "reason": reason if isinstance(reason, str) else _pretty_json(reason)}
            for name, reason in sorted(unavailable.items())
        ],
        "chance": [format_value(c) if c is not None else "n/a" for c in chance],
        "rows": [
            {
                "label": _label(r["method"], r.get("variant")),
                "n_images": r.get("n_images", "—"),
                "preset": r["_preset"] or "—",
                "scores": [_with_undefined(format_value(r["metrics"].get(m)), r, m) for m in metrics],
            }
            for r in results
        ],
    }


def baseline_method(results: list[dict[str, Any]]) -> str | None:
    """The first method (by name) among ``results`` whose registered class declares itself a baseline
    (``Capabilities.baseline``); methods that are not registered or do not import count as no baseline."""
    from fmrirecon.methods import get_method

    for name in sorted({r["method"] for r in results}):
        try:
            if get_method(name).capabilities.baseline:
                return name
        except Exception:  # an unimportable method is reported elsewhere; it is just not a baseline
            continue
    return None


def _paired_section(
    results: list[dict[str, Any]], reference_method: str | None = None
) -> dict[str, Any] | None:
    """Each result minus the reference method's (default: the declared baseline, :func:`baseline_method`), per
    image (:mod:`fmrirecon.evaluation.compare`), for one subject and only within the reference's preset (other
    presets score differently); ``None`` without a reference or per-image scores."""
    from fmrirecon.evaluation.compare import find_reference, paired_difference

    reference_method = reference_method or baseline_method(results)
    if reference_method is None:
        return None
    reference = find_reference(results, reference_method)
    if reference is None or "per_image" not in reference:
        return None
    rows = []
    for r in results:
        if r is reference or "per_image" not in r or r["_preset"] != reference["_preset"]:
            continue
        try:
            diffs = paired_difference(r, reference)
        except ValueError:  # no shared image
            continue
        rows.append((r, diffs))
    if not rows:
        return None
    metrics = sorted({m for _, d in rows for m in d}, key=metric_sort_key)

    def cell(d: dict[str, float] | None) -> dict[str, Any]:
        if d is None:
            return {"mean": "—", "interval": "", "significant": False}
        return {
            "mean": f"{d['mean']:+.3f}",
            "interval": f"[{d['low']:+.3f}, {d['high']:+.3f}]",
            "significant": d["low"] > 0 or d["high"] < 0,
        }

    return {
        "reference": _label(reference["method"], reference.get("variant")),
        "columns": _columns(metrics, reference["_settings"]),
        "rows": [
            {"label": _label(r["method"], r.get("variant")), "cells": [cell(d.get(m)) for m in metrics]}
            for r, d in rows
        ],
    }


def _run_section(run: RunInfo) -> dict[str, Any]:
    title = f"{run.method} {_subject_label(run.subject)}"
    plot = _data_uri(loss_plot_png(run.loss_logs, title)) if run.loss_logs else None
    return {
        "label": title,
        "path": str(run.path),
        "seed": run.run.get("seed", run.config.get("seed", "—")),
        "stages": [log.stage for log in run.loss_logs],
        "plot": plot,
        "config": _pretty_json(run.config),
        "run": _pretty_json(run.run),
    }


def _analysis_section(analysis) -> dict[str, Any]:
    results = analysis.doc.get("results", {})
    return {
        "label": f"{analysis.name} · {analysis.method or '—'} {_subject_label(analysis.subject)}",
        "description": analysis.doc.get("description", ""),
        "path": str(analysis.path),
        "figures": [_data_uri(p.read_bytes()) for p in analysis.figures],
        "volumes": [str(p) for p in analysis.volumes],
        "results": _pretty_json(results),
        "settings": _pretty_json(analysis.doc.get("settings", {})),
    }


def _truth_digest(truth_path: Path | None) -> str | None:
    """Content digest of the ground-truth store (issue 25), or None for a folder of PNGs / no truth."""
    if truth_path is None or not (Path(truth_path) / "manifest.json").is_file():
        return None
    from fmrirecon.data.integrity import store_digest

    return store_digest(truth_path)


def render_report(
    inputs: ReportInputs,
    *,
    truth: str | os.PathLike | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    samples_per_cell: int = 1,
    skipped: list[dict[str, str]] = (),
    title: str = "fmrirecon report",
) -> str:
    """Render the report as one HTML string (see :func:`build_report`)."""
    import jinja2

    from fmrirecon import __version__

    if max_images < 1 or samples_per_cell < 1:
        raise ValueError(
            f"max_images and samples_per_cell must be >= 1, got {max_images} and {samples_per_cell}"
        )
    truth_path = Path(truth) if truth is not None else find_truth(inputs)
    ground_truth = GroundTruth(truth_path) if truth_path is not None else None

    results = [
        {**r, "_settings": e.settings, "_preset": e.preset} for e in inputs.evaluations for r in e.results
    ]
    subjects = sorted(
        {r["subject"] for r in results}
        | {r.subject for r in inputs.recons}
        | {r.subject for r in inputs.runs}
        | {a.subject for a in inputs.analyses},
        key=lambda s: (s is None, s or 0),
    )
    sections = []
    for subject in subjects:
        recons = sorted(
            (r for r in inputs.recons if r.subject == subject), key=lambda r: (r.method, r.variant or "")
        )
        subject_results = sorted(
            (r for r in results if r["subject"] == subject),
            key=lambda r: (r["method"], r.get("variant") or ""),
        )
        runs = sorted((r for r in inputs.runs if r.subject == subject), key=lambda r: (r.method, str(r.path)))
        sections.append(
            {
                "subject": subject,
                "label": _subject_label(subject),
                "images": _image_section(recons, ground_truth, max_images, samples_per_cell)
                if recons
                else None,
                "metrics": _metric_section(subject_results),
                "paired": _paired_section(subject_results),
                "runs": [_run_section(r) for r in runs],
                "analyses": [
                    _analysis_section(a)
                    for a in sorted(inputs.analyses, key=lambda a: (a.name, a.method or "", str(a.path)))
                    if a.subject == subject
                ],
            }
        )

    all_skipped = list(skipped) + [s for e in inputs.evaluations for s in e.skipped]
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fmrirecon.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html.j2").render(
        title=title,
        version=__version__,
        generated=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        truth_path=str(truth_path) if truth_path else None,
        truth_digest=_truth_digest(truth_path),
        max_images=max_images,
        sections=sections,
        skipped=all_skipped,
        evaluations=[
            {
                "path": str(e.path),
                "preset": e.preset or "—",
                "settings": _pretty_json(e.settings),
                "versions": _pretty_json(e.versions),
            }
            for e in inputs.evaluations
        ],
    )


def build_report(
    sources: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    recon_dirs: list[str | os.PathLike] = (),
    truth: str | os.PathLike | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    samples_per_cell: int = 1,
    skipped: list[dict[str, str]] = (),
    title: str = "fmrirecon report",
) -> Path:
    """Write a self-contained HTML report and return its path.

    Args:
        sources: metrics.json files, run directories, reconstruction folders, or folders holding any of them.
        out: the HTML file to write (atomically).
        recon_dirs: extra reconstruction folders (in addition to ``"recon_dir"`` entries of metrics results).
        truth: prepared store or ``<id73k>.png`` folder with the ground truth; default: the store recorded in
            the inputs (metrics settings ``truth``/``store``, then ``run.json``, then recon manifests).
        max_images: image rows per subject (the first ids in 73k order), keeps the file small.
        samples_per_cell: reconstructions shown per image and method (``k = 0..``).
        skipped: ``[{"method", "reason"}]`` methods that could not run, listed with their reason.
    """
    inputs = collect_inputs(list(sources), list(recon_dirs))
    html = render_report(
        inputs,
        truth=truth,
        max_images=max_images,
        samples_per_cell=samples_per_cell,
        skipped=skipped,
        title=title,
    )
    out = Path(out)
    write_text_atomic(out, html)
    return out
