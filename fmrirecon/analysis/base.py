"""What every analysis implements, and the writers of its folder (JSON, PNG figures, NIfTI volumes)."""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fmrirecon.io import atomic_path, library_versions, write_json_atomic

__all__ = ["ANALYSIS_FILE", "Analysis", "AnalysisResult", "voxel_volume", "write_analysis"]

ANALYSIS_FILE = "analysis.json"


@dataclass
class AnalysisResult:
    """What an analysis returns: JSON-able ``results``, figures as PNG bytes, voxel maps as ``(V,)`` arrays
    in the store's voxel order (written as NIfTI in the subject's space)."""

    results: dict[str, Any]
    figures: dict[str, bytes] = field(default_factory=dict)
    voxel_maps: dict[str, np.ndarray] = field(default_factory=dict)


class Analysis(abc.ABC):
    """Base class: ``name`` (registry key), ``description`` (one line), ``Config`` (settings dataclass,
    ``--set key=value``; defaults = the literature's values)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type]

    def __init__(self, config: Any | None = None):
        self.config = config if config is not None else self.Config()

    @abc.abstractmethod
    def run(self, run_dir: Path, run_info: dict[str, Any], store, *, device, seed: int) -> AnalysisResult:
        """Analyse the run ``run_dir`` (its ``run.json`` is ``run_info``) on the prepared ``store``."""


def voxel_volume(values: np.ndarray, subject_store) -> nib.Nifti1Image:  # noqa: F821
    """``values (V,)`` in the store's voxel order → a float32 NIfTI image in the subject's space.

    The grid is the subject's (``attrs['grid_shape']`` when the store records it, else the bounding box of
    its voxel indices from the origin, which keeps every voxel at its world position under the same affine);
    voxels outside the store's mask are NaN, so a viewer shows them as empty.
    """
    import nibabel as nib

    values = np.asarray(values, dtype=np.float32)
    ijk = np.asarray(subject_store.voxel_ijk, dtype=np.int64)
    if values.shape != (len(ijk),):
        raise ValueError(f"a voxel map needs one value per voxel ({len(ijk)}), got shape {values.shape}")
    shape = tuple(int(s) for s in subject_store.attrs.get("grid_shape", ijk.max(0) + 1))
    volume = np.full(shape, np.nan, dtype=np.float32)
    volume[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = values
    image = nib.Nifti1Image(volume, np.asarray(subject_store.affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    return image


def write_analysis(
    out: str | os.PathLike,
    analysis: Analysis,
    result: AnalysisResult,
    *,
    run_dir: Path,
    run_info: dict[str, Any],
    subject_store,
) -> Path:
    """Write the analysis folder ``out`` atomically (layout in :mod:`fmrirecon.analysis`)."""
    import nibabel as nib

    from fmrirecon.config import config_to_dict

    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for name, png in result.figures.items():
            (tmp / f"{name}.png").write_bytes(png)
        for name, values in result.voxel_maps.items():
            nib.save(voxel_volume(values, subject_store), tmp / f"{name}.nii.gz")
        write_json_atomic(
            tmp / ANALYSIS_FILE,
            {
                "analysis": analysis.name,
                "description": analysis.description,
                "run": str(Path(run_dir).resolve()),
                "method": run_info.get("method"),
                "subject": run_info.get("subject"),
                "store": run_info.get("store"),
                "settings": config_to_dict(analysis.config),
                "results": result.results,
                "figures": [f"{name}.png" for name in result.figures],
                "volumes": [f"{name}.nii.gz" for name in result.voxel_maps],
                "versions": library_versions(),
            },
        )
    return out
