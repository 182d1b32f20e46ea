"""Analyses of trained runs: a registry, ``fmrirecon analyze NAME --run RUN --data STORE --out DIR``.

An analysis reads a run (its ``run.json``: method, subject, store) and the prepared store, and writes a
folder::

    OUT/analysis.json     {"analysis", "run", "method", "subject", "store", "settings", "results", "figures",
                           "volumes", "versions"}
    OUT/<figure>.png      figures
    OUT/<map>.nii.gz      voxel-wise results as NIfTI volumes in the subject's own space (the store's affine
                          and voxel indices), to open in a viewer over the subject's anatomy

By default ``OUT`` is ``RUN/analyses/NAME``, where the report finds it next to the run. Analyses are
registered here by name, like methods (:mod:`fmrirecon.methods`): one line per analysis module, each defining
an :class:`~fmrirecon.analysis.base.Analysis` subclass with that ``name``.
"""

from __future__ import annotations

import importlib

from fmrirecon.analysis.base import Analysis, AnalysisResult, write_analysis
from fmrirecon.errors import ConfigError

__all__ = ["Analysis", "AnalysisResult", "available_analyses", "get_analysis", "write_analysis"]

# name -> module defining an Analysis subclass whose ``name`` is that name
_REGISTRY: dict[str, str] = {
    "encoding_map": "fmrirecon.analysis.encoding_map",
}


def available_analyses() -> list[str]:
    return sorted(_REGISTRY)


def get_analysis(name: str) -> type[Analysis]:
    """The Analysis subclass registered as ``name`` (ConfigError naming the known ones otherwise)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown analysis '{name}'; expected one of {available_analyses()}")
    module = importlib.import_module(_REGISTRY[name])
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and issubclass(value, Analysis)
            and value is not Analysis
            and value.name == name
        ):
            return value
    raise ConfigError(f"analysis '{name}': {_REGISTRY[name]} defines no Analysis subclass named '{name}'")
