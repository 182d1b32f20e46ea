"""Metric metadata, one table (STYLE.md §16): column order, direction and chance level of every metric key.

The evaluation suite writes direction and chance into ``metrics.json`` (``settings.higher_is_better``,
``settings.chance``) from here; ``fmrirecon evaluate`` and the report order and read metrics from here when a
file does not say (``evaluation-protocol.md`` for the field's conventions).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "LOWER_IS_BETTER",
    "METRIC_ORDER",
    "RETRIEVAL_POOL",
    "TWO_WAY_METRICS",
    "chance_level",
    "higher_is_better",
    "metric_sort_key",
    "ordered_metrics",
]

# The order the field's papers print them in: the 8 standard metrics, then retrieval, FID, IS.
METRIC_ORDER = (
    "pixcorr", "ssim", "alexnet2", "alexnet5", "inception", "clip", "effnet", "swav",
    "retrieval_image", "retrieval_brain", "fid", "is",
)  # fmt: skip
# Two-way identification on network features (chance 0.5).
TWO_WAY_METRICS = frozenset({"alexnet2", "alexnet5", "inception", "clip"})
# Correlation distances and FID: smaller is better.
LOWER_IS_BETTER = frozenset({"effnet", "swav", "fid"})
# The retrieval protocol draws batches of 300 test samples (MindEye); smaller test sets use all of them.
RETRIEVAL_POOL = 300

_NWAY = re.compile(r"nway_(?:class_)?(\d+)")


def higher_is_better(metric: str) -> bool:
    """False for correlation distances and FID, True for every other metric key."""
    return metric not in LOWER_IS_BETTER


def chance_level(metric: str, pool_size: int | None = None) -> float | None:
    """Expected score of a random reconstruction, or None where chance is not a single number.

    PixCorr and brain correlations (``brain_corr_*``) 0; two-way identification 0.5; ``nway_<n>``,
    ``nway_class_<n>`` 1/n; top-1 retrieval 1/``pool_size`` (None without a pool). SSIM, correlation
    distances, FID and IS depend on the image statistics: None.
    """
    if metric == "pixcorr" or metric.startswith("brain_corr"):
        return 0.0
    if metric in TWO_WAY_METRICS:
        return 0.5
    nway = _NWAY.fullmatch(metric)
    if nway:
        return 1.0 / int(nway.group(1))
    if metric.startswith("retrieval_"):
        return 1.0 / pool_size if pool_size else None
    return None


def metric_sort_key(metric: str) -> tuple:
    """Table order: :data:`METRIC_ORDER`, then n-way (by n; the image ones first), then the rest by name."""
    if metric in METRIC_ORDER:
        return (0, METRIC_ORDER.index(metric), 0, metric)
    nway = _NWAY.fullmatch(metric)
    if nway:
        return (1, int("class" in metric), int(nway.group(1)), metric)
    return (2, 0, 0, metric)


def ordered_metrics(metrics: Iterable[str]) -> list[str]:
    """Metric keys in table order (:func:`metric_sort_key`)."""
    return sorted(set(metrics), key=metric_sort_key)
