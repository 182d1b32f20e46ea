"""Self-contained HTML report: reconstructions next to ground truth, metrics with chance levels, training
losses and run settings (``fmrirecon report``)."""

from fmrirecon.report.builder import DEFAULT_MAX_IMAGES, build_report, chance_level, render_report
from fmrirecon.report.inputs import GroundTruth, ReportInputs, collect_inputs

__all__ = [
    "DEFAULT_MAX_IMAGES",
    "GroundTruth",
    "ReportInputs",
    "build_report",
    "chance_level",
    "collect_inputs",
    "render_report",
]
