"""Paired comparisons of evaluation results: method A against a reference on the same test images.

Each result of :func:`fmrirecon.evaluation.suite.evaluate_reconstructions` carries, per metric, every image's
score averaged over its samples (``per_image``, rows in ``ids`` order). Two results of one subject are paired
by 73k id; the difference of their per-image scores is summarised by its mean and the two-sided t-interval of
that mean (images are the unit). Paired intervals are narrower than comparing two means, because much of
the spread between images (easy and hard scenes) is shared by both methods.

Every shared image counts, as in the suite's means: an image whose score was undefined (a blank
reconstruction has no PixCorr) carries its defined score (``metrics.UNDEFINED_CORRELATION``) in
``per_image``. A metric with an unscored image (JSON null, only in ``metrics.json`` written before fmrirecon
defined those scores) is left out rather than compared on the other images: dropping an image where one
method failed would favour that method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fmrirecon.evaluation.metrics import mean_interval


def paired_difference(
    result: Mapping[str, Any], reference: Mapping[str, Any], confidence: float = 0.95
) -> dict[str, dict[str, float]]:
    """``result − reference`` per metric that both scored per image: ``{metric: {mean, low, high, n}}``.

    Images are matched by 73k id; ``n`` is the number of shared images, all of them. A metric where either
    side has an image without a score (``None``) is left out, never compared on a subset. Raises
    ``ValueError`` when the two results share no image or are of different subjects.
    """
    if result.get("subject") != reference.get("subject"):
        raise ValueError(
            f"paired comparison needs one subject, got {result.get('subject')} and {reference.get('subject')}"
        )
    for r in (result, reference):
        if "per_image" not in r or "ids" not in r:
            raise ValueError(
                f"result {r.get('method')}·{r.get('variant')} has no per-image scores "
                "(metrics.json written before fmrirecon recorded them): re-run the evaluation"
            )
    ref_rows = {int(i): k for k, i in enumerate(reference["ids"])}
    pairs = [(k, ref_rows[int(i)]) for k, i in enumerate(result["ids"]) if int(i) in ref_rows]
    if not pairs:
        raise ValueError("the two results share no test image")
    rows, ref_index = np.array(pairs).T
    out = {}
    for metric in sorted(set(result["per_image"]) & set(reference["per_image"])):
        a = np.array(result["per_image"][metric], dtype=float)[rows]
        b = np.array(reference["per_image"][metric], dtype=float)[ref_index]
        if len(a) < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
            continue
        mean, low, high = mean_interval(a - b, confidence)
        out[metric] = {"mean": mean, "low": low, "high": high, "n": len(a)}
    return out


def find_reference(
    results: Sequence[Mapping[str, Any]], method: str = "ridge", variant: str | None = None
) -> Mapping[str, Any] | None:
    """The result of ``method`` (and ``variant``; else its first variant by name) among ``results``."""
    matches = sorted(
        (r for r in results if r.get("method") == method and variant in (None, r.get("variant"))),
        key=lambda r: r.get("variant") or "",
    )
    return matches[0] if matches else None
